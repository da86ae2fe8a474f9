"""The data pipeline's targets: `quill prepare` of a ~300 MB corpus with the GPT-2 tokenizer (peak
memory, MB/s, parallel against one process) and the data-loading share of a training step.

1. Generates a corpus in /tmp (tiny-shakespeare's lines, shuffled with a fixed seed, repeated to
   --megabytes; deleted at the end) and runs `quill prepare --tokenizer gpt2` on it with
   `--workers 1` (the baseline: one process) and with every core, alternating, --repeats times.
   Peak memory is sampled every 20 ms over the whole process tree (the sum of the processes'
   RSS, an upper bound: forked workers share pages with the parent) and the largest single
   process (ru_maxrss).
2. For the `shakespeare-char-cpu` preset (batch 12 x 64 tokens, 4 layers of 128, fp32):
   the median time of `BatchSampler.next()` on the memory-mapped train.bin against the median
   time of a whole training step (forward, backward, AdamW) of the preset's model, and the core's
   former in-memory sampler for comparison.

    flock /tmp/quill-bench.lock python benchmarks/data.py [--megabytes 300] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.machine import cpu_name  # noqa: E402
from benchmarks.script import run_main, text_file  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"


def machine() -> str:
    cpu = cpu_name()
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"


def _busy(n: int) -> int:
    s = 0
    for i in range(n):
        s += i * i
    return s


def parallel_ceiling(processes: int, n: int = 10_000_000) -> float:
    """Speed-up of `processes` processes over one on trivially parallel work, measured now: what a
    shared machine lets any program reach (1.0 when other work holds all but one core)."""
    import multiprocessing

    start = time.perf_counter()
    for _ in range(processes):
        _busy(n)
    one = time.perf_counter() - start
    start = time.perf_counter()
    with multiprocessing.get_context("fork").Pool(processes) as pool:
        pool.map(_busy, [n] * processes)
    return one / (time.perf_counter() - start)


def make_corpus(path: Path, megabytes: float, shakespeare: Path) -> int:
    """Shuffled tiny-shakespeare lines (seeded), written until the file holds `megabytes` MB."""
    lines = shakespeare.read_text(encoding="utf-8").splitlines(keepends=True)
    rng = random.Random(0)
    target = int(megabytes * 1e6)
    size = 0
    with open(path, "w", encoding="utf-8") as f:
        while size < target:
            rng.shuffle(lines)
            block = "".join(lines)
            f.write(block)
            size += len(block.encode("utf-8"))
    return size


def tree_rss_kb(root: int) -> int:
    """Sum of VmRSS over `root` and its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(entry))
        except (OSError, IndexError, ValueError):
            continue
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        stack.extend(children.get(pid, []))
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total


def run_prepare(corpus: Path, out: Path, workers: int, env: dict[str, str]) -> dict:
    cmd = [sys.executable, "-m", "quillgpt", "prepare", "--data", str(corpus), "--tokenizer", "gpt2",
           "--out", str(out), "--workers", str(workers), "--no-progress", "--overwrite"]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, tree_rss_kb(proc.pid))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, err = proc.communicate()
    wall = time.perf_counter() - start
    done.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"quill prepare failed:\n{err}")
    return {"wall": wall, "tree_mb": peak / 1024, "line": err.strip().splitlines()[-1]}


def bench_prepare(args: argparse.Namespace, shakespeare: Path) -> None:
    from quillgpt.prepare import load_prepared

    tmp = Path(tempfile.mkdtemp(prefix="quill-bench-data-", dir="/tmp"))
    try:
        cache = tmp / "cache"
        cache.mkdir()
        ranks = SHARED / "gpt2.tiktoken"
        if ranks.is_file():
            shutil.copy(ranks, cache / "gpt2.tiktoken")
        env = dict(os.environ, QUILL_CACHE=str(cache), PYTHONPATH=str(ROOT))
        corpus = tmp / "corpus.txt"
        size = make_corpus(corpus, args.megabytes, shakespeare)
        cores = os.cpu_count() or 1
        print(f"corpus: {size / 1e6:.1f} MB of shuffled tiny-shakespeare lines; GPT-2 tokenizer; "
              f"{args.repeats} runs each, alternating\n")
        results: dict[int, list[dict]] = {w: [] for w in sorted({1, *args.workers, cores})}
        for _ in range(args.repeats):
            for workers in results:
                results[workers].append(run_prepare(corpus, tmp / f"out-{workers}", workers, env))
        children_max_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        _, train, val, meta = load_prepared(tmp / f"out-{cores}")
        same = all((tmp / "out-1" / name).read_bytes() == (tmp / f"out-{cores}" / name).read_bytes()
                   for name in ("train.bin", "val.bin"))
        ceilings = [parallel_ceiling(cores) for _ in range(3)]
        base = statistics.median(r["wall"] for r in results[1])
        print("| processes | median wall (s) | MB/s | speed-up vs 1 process | peak RSS, process tree (MB) |")
        print("| --- | --- | --- | --- | --- |")
        for workers, rows in results.items():
            wall = statistics.median(r["wall"] for r in rows)
            peak = max(r["tree_mb"] for r in rows)
            print(f"| {workers} | {wall:.1f} | {size / 1e6 / wall:.1f} | {base / wall:.2f}x | {peak:.0f} |")
        print(f"\nlargest single process (ru_maxrss): {children_max_mb:.0f} MB")
        print(f"the machine's parallel ceiling now ({cores} processes of a pure-Python busy loop vs 1, "
              f"3 runs): {', '.join(f'{c:.2f}x' for c in ceilings)}")
        print(f"tokens: {meta['train_tokens']:,} train + {meta['val_tokens']:,} val ({meta['dtype']}); "
              f"1-process and {cores}-process outputs identical: {same}")
        print(f"quill's own line ({cores} processes): {results[cores][-1]['line']}\n")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def median_ms(fn, n: int) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def bench_loading(args: argparse.Namespace, shakespeare: Path) -> None:
    import numpy as np
    import torch

    from quillgpt.config import load_config
    from quillgpt.data import BatchSampler, prepare_training_data
    from quillgpt.registry import build_model

    os.environ["QUILL_CACHE"] = tempfile.mkdtemp(prefix="quill-bench-cache-", dir="/tmp")
    try:
        cfg = load_config("shakespeare-char-cpu", {"data": str(shakespeare)})
        tokenizer, splits = prepare_training_data(cfg)
        cfg.model.vocab_size = tokenizer.vocab_size
        t, block = cfg.train, cfg.model.block_size
        sampler = BatchSampler(splits.train, block, t.batch_size, t.seed)

        data = torch.from_numpy(np.array(splits.train).astype(np.int64))  # the core's former sampler
        g = torch.Generator().manual_seed(t.seed)

        def in_memory():
            starts = torch.randint(len(data) - block, (t.batch_size,), generator=g)
            return data[starts[:, None] + torch.arange(block + 1)]

        torch.manual_seed(0)
        model = build_model(cfg.model)
        opt = torch.optim.AdamW(model.parameters(), lr=t.learning_rate, betas=(t.beta1, t.beta2))

        def step():
            x, y = sampler.next()
            _, loss = model(x, y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)

        for _ in range(10):
            step()
        rounds = {"memmap": [], "in_memory": [], "step": []}
        for _ in range(args.rounds):
            rounds["memmap"].append(median_ms(sampler.next, 200))
            rounds["in_memory"].append(median_ms(in_memory, 200))
            rounds["step"].append(median_ms(step, 20))
        mm, mem, st = (statistics.median(rounds[k]) for k in ("memmap", "in_memory", "step"))
        print(f"shakespeare-char-cpu: batch {t.batch_size} x {block} tokens, {args.rounds} rounds, "
              f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
        print("| what | median ms | share of a training step |")
        print("| --- | --- | --- |")
        print(f"| BatchSampler.next() on np.memmap (train.bin) | {mm:.3f} | {100 * mm / st:.3f}% |")
        print(f"| the core's in-memory sampler (int64 tensor in RAM) | {mem:.3f} | {100 * mem / st:.3f}% |")
        print(f"| whole training step (batch + forward + backward + AdamW) | {st:.1f} | 100% |")
    finally:
        shutil.rmtree(os.environ["QUILL_CACHE"], ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="shakespeare",
                        help="a text file; shakespeare (default): tiny-shakespeare from quill's cache")
    parser.add_argument("--megabytes", type=float, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--workers", type=int, nargs="*", default=[2],
                        help="process counts to time besides 1 and all cores")
    parser.add_argument("--skip-prepare", action="store_true")
    args = parser.parse_args()
    shakespeare = text_file(args.data)
    print(f"machine: {machine()}\n")
    if not args.skip_prepare:
        bench_prepare(args, shakespeare)
    bench_loading(args, shakespeare)


if __name__ == "__main__":
    run_main(main)
