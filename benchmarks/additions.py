"""Additions as chat data: SFT conversations, RL tasks and held-out tasks (docs/rl.md).

    python benchmarks/additions.py --out data/add
    python benchmarks/additions.py --out data/add3 --three-digit 100

writes, in OpenAI's messages shape, one per line:

- `sft.jsonl`: conversations for `quill sft`,
      {"messages": [{"role": "user", "content": "Add 37 and 58."}, {"role": "assistant", "content": "95"}]}
- `rl.jsonl`: tasks for `quill rl`, the prompt and its answer,
      {"messages": [{"role": "user", "content": "Add 37 and 58."}], "answer": "95"}
- `test.jsonl`: held-out tasks, sums of pairs that appear in neither file above.

Operands are 2-digit (10-99); the user asks in one of a few phrasings. With `--three-digit N`,
`sft.jsonl` also holds N conversations with 3-digit operands (100-999), and `rl3.jsonl` /
`test3.jsonl` hold 3-digit tasks (the held-out ones again unseen): a skill the demonstrations
barely show. Deterministic for a given --seed. No torch needed.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

PHRASINGS = ("Add {a} and {b}.", "What is {a} plus {b}?", "{a} + {b} =")


def pairs(low: int, high: int) -> list[tuple[int, int]]:
    return [(a, b) for a in range(low, high + 1) for b in range(low, high + 1)]


def prompt(a: int, b: int, rng: random.Random) -> list[dict]:
    return [{"role": "user", "content": rng.choice(PHRASINGS).format(a=a, b=b)}]


def conversation(a: int, b: int, rng: random.Random) -> dict:
    return {"messages": prompt(a, b, rng) + [{"role": "assistant", "content": str(a + b)}]}


def task(a: int, b: int, rng: random.Random) -> dict:
    return {"messages": prompt(a, b, rng), "answer": str(a + b)}


def split(all_pairs: list[tuple[int, int]], n_test: int, rng: random.Random
          ) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(training pairs, held-out pairs): a pair and its mirror image are on the same side."""
    canon = sorted({(min(a, b), max(a, b)) for a, b in all_pairs})
    rng.shuffle(canon)
    held = set(canon[:n_test])
    test = list(canon[:n_test])
    train = [(a, b) for a, b in all_pairs if (min(a, b), max(a, b)) not in held]
    return train, test


def write(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="directory for the .jsonl files")
    p.add_argument("--sft", type=int, default=8000, help="2-digit SFT conversations (default 8000)")
    p.add_argument("--rl", type=int, default=4000, help="RL tasks per file (default 4000)")
    p.add_argument("--test", type=int, default=200, help="held-out tasks per file (default 200)")
    p.add_argument("--three-digit", type=int, default=0, metavar="N",
                   help="also N 3-digit SFT conversations, and rl3.jsonl / test3.jsonl")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    rng = random.Random(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    train2, test2 = split(pairs(10, 99), args.test, rng)
    sft = [conversation(*rng.choice(train2), rng) for _ in range(args.sft)]
    write(args.out / "rl.jsonl", [task(*rng.choice(train2), rng) for _ in range(args.rl)])
    write(args.out / "test.jsonl", [task(a, b, rng) for a, b in test2])
    said = f"{len(sft)} 2-digit SFT conversations, {args.rl} RL tasks, {len(test2)} held-out tasks"
    if args.three_digit:
        three = [(rng.randint(100, 999), rng.randint(100, 999)) for _ in range(args.rl + args.test + args.three_digit)]
        test3 = {(min(a, b), max(a, b)) for a, b in three[: args.test]}
        rest = [(a, b) for a, b in three[args.test:] if (min(a, b), max(a, b)) not in test3]
        sft += [conversation(a, b, rng) for a, b in rest[: args.three_digit]]
        write(args.out / "rl3.jsonl", [task(a, b, rng) for a, b in rest[args.three_digit:]])
        write(args.out / "test3.jsonl", [task(a, b, rng) for a, b in sorted(test3)])
        said += f"; {args.three_digit} 3-digit SFT conversations, rl3.jsonl and test3.jsonl"
    rng.shuffle(sft)
    write(args.out / "sft.jsonl", sft)
    print(f"{said} in {args.out}")


if __name__ == "__main__":
    main()
