"""The training loop: data -> model -> AdamW with warmup + cosine decay -> run directory.

    from quillgpt import load_config, train
    result = train(load_config("shakespeare-char-cpu", {"data": "input.txt", "out": "runs/x"}))
"""

from __future__ import annotations

import contextlib
import csv
import io
import math
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

from . import checkpoint as ckpt
from .config import Config
from .data import BatchSampler, Splits, prepare_training_data
from .errors import QuillError
from .fileio import atomic_write_text
from .generate import generate
from .model import build_model, count_params
from .tokenizers import Tokenizer

METRICS_COLUMNS = ["step", "elapsed_s", "lr", "train_loss", "val_loss", "tokens_per_s"]


def resolve_device(name: str = "auto") -> torch.device:
    """cuda > mps > cpu for "auto"; otherwise the device named, if it exists."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise QuillError(f"unknown device {name!r} (use auto, cpu, cuda, cuda:N or mps)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise QuillError("device cuda requested but CUDA is not available")
    mps = getattr(torch.backends, "mps", None)
    if device.type == "mps" and not (mps and mps.is_available()):
        raise QuillError("device mps requested but MPS is not available")
    return device


def autocast_context(device: torch.device, dtype: str) -> contextlib.AbstractContextManager:
    """Mixed precision: autocast to bfloat16/float16 for matrix products; nothing for float32."""
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=getattr(torch, dtype))


def lr_at(step: int, cfg: Config) -> float:
    """Linear warmup to learning_rate, then cosine decay to min_lr at lr_decay_iters."""
    t = cfg.train
    decay_iters = t.lr_decay_iters if t.lr_decay_iters is not None else t.max_iters
    if step < t.warmup_iters:
        return t.learning_rate * (step + 1) / (t.warmup_iters + 1)
    if step > decay_iters:
        return t.min_lr
    ratio = (step - t.warmup_iters) / max(1, decay_iters - t.warmup_iters)
    coeff = 0.5 * (1.0 + math.cos(math.pi * min(1.0, ratio)))
    return t.min_lr + coeff * (t.learning_rate - t.min_lr)


def make_optimizer(model: nn.Module, cfg: Config, device: torch.device) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices (>= 2-D: Linear and embedding weights) only."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.train.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    extra = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(groups, lr=cfg.train.learning_rate,
                             betas=(cfg.train.beta1, cfg.train.beta2), **extra)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def default_out_dir(cfg: Config) -> Path:
    name = Path(cfg.train.data).stem if cfg.train.data else "shakespeare"
    return Path("runs") / name


def check_out_dir(out: Path, overwrite: bool) -> None:
    """Refuse to train into an existing run (or any non-empty directory) without --overwrite."""
    if out.exists() and not out.is_dir():
        raise QuillError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        what = "a run" if ckpt.is_run_dir(out) else "a non-empty directory"
        raise QuillError(f"--out {out} is {what}; pass --overwrite to replace it")


@dataclass
class TrainResult:
    run_dir: Path | None
    steps: int
    train_loss: float
    val_loss: float
    best_val_loss: float
    elapsed_s: float
    tokens_per_s: float
    sample: str
    losses: list[float]  # the training loss of every step, in order


class Trainer:
    """One training run. `Trainer(cfg).run()` does everything `quill train` does."""

    def __init__(self, cfg: Config, overwrite: bool = False, save: bool = True,
                 progress: bool = True, log: Callable[[str], None] | None = None,
                 start_time: float | None = None):
        self.start_time = start_time if start_time is not None else time.time()
        self.cfg = cfg
        self.save = save
        self.progress = progress
        self.log = log or (lambda msg: print(msg, file=sys.stderr))
        cfg.validate()
        self.out = Path(cfg.train.out) if cfg.train.out else default_out_dir(cfg)
        if save:
            check_out_dir(self.out, overwrite)
            cfg.train.out = str(self.out)
        self.device = resolve_device(cfg.train.device)

        self.tokenizer: Tokenizer
        self.splits: Splits
        self.tokenizer, self.splits = prepare_training_data(cfg)
        cfg.model.vocab_size = self.tokenizer.vocab_size

        seed_everything(cfg.train.seed)
        self.model = build_model(cfg.model).to(self.device)
        self.log(f"number of parameters: {count_params(self.model) / 1e6:.2f}M")
        self.log(
            f"data: {len(self.splits.train):,} train / {len(self.splits.val):,} val tokens, "
            f"vocabulary {self.tokenizer.vocab_size}, device {self.device}, dtype {cfg.train.dtype}"
        )
        self.optimizer = make_optimizer(self.model, cfg, self.device)
        self.forward_model = self._maybe_compile(self.model)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.train.dtype == "float16")
        self.autocast = autocast_context(self.device, cfg.train.dtype)
        t = cfg.train
        self.batches = BatchSampler(self.splits.train, cfg.model.block_size, t.batch_size, t.seed,
                                    self.device)
        self.metrics: list[dict] = []
        self.best_val = float("inf")

    def _maybe_compile(self, model: nn.Module) -> nn.Module:
        if not self.cfg.train.compile:
            return model
        try:
            return torch.compile(model)
        except Exception as e:  # noqa: BLE001 - any compiler failure falls back to eager
            self.log(f"torch.compile unavailable ({type(e).__name__}: {e}); training without it")
            return model

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean loss over `eval_iters` batches of each split, from fixed seeds (same batches each time)."""
        self.model.eval()
        out = {}
        t = self.cfg.train
        for i, (name, tokens) in enumerate((("train", self.splits.train), ("val", self.splits.val))):
            sampler = BatchSampler(tokens, self.cfg.model.block_size, t.batch_size, t.seed + 1 + i,
                                   self.device)
            total = 0.0
            for _ in range(t.eval_iters):
                x, y = sampler.next()
                with self.autocast:
                    _, loss = self.forward_model(x, y)
                total += loss.item()
            out[name] = total / t.eval_iters
        self.model.train()
        return out

    def train_step(self, step: int) -> tuple[float, float]:
        """One optimizer step (with gradient accumulation); returns (loss, lr)."""
        t = self.cfg.train
        lr = lr_at(step, self.cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        total = 0.0
        for _ in range(t.gradient_accumulation_steps):
            x, y = self.batches.next()
            with self.autocast:
                _, loss = self.forward_model(x, y)
                loss = loss / t.gradient_accumulation_steps
            self.scaler.scale(loss).backward()
            total += loss.item()
        if t.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return total, lr

    def write_metrics(self) -> None:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=METRICS_COLUMNS)
        writer.writeheader()
        for row in self.metrics:
            writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in METRICS_COLUMNS})
        atomic_write_text(self.out / ckpt.METRICS_FILE, buf.getvalue())

    def run(self) -> TrainResult:
        cfg, t = self.cfg, self.cfg.train
        if self.save:
            self.out.mkdir(parents=True, exist_ok=True)
            ckpt.save_config(cfg, self.out)
            self.tokenizer.save(self.out / ckpt.TOKENIZER_FILE)
        tokens_per_step = t.batch_size * t.gradient_accumulation_steps * cfg.model.block_size
        losses: list[float] = []

        ev = self.evaluate()
        self._record(0, t.learning_rate if t.warmup_iters == 0 else lr_at(0, cfg), ev["train"],
                     ev, None)
        last_eval = ev
        bar = tqdm(total=t.max_iters, disable=not self.progress, unit="step", dynamic_ncols=True,
                   file=sys.stderr)
        window_losses: list[float] = []
        window_start = time.time()
        train_start = time.time()
        tokens_per_s = 0.0
        for step in range(1, t.max_iters + 1):
            loss, lr = self.train_step(step - 1)
            losses.append(loss)
            window_losses.append(loss)
            bar.update(1)
            is_eval = step % t.eval_interval == 0 or step == t.max_iters
            if step % t.log_interval == 0 or is_eval:
                now = time.time()
                tokens_per_s = len(window_losses) * tokens_per_step / max(now - window_start, 1e-9)
                ev = self.evaluate() if is_eval else None
                self._record(step, lr, sum(window_losses) / len(window_losses), ev, tokens_per_s)
                postfix = {"loss": f"{loss:.4f}", "tok/s": f"{tokens_per_s:,.0f}"}
                if ev:
                    last_eval = ev
                    postfix["val"] = f"{ev['val']:.4f}"
                    msg = f"step {step}: train loss {ev['train']:.4f}, val loss {ev['val']:.4f}"
                    if self.progress:
                        bar.write(msg, file=sys.stderr)
                    else:
                        self.log(msg)
                bar.set_postfix(postfix)
                window_losses = []
                window_start = time.time()  # evaluation time is not counted in tokens/s
        bar.close()
        train_time = time.time() - train_start
        avg_tokens_per_s = t.max_iters * tokens_per_step / max(train_time, 1e-9)

        sample = ""
        if t.sample_tokens > 0:
            sample = generate(self.model, self.tokenizer, "", max_new_tokens=t.sample_tokens,
                              temperature=0.8, top_k=200, seed=t.seed)
        if self.save:
            ckpt.save_weights(self.model, self.out / ckpt.MODEL_FILE)
            self.write_metrics()
        return TrainResult(
            run_dir=self.out if self.save else None,
            steps=t.max_iters,
            train_loss=last_eval["train"],
            val_loss=last_eval["val"],
            best_val_loss=self.best_val,
            elapsed_s=time.time() - self.start_time,
            tokens_per_s=avg_tokens_per_s,
            sample=sample,
            losses=losses,
        )

    def _record(self, step: int, lr: float, train_loss: float, ev: dict | None,
                tokens_per_s: float | None) -> None:
        row = {
            "step": step,
            "elapsed_s": round(time.time() - self.start_time, 3),
            "lr": f"{lr:.6g}",
            "train_loss": f"{train_loss:.6f}",
            "val_loss": f"{ev['val']:.6f}" if ev else None,
            "tokens_per_s": f"{tokens_per_s:.1f}" if tokens_per_s is not None else None,
        }
        self.metrics.append(row)
        if ev and ev["val"] < self.best_val:
            self.best_val = ev["val"]
            if self.save:
                ckpt.save_weights(self.model, self.out / ckpt.BEST_FILE, {"step": str(step)})
        if self.save and ev:
            self.write_metrics()


def train(cfg: Config, overwrite: bool = False, save: bool = True, progress: bool = True,
          start_time: float | None = None) -> TrainResult:
    """Train a model as `cfg` says; see `Trainer`."""
    return Trainer(cfg, overwrite=overwrite, save=save, progress=progress, start_time=start_time).run()
