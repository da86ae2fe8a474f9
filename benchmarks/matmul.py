"""How fast this CPU multiplies matrices: GFLOP/s of square matrix products, fp32 and bf16.

The docs compare machines by this figure (a CPU without native bf16 emulates it, and is slower
in bf16 than in fp32). Each size is timed `--rounds` times (fp32 and bf16 taking turns), each
round the median of enough products to fill about 0.2 s; the table gives the medians.

    python benchmarks/matmul.py [--sizes 512 1024 2048] [--rounds 5] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path[0] = str(Path(__file__).resolve().parent.parent)

from benchmarks.machine import cpu_name  # noqa: E402


def gflops(n: int, dtype: torch.dtype, seconds: float = 0.2) -> float:
    """GFLOP/s of one n x n by n x n product in `dtype`: the median over a burst of products
    that takes about `seconds` (after one warm-up product)."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(dtype)
    b = torch.randn(n, n, generator=g).to(dtype)
    out = torch.empty(n, n, dtype=dtype)
    torch.mm(a, b, out=out)
    times: list[float] = []
    start = time.perf_counter()
    while time.perf_counter() - start < seconds or len(times) < 3:
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times) / 1e9


def measure(sizes: list[int], rounds: int) -> dict[tuple[int, str], float]:
    """Median GFLOP/s per (size, dtype name) over `rounds` alternating rounds."""
    got: dict[tuple[int, str], list[float]] = {}
    for _ in range(rounds):
        for n in sizes:
            for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
                got.setdefault((n, name), []).append(gflops(n, dtype))
    return {k: statistics.median(v) for k, v in got.items()}


def native_bf16() -> bool:
    from quillgpt.runtime import native_bfloat16

    return native_bfloat16(torch.device("cpu"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 2048])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    args = parser.parse_args(argv)
    if args.rounds < 1 or any(n < 1 for n in args.sizes) or (args.threads is not None and args.threads < 1):
        print("matmul.py: --sizes, --rounds and --threads must be at least 1", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"machine: {cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"native bf16: {native_bf16()}")
    result = measure(args.sizes, args.rounds)
    print(f"square matrix products, median of {args.rounds} rounds\n")
    print("| n | float32 GFLOP/s | bfloat16 GFLOP/s | bf16 / fp32 |")
    print("| ---: | ---: | ---: | ---: |")
    for n in args.sizes:
        fp32, bf16 = result[(n, "float32")], result[(n, "bfloat16")]
        print(f"| {n} | {fp32:,.0f} | {bf16:,.0f} | {bf16 / fp32:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
