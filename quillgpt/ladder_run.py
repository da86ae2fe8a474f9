"""`quill ladder`: train every rung of the learning ladder side by side and compare.

    from quillgpt import load_config
    from quillgpt.ladder_run import run_ladder
    result = run_ladder(load_config("shakespeare-char-cpu", {"data": "input.txt"}), "runs/ladder", steps=500)

Every rung (bigram, single-head, multi-head, block, gpt; see `quillgpt.ladder`) trains with the
same config -- data, tokenizer, sizes, batch, optimizer, learning-rate schedule, seed -- and the
same number of steps, each into its own run directory OUT/<rung> (so `quill sample OUT/bigram`
works). Then OUT/ladder.csv holds one row per rung and OUT/ladder.png draws the final validation
losses and the validation curves over steps.

A time budget is turned into a step budget before any rung trains: one training step of every
rung is timed on a batch of the config's shape (after a warm-up step), and each rung gets the
number of steps that makes the sum of training and evaluation times fit the budget.
"""

from __future__ import annotations

import copy
import csv
import io
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import Config, parse_duration
from .errors import QuillError
from .fileio import atomic_write_bytes, atomic_write_text, check_apart
from .ladder import RUNGS, bigram_entropy
from .model import count_params
from .registry import build_model

CSV_COLUMNS = ["rung", "params", "train_loss", "val_loss", "tokens_per_s"]
N_EVALS = 10  # evaluations per rung after the first, for the curves


@dataclass
class RungResult:
    rung: str
    params: int
    train_loss: float
    val_loss: float
    tokens_per_s: float
    sample: str
    curve: list[tuple[int, float]] = field(default_factory=list)  # (step, val loss) at each evaluation


@dataclass
class LadderResult:
    out: Path
    steps: int
    rungs: list[RungResult]
    bigram_entropy: float  # counted on the train split: the bigram rung's loss floor
    elapsed_s: float


def rung_config(cfg: Config, rung: str, steps: int, out: Path) -> Config:
    """The config of one rung: the shared one, with this kind, budget and run directory."""
    c = copy.deepcopy(cfg)
    c.model.kind = rung
    c.train.out = str(out / rung)
    c.train.max_iters = steps
    c.train.lr_decay_iters = steps
    c.train.warmup_iters = min(c.train.warmup_iters, steps // 10)
    c.train.eval_interval = max(1, math.ceil(steps / N_EVALS))
    c.train.time_budget = None  # the ladder's budget is already turned into steps
    return c


def time_step(cfg: Config, repeats: int = 3) -> float:
    """Seconds per AdamW training step of `cfg`'s model on a random batch of its shape."""
    from .runtime import resolve_device

    device = resolve_device(cfg.train.device)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.learning_rate)
    shape = (cfg.train.batch_size, cfg.model.block_size)
    x = torch.randint(cfg.model.vocab_size, shape, device=device)
    y = torch.randint(cfg.model.vocab_size, shape, device=device)

    def step() -> None:
        for _ in range(cfg.train.gradient_accumulation_steps):
            _, loss = model(x, y)
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up: allocations, lazy initialisation
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def steps_for_time_budget(step_seconds: dict[str, float], seconds: float, eval_iters: int,
                          grad_accum: int = 1) -> int:
    """The step budget that trains every rung within `seconds` in all.

    A rung of s seconds per step costs N*s for training plus (N_EVALS + 1) evaluations of
    2 * eval_iters forward passes, a forward pass counted as a third of a step per micro-batch.
    """
    per_step = sum(step_seconds.values())
    per_eval = per_step * 2 * eval_iters / (3 * grad_accum)
    steps = int((seconds - (N_EVALS + 1) * per_eval) / per_step)
    if steps < 1:
        need = per_step + (N_EVALS + 1) * per_eval
        raise QuillError(f"time budget of {seconds:g} s is too short: one step of every rung with its "
                         f"evaluations takes about {need:.1f} s; use a longer --time-budget or --budget-steps")
    return steps


def check_ladder_out(out: Path, overwrite: bool, data: str | None = None) -> None:
    check_apart(out, [data] if data else [])
    if out.exists() and not out.is_dir():
        raise QuillError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise QuillError(f"--out {out} is not empty; pass --overwrite to replace the ladder in it")


def run_ladder(cfg: Config, out: str | Path, steps: int | None = None, time_budget: float | None = None,
               overwrite: bool = False, progress: bool = True, log: Callable[[str], None] | None = None,
               plot: bool = True) -> LadderResult:
    """Train every rung on `cfg` for the same number of steps, then write OUT/ladder.csv and
    OUT/ladder.png.

    The steps are `steps`, else what `time_budget` (seconds for the whole ladder; default
    cfg.train.time_budget, e.g. "5m") allows every rung, else cfg.train.max_iters.
    """
    from .data import prepare_training_data
    from .train import Trainer

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    start = time.time()
    out = Path(out)
    if time_budget is None and cfg.train.time_budget is not None:
        time_budget = parse_duration(cfg.train.time_budget)
    if steps is not None and time_budget is not None:
        raise QuillError("give a step budget or a time budget, not both")
    if steps is not None and steps < 1:
        raise QuillError(f"the step budget must be at least 1, got {steps}")
    if time_budget is not None and not time_budget > 0:
        raise QuillError(f"the time budget must be positive seconds, got {time_budget}")
    cfg.validate()
    check_ladder_out(out, overwrite, cfg.train.data)
    if plot:
        require_matplotlib()

    tokenizer, splits = prepare_training_data(cfg)
    cfg = copy.deepcopy(cfg)
    cfg.model.vocab_size = tokenizer.vocab_size
    entropy = bigram_entropy(torch.from_numpy(splits.train.astype("int64")), tokenizer.vocab_size)
    if time_budget is not None:
        seconds = {rung: time_step(rung_config(cfg, rung, 1, out)) for rung in RUNGS}
        steps = steps_for_time_budget(seconds, time_budget, cfg.train.eval_iters,
                                      cfg.train.gradient_accumulation_steps)
        per_step = ", ".join(f"{rung} {1000 * s:.1f}" for rung, s in seconds.items())
        log(f"time budget {time_budget:g} s: ms per step {per_step}; {steps} steps per rung")
    elif steps is None:
        steps = cfg.train.max_iters
        if steps < 1:
            raise QuillError("max_iters is 0: give --budget-steps N or --time-budget SECONDS")

    results = []
    for i, rung in enumerate(RUNGS, 1):
        rcfg = rung_config(cfg, rung, steps, out)
        log(f"[{i}/{len(RUNGS)}] {rung}: {steps} steps into {rcfg.train.out}")
        trainer = Trainer(rcfg, overwrite=overwrite, progress=progress, log=log)
        result = trainer.run()
        curve = [(int(row["step"]), float(row["val_loss"])) for row in trainer.metrics if row.get("val_loss")]
        results.append(RungResult(rung, count_params(build_model(rcfg.model)), result.train_loss,
                                  result.val_loss, result.tokens_per_s, result.sample, curve))

    ladder = LadderResult(out, steps, results, entropy, time.time() - start)
    atomic_write_text(out / "ladder.csv", ladder_csv(ladder))
    if plot:
        atomic_write_bytes(out / "ladder.png", ladder_png(ladder, describe(cfg, steps)))
    return ladder


def describe(cfg: Config, steps: int) -> str:
    m, t = cfg.model, cfg.train
    data = Path(t.data).name if t.data else "tinyshakespeare"
    if t.max_megabytes:
        data += f" (first {t.max_megabytes:g} MB)"
    return (f"{data}, {steps} steps of batch {t.batch_size} x {m.block_size} tokens, lr {t.learning_rate:g}; "
            f"n_layer {m.n_layer}, n_head {m.n_head}, n_embd {m.n_embd}")


def ladder_csv(ladder: LadderResult) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for r in ladder.rungs:
        writer.writerow([r.rung, r.params, f"{r.train_loss:.4f}", f"{r.val_loss:.4f}", f"{r.tokens_per_s:.1f}"])
    return buf.getvalue()


def one_line(text: str, width: int = 60) -> str:
    """A sample on one line: line breaks shown as ' / ', cut to `width` characters."""
    line = " / ".join(part.strip() for part in text.strip().splitlines() if part.strip())
    return line if len(line) <= width else line[: width - 3] + "..."


def ladder_table(ladder: LadderResult) -> str:
    """The table `quill ladder` prints: one row per rung, best last."""
    rows = [["rung", "params", "train loss", "val loss", "tokens/s", "sample"]]
    for r in ladder.rungs:
        rows.append([r.rung, f"{r.params:,}", f"{r.train_loss:.4f}", f"{r.val_loss:.4f}",
                     f"{r.tokens_per_s:,.0f}", one_line(r.sample)])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:-1], widths[1:-1])] + [row[-1]]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise QuillError("ladder.png is drawn with matplotlib, which is not installed: "
                         "pip install 'quillgpt[plot]'") from None


def ladder_png(ladder: LadderResult, subtitle: str = "") -> bytes:
    """Left: the final validation loss of every rung. Right: validation loss over steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r.rung for r in ladder.rungs]
    colors = plt.get_cmap("viridis")([i / max(1, len(names) - 1) for i in range(len(names))])
    fig, (bars, curves) = plt.subplots(1, 2, figsize=(12, 4.8), gridspec_kw={"width_ratios": [1, 1.4]})

    vals = [r.val_loss for r in ladder.rungs]
    bars.bar(names, vals, color=colors)
    for x, v in enumerate(vals):
        bars.text(x, v, f"{v:.3f}", ha="center", va="bottom", fontsize=9)
    bars.axhline(ladder.bigram_entropy, color="gray", linestyle="--", linewidth=1,
                 label=f"bigram entropy of the train split ({ladder.bigram_entropy:.3f})")
    low = min(vals + [ladder.bigram_entropy])
    high = max(vals + [ladder.bigram_entropy])
    bars.set_ylim(max(0.0, low - 0.3 * (high - low + 0.1)), high + 0.15 * (high - low + 0.1))
    bars.set_ylabel("validation loss (nats per token)")
    bars.set_title("validation loss after the budget")
    bars.legend(loc="upper right", fontsize=8)

    for r, color in zip(ladder.rungs, colors):
        steps = [s for s, _ in r.curve]
        losses = [v for _, v in r.curve]
        curves.plot(steps, losses, marker="o", markersize=3, color=color, label=r.rung)
    curves.axhline(ladder.bigram_entropy, color="gray", linestyle="--", linewidth=1)
    tail = [v for r in ladder.rungs for s, v in r.curve if s > 0]
    if tail:  # the first evaluation (untrained, ~ln V) would squash the interesting part
        top = max(tail)
        curves.set_ylim(min(tail + [ladder.bigram_entropy]) - 0.1, top + 0.25 * (top - min(tail) + 0.1))
    curves.set_xlabel("step")
    curves.set_ylabel("validation loss")
    curves.set_title("validation loss over steps")
    curves.legend(fontsize=8)
    curves.grid(alpha=0.3)

    fig.suptitle(f"The learning ladder\n{subtitle}" if subtitle else "The learning ladder", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()
