"""RUN/loss.png: the training and validation loss curves from RUN/metrics.csv, and below them
one panel per benchmark task run during training (`eval_tasks`: columns named "task/metric").

    quill plot RUN            (also written automatically at the end of `quill train`)
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable
from pathlib import Path

from . import checkpoint as ckpt
from .errors import QuillError
from .fileio import atomic_write_bytes, read_regular

PLOT_FILE = "loss.png"
MAX_METRICS_BYTES = 256 << 20  # metrics.csv: a million logged steps and more


def read_metrics(run_dir: str | Path) -> list[dict[str, str]]:
    path = ckpt.run_file(run_dir, ckpt.METRICS_FILE)
    try:
        text = read_regular(path, MAX_METRICS_BYTES).decode("utf-8")
        rows = list(csv.DictReader(io.StringIO(text, newline="")))
    except FileNotFoundError:
        raise QuillError(f"{path} not found; is {run_dir} a run directory written by quill train?") from None
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise QuillError(f"cannot read {path}: {e}") from None
    if not rows or "step" not in rows[0] or "train_loss" not in rows[0]:
        raise QuillError(f"{path} has no metrics rows")
    return rows


def _series(rows: list[dict[str, str]], column: str) -> tuple[list[int], list[float]]:
    steps, values = [], []
    for row in rows:
        value = row.get(column) or ""
        if value.strip():
            try:
                step, number = int(row["step"] or ""), float(value)
            except (ValueError, TypeError):
                continue  # a malformed row is skipped, not plotted half
            if math.isfinite(number) and abs(step) < 2**53:
                steps.append(step)
                values.append(number)
    return steps, values


def plot_or_say(run_dir: str | Path, log: Callable[[str], None]) -> None:
    """RUN/loss.png, or one line through `log` saying why there is none (no matplotlib, ...)."""
    try:
        plot_run(run_dir)
    except QuillError as e:
        log(f"no loss.png: {e}")


def task_columns(rows: list[dict[str, str]]) -> list[str]:
    """The metrics columns holding a benchmark task's figure ("hellaswag/acc_norm"), in order."""
    return [k for k in (rows[0] if rows else {}) if "/" in k and any((r.get(k) or "").strip() for r in rows)]


def plot_run(run_dir: str | Path, path: str | Path | None = None) -> Path:
    """Draw train (logged mean) and val loss against the step, and each task's figure below;
    returns the image's path."""
    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise QuillError("plotting needs matplotlib: pip install 'quillgpt[plot]'") from None
    train_steps, train_loss = _series(rows, "train_loss")
    val_steps, val_loss = _series(rows, "val_loss")
    tasks = task_columns(rows)
    fig, axes = plt.subplots(1 + len(tasks), 1, figsize=(8, 4.5 + 2.2 * len(tasks)), dpi=110, squeeze=False,
                             sharex=True, gridspec_kw={"height_ratios": [2] + [1] * len(tasks)})
    ax = axes[0, 0]
    ax.plot(train_steps, train_loss, label="train (mean over each log interval)", color="tab:blue",
            linewidth=1.2)
    if val_steps:
        ax.plot(val_steps, val_loss, "o-", label="val", color="tab:orange", markersize=4)
        best = min(range(len(val_loss)), key=val_loss.__getitem__)
        ax.annotate(f"best val {val_loss[best]:.4f}", (val_steps[best], val_loss[best]),
                    textcoords="offset points", xytext=(-10, 12), ha="right", fontsize=9)
    ax.set_ylabel("cross-entropy loss (nats/token)")
    ax.set_title(f"{run_dir.resolve().name}: loss")
    ax.grid(True, alpha=0.3)
    ax.legend()
    for task_ax, column in zip(axes[1:, 0], tasks):
        steps, values = _series(rows, column)
        task_ax.plot(steps, values, "o-", color="tab:green", markersize=4)
        task_ax.set_ylabel(column.replace("/", "\n"), fontsize=9)
        task_ax.grid(True, alpha=0.3)
    axes[-1, 0].set_xlabel("step")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    out = Path(path) if path is not None else run_dir / PLOT_FILE
    atomic_write_bytes(out, buf.getvalue())
    return out
