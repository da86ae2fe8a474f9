"""Training throughput by --dtype and --compile, against fp32 eager measured in the same run.

For each preset shape (`shakespeare-char-cpu`, `shakespeare-char`) it builds the real Trainer
(same model, AdamW, grad clipping, data sampler) and times its `train_step` for every variant:
float32 eager (the baseline), bfloat16 eager, float32 + torch.compile, bfloat16 + torch.compile.
Rounds alternate between the variants; the table gives the median ms/step over all timed steps
and tokens/s, and the speed-up over fp32 eager.

    flock /tmp/quill-bench.lock python benchmarks/train.py [--rounds 2] [--steps 5] [--large-batch 16]

The larger preset's batch of 64 x 256 tokens takes seconds per step on a 2-core CPU; the
benchmark keeps its model and context but uses --large-batch sequences per step (default 16),
which is noted in the table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.machine import cpu_name  # noqa: E402
from benchmarks.script import run_main  # noqa: E402
from quillgpt.config import load_config  # noqa: E402
from quillgpt.metrics import format_flops  # noqa: E402
from quillgpt.train import Trainer  # noqa: E402

VARIANTS = [("float32", False), ("bfloat16", False), ("float32", True), ("bfloat16", True)]


def machine() -> str:
    cpu = cpu_name()
    bf16 = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return (f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
            f"native bf16: {'yes' if bf16 else 'no'}")


def make_trainer(preset: str, data: str, dtype: str, compile: bool, batch: int | None) -> Trainer:
    overrides = {"data": data, "dtype": dtype, "compile": compile, "device": "cpu", "sample_tokens": 0}
    if batch:
        overrides["batch_size"] = batch
    cfg = load_config(preset, overrides)
    return Trainer(cfg, save=False, progress=False, log=lambda m: None)


def time_steps(trainer: Trainer, start: int, steps: int) -> list[float]:
    times = []
    for i in range(steps):
        t0 = time.perf_counter()
        loss, _ = trainer.train_step(start + i)
        loss.item()
        times.append(time.perf_counter() - t0)
    return times


def bench_preset(preset: str, data: str, rounds: int, steps: int, batch: int | None) -> None:
    trainers = {}
    compile_s = {}
    for dtype, comp in VARIANTS:
        tr = make_trainer(preset, data, dtype, comp, batch)
        t0 = time.perf_counter()
        time_steps(tr, 0, 2)  # warm-up; compiles the compiled variants
        compile_s[(dtype, comp)] = time.perf_counter() - t0
        trainers[(dtype, comp)] = tr
    times: dict[tuple[str, bool], list[float]] = {k: [] for k in trainers}
    for r in range(rounds):
        for key, tr in trainers.items():
            times[key] += time_steps(tr, 2 + r * steps, steps)
    t = next(iter(trainers.values()))
    cfg = t.cfg
    tokens = cfg.train.batch_size * cfg.train.gradient_accumulation_steps * cfg.model.block_size
    base = statistics.median(times[("float32", False)])
    m = cfg.model
    print(f"\n{preset}: {t.n_params / 1e6:.2f}M parameters, n_layer {m.n_layer}, n_embd {m.n_embd}, "
          f"block {m.block_size}, batch {cfg.train.batch_size}"
          f"{' (preset: ' + str(load_config(preset).train.batch_size) + ')' if batch else ''}, "
          f"{tokens} tokens/step; median of {rounds} x {steps} steps")
    print("| dtype | compile | ms / step | tokens/s | model FLOP/s | speed-up vs fp32 eager "
          "| first 2 steps (s) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for key in trainers:
        med = statistics.median(times[key])
        tps = tokens / med
        flops = format_flops(tps * trainers[key].recorder.flops_per_token)  # no MFU: a CPU has no documented peak
        print(f"| {key[0]} | {'yes' if key[1] else 'no'} | {1000 * med:.1f} | {tps:,.0f} | "
              f"{flops} | {base / med:.2f}x | {compile_s[key]:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="shakespeare",
                        help="a text file; shakespeare (default): tiny-shakespeare from quill's cache")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant per round "
                                                              "(the larger preset uses a third)")
    parser.add_argument("--large-batch", type=int, default=16)
    parser.add_argument("--only", choices=["shakespeare-char-cpu", "shakespeare-char"])
    args = parser.parse_args()
    print(f"machine: {machine()}")
    print(f"load average at the start (1, 5, 15 min): {os.getloadavg()}")
    print("no GPU in this run: CPU figures only")
    if args.only != "shakespeare-char":
        bench_preset("shakespeare-char-cpu", args.data, args.rounds, args.steps, None)
    if args.only != "shakespeare-char-cpu":
        bench_preset("shakespeare-char", args.data, args.rounds, max(2, args.steps // 3), args.large_batch)
    # eager PyTorch on 2 OpenMP threads slows down badly when other processes compete for the
    # cores; the load average says whether they did
    print(f"\nload average at the end (1, 5, 15 min): {os.getloadavg()}")


if __name__ == "__main__":
    run_main(main)
