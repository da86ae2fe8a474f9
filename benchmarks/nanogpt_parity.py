"""Is quillgpt's `shakespeare-char-cpu` run nanoGPT's run? Same model, two random streams.

nanoGPT's train.py draws its batches and its evaluation batches from the global torch RNG,
right after the model's initialisation consumed it. quillgpt draws training batches from a
generator of their own (so a checkpoint can hold its state) and evaluates on fixed batches.
This script trains the same recipe both ways, for several seeds:

- "nanoGPT loop": nanoGPT's training loop, written out here (global RNG, `torch.randint`
  windows, the next batch drawn after the forward, 20 fresh random batches per evaluation,
  warmup + cosine, clipping, AdamW groups as nanoGPT) around quillgpt's GPT;
- "quill train": `Trainer` with the preset, as `quill train --config shakespeare-char-cpu` runs it.

For each it reports the recipe's 20-batch val estimate at step 2000 and the loss over the whole
val split (every non-overlapping 64-token window), which has no sampling noise.

    python benchmarks/nanogpt_parity.py [--seeds 1337 1 2 3] [--data ../shared/data/tinyshakespeare.txt]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

sys.path[0] = str(Path(__file__).resolve().parent.parent)

from quillgpt.config import load_config  # noqa: E402
from quillgpt.model import GPT  # noqa: E402
from quillgpt.train import Trainer  # noqa: E402


@torch.no_grad()
def full_val_loss(model: torch.nn.Module, val: np.ndarray, block: int = 64) -> float:
    model.eval()
    n = (len(val) - 1) // block
    x = torch.from_numpy(val[:n * block].astype(np.int64)).view(n, block)
    y = torch.from_numpy(val[1:n * block + 1].astype(np.int64)).view(n, block)
    total = sum(model(x[i:i + 256], y[i:i + 256])[1].item() * len(x[i:i + 256]) for i in range(0, n, 256))
    model.train()
    return total / n


def nanogpt_loop(cfg, train: np.ndarray, val: np.ndarray, seed: int) -> tuple[float, float]:
    """nanoGPT's train.py for this recipe: returns (20-batch val estimate at max_iters, full val)."""
    m, t = cfg.model, cfg.train
    torch.manual_seed(seed)
    model = GPT(m)

    def get_batch(data: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        ix = torch.randint(len(data) - m.block_size, (t.batch_size,))
        x = torch.stack([torch.from_numpy(data[i:i + m.block_size].astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + m.block_size].astype(np.int64)) for i in ix])
        return x, y

    def lr_at(it: int) -> float:
        if it < t.warmup_iters:
            return t.learning_rate * (it + 1) / (t.warmup_iters + 1)
        ratio = (it - t.warmup_iters) / (t.lr_decay_iters - t.warmup_iters)
        return t.min_lr + 0.5 * (1 + math.cos(math.pi * min(1.0, ratio))) * (t.learning_rate - t.min_lr)

    @torch.no_grad()
    def estimate_val() -> float:
        model.eval()
        for _ in range(t.eval_iters):  # nanoGPT evaluates the train split first: the same draws
            torch.randint(len(train) - m.block_size, (t.batch_size,))
        losses = [model(*get_batch(val))[1].item() for _ in range(t.eval_iters)]
        model.train()
        return statistics.fmean(losses)

    params = list(model.parameters())
    opt = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": t.weight_decay},
                             {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                            lr=t.learning_rate, betas=(t.beta1, t.beta2))
    x, y = get_batch(train)
    estimate = float("nan")
    for it in range(t.max_iters + 1):
        for group in opt.param_groups:
            group["lr"] = lr_at(it)
        if it % t.eval_interval == 0:
            estimate = estimate_val()
        if it == t.max_iters:
            break  # the val loss "at step 2000" is taken after 2000 updates
        _, loss = model(x, y)
        x, y = get_batch(train)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, t.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return estimate, full_val_loss(model, val)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[1337, 1, 2, 3])
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/tinyshakespeare.txt"))
    args = ap.parse_args()
    rows = []
    for seed in args.seeds:
        cfg = load_config("shakespeare-char-cpu", {"data": args.data, "seed": seed, "sample_tokens": 0})
        trainer = Trainer(cfg, save=False, progress=False, log=lambda m: None)
        result = trainer.run()
        train, val = np.asarray(trainer.data.splits.train), np.asarray(trainer.data.splits.val)
        ours = (result.val_loss, full_val_loss(trainer.model, val))
        theirs = nanogpt_loop(cfg, train, val, seed)
        rows.append((seed, *theirs, *ours))
        print(f"seed {seed}: nanoGPT loop {theirs[0]:.4f} / full {theirs[1]:.4f}; "
              f"quill train {ours[0]:.4f} / full {ours[1]:.4f}", flush=True)
    print()
    print("| seed | nanoGPT loop: 20-batch val | whole val | quill train: 20-batch val | whole val |")
    print("|---|---|---|---|---|")
    for seed, a, b, c, d in rows:
        print(f"| {seed} | {a:.4f} | {b:.4f} | {c:.4f} | {d:.4f} |")
    means = [statistics.fmean(r[i] for r in rows) for i in range(1, 5)]
    print("| mean | " + " | ".join(f"{v:.4f}" for v in means) + " |")


if __name__ == "__main__":
    main()
