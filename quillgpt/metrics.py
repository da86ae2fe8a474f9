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
from dataclasses import dataclass
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


@dataclass(frozen=True)
class GpuPeak:
    """A GPU's dense peak FLOP/s from its vendor's data sheet (SXM parts where there are several):
    bf16 and fp16 tensor cores with fp32 accumulation, TF32 tensor cores (None: the GPU has none,
    Volta and Turing), and plain fp32. None: the GPU has no such hardware rate."""

    bf16: float | None
    fp16: float
    tf32: float | None
    fp32: float

    def for_dtype(self, dtype: str) -> float | None:
        """The peak that the loop's matmuls in `dtype` can reach: bf16/fp16 tensor cores; for
        float32, TF32 (the loop turns it on) where the GPU has it, else plain fp32."""
        if dtype == "bfloat16":
            return self.bf16
        if dtype == "float16":
            return self.fp16
        return self.tf32 if self.tf32 is not None else self.fp32


# by the word of the model name nvidia-smi shows ("NVIDIA H100 80GB HBM3": H100)
GPU_PEAK_FLOPS = {
    "H200": GpuPeak(bf16=989e12, fp16=989e12, tf32=494.5e12, fp32=67e12),
    "H100": GpuPeak(bf16=989e12, fp16=989e12, tf32=494.5e12, fp32=67e12),
    "A100": GpuPeak(bf16=312e12, fp16=312e12, tf32=156e12, fp32=19.5e12),
    "L40S": GpuPeak(bf16=362e12, fp16=362e12, tf32=183e12, fp32=91.6e12),
    "L4": GpuPeak(bf16=121e12, fp16=121e12, tf32=60e12, fp32=30.3e12),
    "A10": GpuPeak(bf16=125e12, fp16=125e12, tf32=62.5e12, fp32=31.2e12),
    "4090": GpuPeak(bf16=165e12, fp16=165e12, tf32=82.6e12, fp32=82.6e12),
    "3090": GpuPeak(bf16=71e12, fp16=71e12, tf32=35.6e12, fp32=35.6e12),
    "V100": GpuPeak(bf16=None, fp16=125e12, tf32=None, fp32=15.7e12),  # Volta: no bf16, no TF32
    "T4": GpuPeak(bf16=None, fp16=65e12, tf32=None, fp32=8.1e12),  # Turing: no bf16, no TF32
}


def gpu_peak(device: torch.device) -> tuple[str, GpuPeak] | None:
    """The table entry (its name and peaks) of a CUDA device, or None (a CPU, a GPU the table
    does not name)."""
    if device.type != "cuda":
        return None
    words = re.split(r"[\s_-]+", torch.cuda.get_device_name(device).upper())
    for key, peak in GPU_PEAK_FLOPS.items():
        if key in words:
            return key, peak
    return None


def peak_flops(device: torch.device, dtype: str) -> float | None:
    """The documented peak FLOP/s of `device` for `dtype` (GPU_PEAK_FLOPS, `GpuPeak.for_dtype`),
    or None: a CPU, or a GPU the table does not name, has no peak we can vouch for (a matmul timed
    at start-up is no peak: on a busy machine the "MFU" read 900%)."""
    entry = gpu_peak(device)
    return entry[1].for_dtype(dtype) if entry else None


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


class Throughput:
    """Tokens per second: over a window of steps (restarted after every logging step, so that
    evaluations are not counted) and over the whole session."""

    def __init__(self, tokens: int, clock: Callable[[], float] = time.time):
        self.clock = clock
        self.session_tokens = self.window_tokens = tokens
        self.session_start = self.window_start = clock()

    def rate(self, tokens: int) -> float:
        """Tokens per second since the window started (`tokens`: the count so far)."""
        return (tokens - self.window_tokens) / max(self.clock() - self.window_start, 1e-9)

    def restart(self, tokens: int) -> None:
        self.window_start, self.window_tokens = self.clock(), tokens

    def session_rate(self, tokens: int) -> float:
        return (tokens - self.session_tokens) / max(self.clock() - self.session_start, 1e-9)


class RunRecorder:
    """What each step leaves behind: its training loss (`add_loss`; kept on the device until
    `flush_losses` copies them, one sync per log), and at each logged step its metrics row
    (written on evaluation steps), the best weights so far (RUN/best.safetensors, by val loss)
    and the model FLOP/s (and MFU, where the device has a documented peak) shown beside
    tokens/s. `state()` is its part of a checkpoint."""

    def __init__(self, metrics: MetricsLog, model: nn.Module, dist: qdist.DistInfo, out: Path, save: bool,
                 device: torch.device, dtype: str, flops_per_token: float,
                 log: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr)):
        self.metrics = metrics
        self.model = model
        self.dist = dist
        self.out = out
        self.save = save
        self.device = device
        self.dtype = dtype
        self.flops_per_token = flops_per_token
        self.peak = peak_flops(device, dtype)  # per device; None: no documented peak
        entry = gpu_peak(device)
        self.peak_name = f"GPU_PEAK_FLOPS[{entry[0]!r}] ({dtype})" if entry else None
        self.log = log
        self.warned = False
        self.best_val = float("inf")
        self.last_val: float | None = None
        self.losses: list[float] = []  # every step's training loss, in order, on the host
        self.pending: list[torch.Tensor] = []  # the losses of the steps since the last flush

    def add_loss(self, loss: torch.Tensor) -> None:
        self.pending.append(loss)

    def flush_losses(self) -> None:
        """Copy the pending losses to the host (one sync), averaged over ranks (a collective)."""
        if self.pending:
            self.losses.extend(qdist.all_reduce_mean(torch.stack(self.pending), self.dist).tolist())
            self.pending = []

    def mean_loss(self, start: int, end: int) -> tuple[float, float]:
        """The mean training loss of steps start+1..end, and the last one's (losses flushed)."""
        window = self.losses[start:end]
        return sum(window) / len(window), window[-1]

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps of the record (losses flushed first)."""
        return {"metrics": self.metrics.rows, "losses": self.losses, "best_val_loss": self.best_val,
                "val_loss": self.last_val}

    def load_state(self, state: dict[str, Any]) -> None:
        self.metrics.rows = state["metrics"]
        self.losses = [float(x) for x in state["losses"]]
        self.best_val = float(state["best_val_loss"])
        self.last_val = state.get("val_loss")

    def flops_per_s(self, tokens_per_s: float | None) -> float | None:
        """The model FLOP/s achieved (all ranks together): tokens/s x training FLOPs per token."""
        return None if tokens_per_s is None else tokens_per_s * self.flops_per_token

    def mfu(self, tokens_per_s: float | None) -> float | None:
        """Achieved / documented peak FLOP/s; None without a peak. A figure past 100% means the
        table's entry does not fit this device: it is said once, naming the entry, and no
        percentage is shown (none is better than a wrong one)."""
        flops = self.flops_per_s(tokens_per_s)
        if flops is None or not self.peak:
            return None
        mfu = flops / (self.peak * self.dist.world_size)
        if mfu <= 1.0:
            return mfu
        if not self.warned:
            self.warned = True
            self.log(f"warning: MFU would be {100 * mfu:.0f}%: {format_flops(flops)} achieved against the peak "
                     f"{format_flops(self.peak * self.dist.world_size)} of {self.peak_name} in "
                     f"quillgpt/metrics.py, which does not fit this device; no MFU is shown")
        return None

    def show(self, bar: ProgressBar, loss: float, tokens_per_s: float, ev: dict[str, float] | None,
             extra: dict[str, float] | None = None) -> None:
        """A logged step's figures on the bar: the loss, speed, model FLOP/s, MFU and val loss
        (and the data's own numbers, `extra`)."""
        bar.show(loss, tokens_per_s, self.flops_per_s(tokens_per_s), self.mfu(tokens_per_s),
                 ev["val"] if ev else None, extra)

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
