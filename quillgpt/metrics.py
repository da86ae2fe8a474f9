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
import re
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
from .errors import QuillError
from .fileio import atomic_write_text

# metrics.csv as in Core; rows also carry "flops_per_s" (the model FLOP/s achieved) and, against a
# documented GPU peak, "mfu" (progress bar, TensorBoard), never written to the csv
METRICS_COLUMNS = ["step", "elapsed_s", "lr", "train_loss", "val_loss", "tokens_per_s"]
NOT_IN_CSV = {"flops_per_s", "mfu"}


def flops_per_token(model: nn.Module, n_params: int) -> float:
    """Training FLOPs per token (forward + backward), as in the PaLM paper / nanoGPT:
    6 N for the weights plus 12 L T C for attention scores and their use."""
    mc = getattr(model, "config", None)
    extra = 0.0
    if mc is not None:
        extra = 12 * mc.n_layer * mc.block_size * mc.n_embd
    return 6 * n_params + extra


# Dense peak FLOP/s of GPUs for bf16/fp16 tensor cores, from the vendors' data sheets (SXM parts
# where there are several), by the model name nvidia-smi shows ("NVIDIA H100 80GB HBM3": H100).
GPU_PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12,
                  "A10": 125e12, "4090": 165e12, "3090": 71e12, "V100": 125e12, "T4": 65e12}


def peak_flops(device: torch.device, dtype: str) -> float | None:
    """The documented peak FLOP/s of `device` for `dtype` (GPU_PEAK_FLOPS, TF32 at half the
    bf16 rate), or None: a CPU, or a GPU the table does not name, has no peak we can vouch for
    (a matmul timed at start-up is no peak: on a busy machine the "MFU" read 900%)."""
    if device.type != "cuda":
        return None
    words = re.split(r"[\s_-]+", torch.cuda.get_device_name(device).upper())
    for key, flops in GPU_PEAK_FLOPS.items():
        if key in words:
            return flops if dtype != "float32" else flops / 2
    return None


def format_flops(flops_per_s: float) -> str:
    """Achieved FLOP/s for people: "812 GFLOP/s", "143.2 TFLOP/s"."""
    if flops_per_s >= 1e12:
        return f"{flops_per_s / 1e12:.1f} TFLOP/s"
    if flops_per_s >= 1e9:
        return f"{flops_per_s / 1e9:.0f} GFLOP/s"
    return f"{flops_per_s / 1e6:.0f} MFLOP/s"


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
               extra: dict[str, float] | None = None, flops_per_s: float | None = None) -> dict[str, Any]:
        row = {
            "step": step,
            "elapsed_s": round(time.time() - self.start_time, 3),
            "lr": f"{lr:.6g}",
            "train_loss": f"{train_loss:.6f}",
            "val_loss": f"{val_loss:.6f}" if val_loss is not None else None,
            "tokens_per_s": f"{tokens_per_s:.1f}" if tokens_per_s is not None else None,
            "flops_per_s": f"{flops_per_s:.4g}" if flops_per_s is not None else None,
            "mfu": f"{mfu:.4f}" if mfu is not None else None,
        }
        row.update({k: f"{v:.6g}" for k, v in (extra or {}).items()})
        self.rows.append(row)
        if self.tensorboard is not None:
            speed = {"tokens_per_s": tokens_per_s, "flops_per_s": flops_per_s, "mfu": mfu}
            self._to_tensorboard(step, lr, train_loss, val_loss, speed, extra or {})
        return row

    def _to_tensorboard(self, step: int, lr: float, train_loss: float, val_loss: float | None,
                        speed: dict[str, float | None], extra: dict[str, float]) -> None:
        tb = self.tensorboard
        tb.add_scalar("loss/train", train_loss, step)
        tb.add_scalar("lr", lr, step)
        if val_loss is not None:
            tb.add_scalar("loss/val", val_loss, step)
        for key, value in speed.items():
            if value:
                tb.add_scalar(key, value, step)
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
    """The tqdm bars on stderr: the run's steps (loss, tokens/s, model FLOP/s, MFU against a
    documented GPU peak, val, ETA), shown from the start, and under it, while an evaluation runs,
    its batches (with their own ETA). Evaluation lines print above the bars, or through `log` when
    progress is off."""

    def __init__(self, total: int, initial: int, enabled: bool, log: Callable[[str], None]):
        self.enabled = enabled
        self.log = log
        self.bar = tqdm(total=total, initial=initial, disable=not enabled, unit="step",
                        dynamic_ncols=True, file=sys.stderr)
        self.eval_bar: tqdm | None = None

    def step(self) -> None:
        self.bar.update(1)

    def show(self, loss: float, tokens_per_s: float, flops_per_s: float | None, mfu: float | None,
             val: float | None, extra: dict[str, float] | None = None) -> None:
        """`extra`: the data's own numbers ("rl/reward": shown as "reward")."""
        postfix = {"loss": f"{loss:.4f}", "tok/s": f"{tokens_per_s:,.0f}"}
        postfix.update({k.rsplit("/", 1)[-1]: f"{v:.3g}" for k, v in (extra or {}).items()})
        if flops_per_s:
            postfix["model"] = format_flops(flops_per_s)
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
    best weights so far (RUN/best.safetensors, by val loss) and the model FLOP/s (and MFU, where
    the device has a documented peak) shown beside tokens/s."""

    def __init__(self, metrics: MetricsLog, model: nn.Module, dist: qdist.DistInfo, out: Path, save: bool,
                 device: torch.device, dtype: str, flops_per_token: float):
        self.metrics = metrics
        self.model = model
        self.dist = dist
        self.out = out
        self.save = save
        self.device = device
        self.dtype = dtype
        self.flops_per_token = flops_per_token
        self.peak = peak_flops(device, dtype)  # per device; None: no documented peak
        self.best_val = float("inf")
        self.last_val: float | None = None

    def flops_per_s(self, tokens_per_s: float | None) -> float | None:
        """The model FLOP/s achieved (all ranks together): tokens/s x training FLOPs per token."""
        return None if tokens_per_s is None else tokens_per_s * self.flops_per_token

    def mfu(self, tokens_per_s: float | None) -> float | None:
        """Achieved / documented peak FLOP/s; None without a peak, or when the figure would pass
        100% (then the table does not fit this device, and no percentage is better than a wrong one)."""
        flops = self.flops_per_s(tokens_per_s)
        if flops is None or not self.peak:
            return None
        mfu = flops / (self.peak * self.dist.world_size)
        return mfu if mfu <= 1.0 else None

    def record(self, step: int, lr: float, train_loss: float, ev: dict[str, float] | None,
               tokens_per_s: float | None, extra: dict[str, float] | None = None) -> None:
        """`ev`: the evaluation's losses ("train", "val") on evaluation steps, else None."""
        val = ev["val"] if ev else None
        self.metrics.record(step, lr, train_loss, val, tokens_per_s, self.mfu(tokens_per_s), extra,
                            self.flops_per_s(tokens_per_s))
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
