"""The machine's memory read bandwidth, the ceiling of batch-1 decoding.

A decode step at batch 1 reads every weight once and does ~2 FLOPs per weight, so on a CPU it is
bound by how fast memory can be read: tokens/s <= bandwidth / bytes of weights per token. This
script measures that bandwidth the way a decode step reads weights: one pass over a float32
tensor much larger than the caches (default 1 GiB), reduced (summed) so that nothing is written,
with one thread and with --threads. Each figure is the median of --repeats passes after one
warm-up; `benchmarks/generate.py` divides by the same measurement (`read_bandwidth`).

    flock /tmp/quill-bench.lock .venv/bin/python benchmarks/bandwidth.py --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository: benchmarks.machine

import torch  # noqa: E402

from benchmarks.machine import cpu_name  # noqa: E402


def read_bandwidth(gigabytes: float = 1.0, repeats: int = 5) -> float:
    """Bytes per second of one reducing pass over a `gigabytes` GiB float32 tensor."""
    x = torch.ones(int(gigabytes * 2**30) // 4)
    x.sum()  # warm-up: pages touched, threads started

    def timed() -> float:
        t0 = time.perf_counter()
        x.sum()
        return time.perf_counter() - t0

    return x.numel() * 4 / statistics.median(timed() for _ in range(repeats))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gigabytes", type=float, default=1.0, help="size of the tensor read (GiB)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args()
    threads = args.threads or torch.get_num_threads()
    print(f"machine: {cpu_name()}; torch {torch.__version__}")
    print("| threads | read bandwidth GB/s |\n| ---: | ---: |")
    for n in sorted({1, threads}):
        torch.set_num_threads(n)
        print(f"| {n} | {read_bandwidth(args.gigabytes, args.repeats) / 1e9:.1f} |", flush=True)


if __name__ == "__main__":
    main()
