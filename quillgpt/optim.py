"""Optimisers and learning-rate schedules: AdamW (GPT-2's), Muon (the speedrun's), warmup + decay.

Muon (Keller Jordan, 2024; used by modded-nanogpt) updates each 2-D hidden weight matrix by
its momentum *orthogonalised*: the momentum G = U S V^T is replaced by (about) U V^T, so that
every direction the gradient points in moves by the same amount instead of a few dominant ones
taking the whole step. The orthogonalisation is five Newton-Schulz iterations of an odd
polynomial, which need only matrix products (no SVD). Embeddings, the LM head, norms and biases
are not hidden matrices and keep AdamW.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn

from .config import Config
from .errors import QuillError
from .runtime import native_bfloat16

# quintic x -> a x + b x^3 + c x^5, tuned (modded-nanogpt) to push every singular value in
# (0, 1] towards 1 as fast as possible; they end in roughly [0.7, 1.2] rather than exactly 1
NS_COEFFS = (3.4445, -4.7750, 2.0315)


def orthogonalize(G: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """About U V^T for G = U S V^T (..., m, n), by Newton-Schulz iterations in bfloat16 where the
    device multiplies it natively (the iteration is stable in low precision; modded-nanogpt runs
    it so), in float32 elsewhere."""
    a, b, c = NS_COEFFS
    X = G.bfloat16() if native_bfloat16(G.device) else G.float()
    wide = X.size(-2) > X.size(-1)
    if wide:
        X = X.mT  # iterate on the smaller Gram matrix
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + eps)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        A = X @ X.mT
        B = b * A + c * A @ A
        X = a * X + B @ X
    if wide:
        X = X.mT
    return X.to(G.dtype)


class Muon(torch.optim.Optimizer):
    """Muon for the parameter groups with `muon=True`, AdamW for the others, in one optimizer
    (one state dict for checkpoints and resume).

    Muon groups: lr, momentum, nesterov, weight_decay, and `split` (a fused matrix of `split`
    stacked blocks, such as the QKV projection, is orthogonalised block by block).
    AdamW groups: lr, betas, eps, weight_decay, exactly as torch.optim.AdamW.
    Under DDP every rank sees the averaged gradient and takes the same step.
    """

    def __init__(self, groups: list[dict[str, Any]], lr: float = 0.02, momentum: float = 0.95,
                 betas: tuple[float, float] = (0.9, 0.99), eps: float = 1e-8, weight_decay: float = 0.0):
        defaults = dict(lr=lr, momentum=momentum, nesterov=True, split=1, muon=False, betas=betas, eps=eps,
                        weight_decay=weight_decay, ns_steps=5)
        super().__init__(groups, defaults)

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001 - torch.optim signature
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["muon"]:
                self._muon_step(group)
            else:
                self._adamw_step(group)
        return loss

    def _muon_step(self, group: dict[str, Any]) -> None:
        lr, mom, wd, split = group["lr"], group["momentum"], group["weight_decay"], group["split"]
        pending: dict[tuple[int, ...], list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for p in group["params"]:
            if p.grad is None:
                continue
            g = p.grad
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(g)
            buf = state["momentum_buffer"]
            buf.lerp_(g, 1 - mom)  # buf = mom * buf + (1 - mom) * g
            update = g.lerp(buf, mom) if group["nesterov"] else buf  # look one step ahead
            shape = (split, p.size(0) // split, p.size(1))
            pending.setdefault(shape, []).append((p, update.view(shape)))
        # matrices of one shape (the same layer in every block) are orthogonalised in one batch
        for (_, rows, cols), items in pending.items():
            updates = orthogonalize(torch.cat([u for _, u in items]), group["ns_steps"])
            # U V^T has unit singular values, so its RMS is 1/sqrt(max(rows, cols)); scaling by
            # sqrt(max(1, rows/cols)) gives tall and wide matrices comparable steps
            scale = max(1.0, rows / cols) ** 0.5
            for (p, _), update in zip(items, updates.split(split)):
                if wd:
                    p.mul_(1 - lr * wd)
                p.add_(update.view_as(p), alpha=-lr * scale)

    def _adamw_step(self, group: dict[str, Any]) -> None:
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        for p in group["params"]:
            if p.grad is None:
                continue
            g = p.grad
            state = self.state[p]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            state["step"] += 1
            step = state["step"].item()
            state["exp_avg"].lerp_(g, 1 - beta1)
            state["exp_avg_sq"].mul_(beta2).addcmul_(g, g, value=1 - beta2)
            denom = (state["exp_avg_sq"].sqrt() / math.sqrt(1 - beta2**step)).add_(eps)
            if wd:
                p.mul_(1 - lr * wd)
            p.addcdiv_(state["exp_avg"], denom, value=-lr / (1 - beta1**step))


def lr_at(step: int, cfg: Config) -> float:
    """Linear warmup to learning_rate, then decay to min_lr at lr_decay_iters: cosine, or with
    lr_schedule wsd held constant and decayed linearly over the last cooldown_frac of the run."""
    t = cfg.train
    decay_iters = t.lr_decay_iters if t.lr_decay_iters is not None else t.max_iters
    if step < t.warmup_iters:
        return t.learning_rate * (step + 1) / (t.warmup_iters + 1)
    if step > decay_iters:
        return t.min_lr
    if t.lr_schedule == "wsd":
        cooldown_start = decay_iters - t.cooldown_frac * (decay_iters - t.warmup_iters)
        ratio = max(0.0, (step - cooldown_start) / max(1.0, decay_iters - cooldown_start))
        return t.learning_rate + min(1.0, ratio) * (t.min_lr - t.learning_rate)
    ratio = (step - t.warmup_iters) / max(1, decay_iters - t.warmup_iters)
    coeff = 0.5 * (1.0 + math.cos(math.pi * min(1.0, ratio)))
    return t.min_lr + coeff * (t.learning_rate - t.min_lr)


def set_lr(optimizer: torch.optim.Optimizer, lr: float, cfg: Config) -> None:
    """Set every group's learning rate for this step: `lr` for AdamW groups, and for Muon groups
    muon_lr scaled by the same schedule (lr / learning_rate)."""
    muon_scale = cfg.train.muon_lr / cfg.train.learning_rate
    for group in optimizer.param_groups:
        group["lr"] = lr * muon_scale if group.get("muon") else lr


def _muon_matrices(model: nn.Module) -> set[int]:
    """ids of the 2-D hidden weights: every matrix except embeddings and the LM head."""
    skip = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    head = getattr(model, "lm_head", None)
    if head is not None:
        skip.add(id(head.weight))
    return {id(p) for p in model.parameters() if p.dim() == 2 and id(p) not in skip}


def make_optimizer(model: nn.Module, cfg: Config, device: torch.device) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices (>= 2-D: Linear and embedding weights) only; or with
    `optimizer: muon`, Muon for the hidden matrices and that AdamW for the rest."""
    t = cfg.train
    params = [p for p in model.parameters() if p.requires_grad]
    muon_ids = _muon_matrices(model) if t.optimizer == "muon" else set()
    rest = [p for p in params if id(p) not in muon_ids]
    groups = [
        {"params": [p for p in rest if p.dim() >= 2], "weight_decay": t.weight_decay},
        {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0},
    ]
    if t.optimizer == "adamw":
        extra = {"fused": True} if device.type == "cuda" else {}
        return torch.optim.AdamW(groups, lr=t.learning_rate, betas=(t.beta1, t.beta2), **extra)
    names = {id(p): n for n, p in model.named_parameters()}
    fused_qkv = [p for p in params if id(p) in muon_ids and names[id(p)].endswith("attn.c_attn.weight")]
    other = [p for p in params if id(p) in muon_ids and not names[id(p)].endswith("attn.c_attn.weight")]
    muon = dict(muon=True, lr=t.muon_lr, momentum=t.muon_momentum,
                weight_decay=t.muon_weight_decay)
    groups += [{"params": other, **muon}, {"params": fused_qkv, "split": 3, **muon}]
    groups = [g for g in groups if g["params"]]
    return Muon(groups, lr=t.learning_rate, betas=(t.beta1, t.beta2))


def check_optimizer(cfg: Config, fsdp: bool) -> None:
    if cfg.train.optimizer == "muon" and fsdp:
        raise QuillError("optimizer muon does not work with --fsdp (Newton-Schulz needs whole matrices, "
                         "FSDP shards them); train with DDP (torchrun without --fsdp)")


def apply_gradients(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, model: nn.Module,
                    grad_clip: float) -> None:
    """The optimizer step on the accumulated gradients: unscaled (float16's GradScaler), clipped
    to a global norm of `grad_clip` (0: no clipping), applied, then cleared."""
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
