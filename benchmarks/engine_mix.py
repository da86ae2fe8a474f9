"""Where mixed requests cost the decode engine: the same load, in process (no server), with the
sampling settings mixed, the lengths mixed, both, or neither (docs/serve.md).

    flock /tmp/quill-bench.lock .venv/bin/python benchmarks/engine_mix.py --run runs/shakespeare-char-cpu

`--requests` rows queue for an engine of `--rows` slots (a row joins when one leaves, as a
server's requests do). "identical": every row temperature 0.8, top-k 40, `--tokens` new tokens.
"mixed settings": each row its own temperature (greedy included), top-k, top-p, min-p and
repetition penalty, the same length. "mixed lengths": identical settings, lengths of half, one and
one and a half times `--tokens` (the same total). "both": as benchmarks/serve_load.py's mixed
load (its `sampling_settings` and prompts). Generated tokens/s, median of `--rounds`, and the ratio to identical.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parent.parent)

from benchmarks.machine import cpu_name  # noqa: E402
from benchmarks.script import run_main  # noqa: E402
from benchmarks.serve_load import PROMPTS, sampling_settings  # noqa: E402

LOADS = {"identical": (False, False), "mixed settings": (True, False), "mixed lengths": (False, True),
         "both": (True, True)}


def requests(tokenizer, n: int, tokens: int, mixed_settings: bool, mixed_lengths: bool, seed: int = 0) -> list:
    from quillgpt.engine import Request
    from quillgpt.generate import start_ids
    from quillgpt.sampling import Sampling

    rng = random.Random(seed)
    out = []
    for i in range(n):
        api = sampling_settings(rng, tokens, mixed_settings, mixed_lengths)
        sampling = Sampling(temperature=api["temperature"], top_k=api["top_k"], top_p=api.get("top_p"),
                            min_p=api.get("min_p"), repetition_penalty=api.get("repetition_penalty") or 1.0,
                            max_new_tokens=api["max_tokens"], seed=i)
        prompt = tokenizer.encode(rng.choice(PROMPTS)) or start_ids(tokenizer)  # "" starts as the server's does
        out.append(Request(prompt, sampling))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="a run directory (a char run: the prompts are English)")
    p.add_argument("--requests", type=int, default=192, help="rows queued per load (default 192)")
    p.add_argument("--rows", type=int, default=16, help="the engine's slots (default 16)")
    p.add_argument("--tokens", type=int, default=48, help="new tokens of a row (mixed: half to 1.5x; default 48)")
    p.add_argument("--rounds", type=int, default=5, help="rounds of the four loads, interleaved (median)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    if min(args.requests, args.rows, args.tokens, args.rounds, args.threads) < 1:
        raise ValueError("--requests, --rows, --tokens, --rounds and --threads must be at least 1")
    import torch

    from quillgpt.checkpoint import load_run
    from quillgpt.engine import complete

    torch.set_num_threads(args.threads)
    run = load_run(args.run)
    speeds: dict[str, list[float]] = {name: [] for name in LOADS}
    for _ in range(args.rounds):
        for name, (settings, lengths) in LOADS.items():
            reqs = requests(run.tokenizer, args.requests, args.tokens, settings, lengths)
            start = time.perf_counter()
            done = complete(run.model, run.tokenizer, reqs, max_rows=args.rows)
            speeds[name].append(sum(len(c.ids) for c in done) / (time.perf_counter() - start))
    base = statistics.median(speeds["identical"])
    print(f"{cpu_name()}, {args.threads} threads, torch {torch.__version__}; {args.run}: {args.requests} rows "
          f"through {args.rows} slots, {args.tokens} new tokens; median of {args.rounds}")
    print("| load | generated tokens/s | vs identical |\n| --- | ---: | ---: |")
    for name, values in speeds.items():
        print(f"| {name} | {statistics.median(values):,.0f} | {statistics.median(values) / base:.2f}x |")
    return 0


if __name__ == "__main__":
    run_main(main)
