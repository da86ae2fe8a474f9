"""Time to a validation loss: how long each config trains before its val loss reaches a target.

Each config trains as `quill train --config NAME` would (its own schedule, precision and
optimizer), with every `--eval-every` steps an evaluation on a fixed val subset: the same
`--val-windows` windows of 64 tokens (the context of nanoGPT's CPU recipe) for every config, so
the losses compare. A run stops at the first evaluation at or below `--target`; the time
reported is training wall time, evaluations excluded (as modded-nanogpt's records count it).
The configs take turns for `--rounds` rounds; medians are reported.

    python benchmarks/time_to_loss.py [--configs shakespeare-char-cpu speedrun-cpu] [--target 1.886]
        [--data FILE] [--rounds 3] [--set key=value ...]

Reference (GUIDE.md): nanoGPT's CPU recipe reaches 1.886 after 2000 iterations, 91 s on these machines.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

# the repository instead of this folder: benchmarks/tokenizers.py would shadow HF's `tokenizers`
sys.path[0] = str(Path(__file__).resolve().parent.parent)

from benchmarks.machine import cpu_name  # noqa: E402
from benchmarks.script import run_main  # noqa: E402
from quillgpt.config import load_config  # noqa: E402
from quillgpt.train import Trainer  # noqa: E402

WINDOW = 64  # tokens per evaluation window: the block size of the shakespeare-char-cpu preset


def machine() -> str:
    cpu = cpu_name()
    return f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}"


class Reached(Exception):
    pass


class TimedTrainer(Trainer):
    """A Trainer whose evaluations use a fixed val subset, are timed apart, and stop the run at
    the target."""

    def __init__(self, cfg, target: float, windows: int, stop: bool = True, batch: int = 64, **kw):
        super().__init__(cfg, **kw)
        self.target, self.windows, self.stop, self.eval_batch = target, windows, stop, batch
        self.reached: tuple[int, float] | None = None  # (step, train seconds) of the first hit
        self.eval_s = 0.0
        self.curve: list[tuple[int, float, float]] = []  # (step, train seconds, val loss)
        self.t0: float | None = None
        val = torch.from_numpy(self.data.splits.val.astype("int64"))
        n = min(windows, (len(val) - 1) // WINDOW)
        starts = torch.linspace(0, len(val) - WINDOW - 1, n).long()  # spread over the whole split
        self.x = torch.stack([val[s:s + WINDOW] for s in starts]).to(self.device)
        self.y = torch.stack([val[s + 1:s + 1 + WINDOW] for s in starts]).to(self.device)
        # the loop evaluates through its evaluator: this one is the fixed-subset evaluation below
        self.evaluator = SimpleNamespace(batches_per_eval=1, hooks=[], losses=lambda tick=None: self.evaluate(),
                                         evaluate=lambda step, final, tick=None: (self.evaluate(), {}))

    def train_seconds(self) -> float:
        return time.perf_counter() - self.t0 - self.eval_s

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        start = time.perf_counter()
        if self.t0 is None:
            self.t0 = start
        self.model.eval()
        total = 0.0
        for i in range(0, len(self.x), self.eval_batch):
            with self.autocast:
                _, loss = self.model(self.x[i:i + self.eval_batch], self.y[i:i + self.eval_batch])
            total += loss.float().item() * len(self.x[i:i + self.eval_batch])
        self.model.train()
        val = total / len(self.x)
        self.eval_s += time.perf_counter() - start
        self.curve.append((self.step, self.train_seconds(), val))
        if val <= self.target and self.reached is None:
            self.reached = (self.step, self.train_seconds())
            if self.stop:
                raise Reached
        return {"train": val, "val": val}


def run_one(name: str, data: str | None, target: float, eval_every: int, windows: int, sets: dict,
            stop: bool = True) -> dict:
    cfg = load_config(name, {"data": data, "sample_tokens": 0, "eval_interval": eval_every,
                             "log_interval": eval_every, **sets})
    trainer = TimedTrainer(cfg, target, windows, stop, save=False, progress=False, log=lambda m: None)
    try:
        trainer.run()
    except Reached:
        pass
    step, seconds, val = trainer.curve[-1]
    hit_step, hit_s = trainer.reached or (None, None)
    return {"config": name, "reached": trainer.reached is not None, "step": hit_step, "seconds": hit_s,
            "val": val, "end_step": step, "end_seconds": seconds, "max_iters": cfg.train.max_iters,
            "curve": trainer.curve}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", nargs="+", default=["shakespeare-char-cpu", "speedrun-cpu"])
    ap.add_argument("--target", type=float, default=1.886)
    ap.add_argument("--data", default="shakespeare",
                    help="a text file; shakespeare (default): tiny-shakespeare from quill's cache")
    ap.add_argument("--eval-every", type=int, default=50, help="steps between evaluations")
    ap.add_argument("--val-windows", type=int, default=512, help="val windows of 64 tokens evaluated")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for every config")
    ap.add_argument("--curve", action="store_true", help="print every evaluation")
    ap.add_argument("--full", action="store_true", help="train to each schedule's end; note the target on the way")
    args = ap.parse_args()
    data = args.data
    sets = dict(s.split("=", 1) for s in args.set)
    print(f"# time to val loss <= {args.target} ({args.val_windows} val windows of {WINDOW} tokens, "
          f"evaluated every {args.eval_every} steps; evaluation time excluded)")
    print(f"# {machine()}")
    results: dict[str, list[dict]] = {name: [] for name in args.configs}
    for r in range(args.rounds):
        for name in args.configs:
            res = run_one(name, data, args.target, args.eval_every, args.val_windows, sets, not args.full)
            results[name].append(res)
            hit = f"reached at step {res['step']} after {res['seconds']:.1f} s" if res["reached"] else "NOT reached"
            print(f"round {r + 1} {name}: {hit}; val {res['val']:.4f} at step {res['end_step']}/{res['max_iters']}, "
                  f"{res['end_seconds']:.1f} s", flush=True)
            if args.curve:
                print("  " + " ".join(f"{s}:{v:.3f}@{t:.1f}s" for s, t, v in res["curve"]))
    print()
    print(f"Ratios: against the first config's time to {args.target}, or its whole run if it did not get there.")
    print()
    print(f"| config | reached {args.target} | steps to it | time to it (median) | vs first | last val | last step |")
    print("|---|---|---|---|---|---|---|")
    base = None
    for name, runs in results.items():
        hits = [r for r in runs if r["reached"]]
        last_val = statistics.median(r["val"] for r in runs)
        last_step = statistics.median(r["end_step"] for r in runs)
        if len(hits) * 2 > len(runs):  # the median run reached it
            sec = statistics.median(r["seconds"] if r["reached"] else float("inf") for r in runs)
            steps = statistics.median(r["step"] if r["reached"] else float("inf") for r in runs)
            cells = f"{steps:.0f} | {sec:.1f} s"
        else:
            sec = statistics.median(r["end_seconds"] for r in runs)
            cells = f"- | not in {sec:.1f} s"
        base = base or sec
        print(f"| {name} | {len(hits)}/{len(runs)} | {cells} | {sec / base:.2f}x | {last_val:.4f} | {last_step:.0f} |")

if __name__ == "__main__":
    run_main(main)
