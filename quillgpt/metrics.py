"""What a training run reports: metrics.csv rows, TensorBoard scalars, the progress bar, FLOPs.

    log = MetricsLog(run_dir / "metrics.csv")
    log.record(step=10, lr=1e-3, train_loss=2.5, val_loss=None, tokens_per_s=30000.0)
    log.write()

Rows are dicts of formatted strings (as they appear in metrics.csv); evaluation hooks add columns
of their own (e.g. a benchmark's accuracy), which follow the standard ones.
"""

from __future__ import annotations

import csv
import io
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from tqdm import tqdm

from . import checkpoint as ckpt
from . import distributed as qdist
from . import runtime
from .errors import QuillError
from .fileio import atomic_write_text

# metrics.csv as in Core; rows also carry "mfu" (progress bar, TensorBoard), never written to the csv
METRICS_COLUMNS = ["step", "elapsed_s", "lr", "train_loss", "val_loss", "tokens_per_s"]
NOT_IN_CSV = {"mfu"}


def flops_per_token(model: nn.Module, n_params: int) -> float:
    """Training FLOPs per token (forward + backward), as in the PaLM paper / nanoGPT:
    6 N for the weights plus 12 L T C for attention scores and their use."""
    mc = getattr(model, "config", None)
    extra = 0.0
    if mc is not None:
        extra = 12 * mc.n_layer * mc.block_size * mc.n_embd
    return 6 * n_params + extra


# Dense peak FLOP/s of some GPUs for bf16/fp16 tensor cores (vendor data sheets, SXM parts).
GPU_PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12,
                  "A10": 125e12, "4090": 165e12, "3090": 71e12, "V100": 125e12, "T4": 65e12}
_CPU_PEAK: dict[str, float] = {}


def peak_flops(device: torch.device, dtype: str) -> float | None:
    """The device's peak FLOP/s for `dtype`: a table for GPUs; on a CPU, measured once by timing a
    matrix multiply (so MFU there is relative to what the CPU's matmul actually reaches); none
    for a low precision the CPU only emulates."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, flops in GPU_PEAK_FLOPS.items():
            if key in name:
                return flops if dtype != "float32" else flops / 2  # TF32 runs at half rate
        return None
    if device.type != "cpu" or (dtype != "float32" and not runtime.native_bfloat16(device)):
        return None  # an emulated low-precision matmul is no peak to measure against
    if dtype not in _CPU_PEAK:
        n = 512
        g = torch.Generator().manual_seed(0)  # leaves the global RNG alone (exact resume)
        a = torch.randn(n, n, generator=g).to(getattr(torch, dtype))
        b = torch.randn(n, n, generator=g).to(getattr(torch, dtype))
        for _ in range(3):
            a @ b
        reps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < 0.1:
            a @ b
            reps += 1
        _CPU_PEAK[dtype] = 2 * n**3 * reps / (time.perf_counter() - t0)
    return _CPU_PEAK[dtype]


def open_tensorboard(run_dir: Path, log: Callable[[str], None]) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise QuillError("--tensorboard needs the tensorboard package: "
                         "pip install 'quillgpt[tensorboard]'") from None
    log(f"tensorboard: tensorboard --logdir {run_dir / 'tensorboard'}")
    return SummaryWriter(str(run_dir / "tensorboard"))


class MetricsLog:
    """One row per logged step, kept in memory (checkpointed with the run), written to
    metrics.csv (atomically) and mirrored to TensorBoard when it is open."""

    def __init__(self, path: Path | None, start_time: float):
        self.path = path  # None: nothing written
        self.start_time = start_time
        self.rows: list[dict[str, Any]] = []
        self.tensorboard: Any = None

    def record(self, step: int, lr: float, train_loss: float, val_loss: float | None,
               tokens_per_s: float | None, mfu: float | None = None,
               extra: dict[str, float] | None = None) -> dict[str, Any]:
        row = {
            "step": step,
            "elapsed_s": round(time.time() - self.start_time, 3),
            "lr": f"{lr:.6g}",
            "train_loss": f"{train_loss:.6f}",
            "val_loss": f"{val_loss:.6f}" if val_loss is not None else None,
            "tokens_per_s": f"{tokens_per_s:.1f}" if tokens_per_s is not None else None,
            "mfu": f"{mfu:.4f}" if mfu is not None else None,
        }
        row.update({k: f"{v:.6g}" for k, v in (extra or {}).items()})
        self.rows.append(row)
        if self.tensorboard is not None:
            self._to_tensorboard(step, lr, train_loss, val_loss, tokens_per_s, extra or {})
        return row

    def _to_tensorboard(self, step: int, lr: float, train_loss: float, val_loss: float | None,
                        tokens_per_s: float | None, extra: dict[str, float]) -> None:
        tb = self.tensorboard
        tb.add_scalar("loss/train", train_loss, step)
        tb.add_scalar("lr", lr, step)
        if val_loss is not None:
            tb.add_scalar("loss/val", val_loss, step)
        if tokens_per_s:
            tb.add_scalar("tokens_per_s", tokens_per_s, step)
        for key, value in extra.items():
            tb.add_scalar(f"eval/{key}", value, step)

    def columns(self) -> list[str]:
        """The standard columns, then those that evaluation hooks added, in order of appearance."""
        columns = list(METRICS_COLUMNS)
        for row in self.rows:
            columns += [k for k in row if k not in columns and k not in NOT_IN_CSV]
        return columns

    def write(self) -> None:
        if self.path is None:
            return
        columns = self.columns()
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in self.rows:
            writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in columns})
        atomic_write_text(self.path, buf.getvalue())

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()


class ProgressBar:
    """The tqdm bars on stderr: the run's steps (loss, tokens/s, MFU, val, ETA), shown from the
    start, and under it, while an evaluation runs, its batches (with their own ETA). Evaluation
    lines print above the bars, or through `log` when progress is off."""

    def __init__(self, total: int, initial: int, enabled: bool, log: Callable[[str], None]):
        self.enabled = enabled
        self.log = log
        self.bar = tqdm(total=total, initial=initial, disable=not enabled, unit="step",
                        dynamic_ncols=True, file=sys.stderr)
        self.eval_bar: tqdm | None = None

    def step(self) -> None:
        self.bar.update(1)

    def show(self, loss: float, tokens_per_s: float, mfu: float | None, val: float | None) -> None:
        postfix = {"loss": f"{loss:.4f}", "tok/s": f"{tokens_per_s:,.0f}"}
        if mfu is not None:
            postfix["mfu"] = f"{100 * mfu:.1f}%"
        if val is not None:
            postfix["val"] = f"{val:.4f}"
        self.bar.set_postfix(postfix)

    def start_eval(self, step: int, batches: int) -> None:
        """An evaluation of `batches` batches at `step` begins: show its bar (one tick per batch)."""
        self.end_eval()
        self.eval_bar = tqdm(total=batches, desc=f"evaluating step {step}", unit="batch", leave=False,
                             disable=not self.enabled, dynamic_ncols=True, file=sys.stderr)

    def eval_tick(self) -> None:
        if self.eval_bar is not None:
            self.eval_bar.update(1)

    def end_eval(self) -> None:
        if self.eval_bar is not None:
            self.eval_bar.close()
            self.eval_bar = None

    def message(self, msg: str) -> None:
        if self.enabled:
            self.bar.write(msg, file=sys.stderr)
        else:
            self.log(msg)

    def set_total(self, total: int) -> None:
        if self.bar.total != total:
            self.bar.total = total
            self.bar.refresh()

    def close(self) -> None:
        self.end_eval()
        self.bar.close()


class RunRecorder:
    """What each logged step leaves behind: its metrics row (written on evaluation steps), the
    best weights so far (RUN/best.safetensors, by val loss) and the MFU shown beside tokens/s."""

    def __init__(self, metrics: MetricsLog, model: nn.Module, dist: qdist.DistInfo, out: Path, save: bool,
                 device: torch.device, dtype: str, flops_per_token: float, show_mfu: bool):
        self.metrics = metrics
        self.model = model
        self.dist = dist
        self.out = out
        self.save = save
        self.device = device
        self.dtype = dtype
        self.flops_per_token = flops_per_token
        self.show_mfu = show_mfu or save
        self.best_val = float("inf")
        self.last_val: float | None = None

    def mfu(self, tokens_per_s: float | None) -> float | None:
        if tokens_per_s is None or not (self.show_mfu or self.metrics.tensorboard is not None):
            return None
        peak = peak_flops(self.device, self.dtype)
        if not peak:
            return None
        return tokens_per_s * self.flops_per_token / (peak * self.dist.world_size)

    def record(self, step: int, lr: float, train_loss: float, ev: dict[str, float] | None,
               tokens_per_s: float | None, extra: dict[str, float] | None = None) -> None:
        """`ev`: the evaluation's losses ("train", "val") on evaluation steps, else None."""
        val = ev["val"] if ev else None
        self.metrics.record(step, lr, train_loss, val, tokens_per_s, self.mfu(tokens_per_s), extra)
        if val is None:
            return
        self.last_val = val
        if val < self.best_val:
            self.best_val = val
            # gathered on every rank under FSDP (a collective); written by the saving rank
            weights = qdist.full_model_state(self.model, self.dist) if self.save or self.dist.fsdp else {}
            if self.save:
                ckpt.save_tensors(weights, self.out / ckpt.BEST_FILE, {"step": str(step)})
        if self.save:
            self.metrics.write()
