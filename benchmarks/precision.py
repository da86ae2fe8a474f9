"""Accuracy of bfloat16 and int8 weights against float32, on a trained run.

1. Perplexity on held-out text with `quill eval`'s sliding windows (stride half the context),
   for float32, bfloat16 and int8 (`load_run(run, dtype=...)`), and each as a change from fp32.
2. Greedy continuations (temperature 0, --new-tokens tokens) of a fixed set of prompts: for
   every prompt, the first position where the bf16 / int8 continuation leaves fp32's
   (none: identical throughout).

    python benchmarks/precision.py RUN --data HELD_OUT.txt [--max-tokens 100000] [--new-tokens 200]

Targets (issue): perplexity within 0.5% of fp32 for bf16 and 2% for int8.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parent.parent)  # the repository, not this folder

import torch  # noqa: E402

from benchmarks.machine import cpu_name  # noqa: E402
from quillgpt.checkpoint import load_run  # noqa: E402
from quillgpt.data import read_text  # noqa: E402
from quillgpt.errors import QuillError  # noqa: E402
from quillgpt.evaluate import evaluate_text  # noqa: E402
from quillgpt.generate import encode_prompt, generate_ids  # noqa: E402

DTYPES = ("float32", "bfloat16", "int8")
PROMPTS = ["ROMEO:", "JULIET:\n", "First Citizen:\n", "KING HENRY VI:\nWhat", "To be, or not to be",
           "O", "\n", "Thou art", "MENENIUS:\nI tell you, friends,", "The king"]


def first_divergence(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)


def encodes(tokenizer, text: str) -> bool:
    """Whether the tokenizer can encode `text` (a char tokenizer knows only its training characters)."""
    try:
        tokenizer.encode(text)
    except QuillError:
        return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run")
    parser.add_argument("--data", required=True, help="held-out text")
    parser.add_argument("--max-tokens", type=int, default=100_000, help="score the first N tokens")
    parser.add_argument("--new-tokens", type=int, default=200)
    args = parser.parse_args()
    text = read_text(args.data)
    print(f"machine: {cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    runs = {d: load_run(args.run, dtype=d) for d in DTYPES}
    tok, block = runs["float32"].tokenizer, runs["float32"].config.model.block_size
    results = {d: evaluate_text(r.model, r.tokenizer, text, max_tokens=args.max_tokens, progress=False)
               for d, r in runs.items()}
    base = results["float32"].perplexity
    print(f"\n{args.run}: {results['float32'].scored:,} tokens of {args.data} scored "
          f"(windows of {block}, stride {results['float32'].stride})\n")
    print("| dtype | perplexity | vs float32 | bits per byte |")
    print("| --- | ---: | ---: | ---: |")
    for d, r in results.items():
        print(f"| {d} | {r.perplexity:.4f} | {r.perplexity / base - 1:+.3%} | {r.bits_per_byte:.4f} |")

    prompts = [p for p in PROMPTS if encodes(tok, p)]
    conts = {}
    for d, r in runs.items():
        conts[d] = [generate_ids(r.model, torch.tensor([encode_prompt(tok, p, block)]), args.new_tokens,
                                 temperature=0)[0, -args.new_tokens:].tolist() for p in prompts]
    print(f"\ngreedy, {args.new_tokens} new tokens, {len(prompts)} prompts: first position where the "
          "continuation leaves float32's (- = identical)\n")
    print("| prompt | " + " | ".join(DTYPES[1:]) + " |")
    print("| --- | " + " | ".join("---:" for _ in DTYPES[1:]) + " |")
    for i, p in enumerate(prompts):
        cells = []
        for d in DTYPES[1:]:
            pos = first_divergence(conts["float32"][i], conts[d][i])
            cells.append("-" if pos is None else str(pos))
        print(f"| {p!r} | " + " | ".join(cells) + " |")
    for d in DTYPES[1:]:
        same = sum(first_divergence(a, b) is None for a, b in zip(conts["float32"], conts[d]))
        print(f"{d}: {same} of {len(prompts)} continuations identical to float32's")


if __name__ == "__main__":
    main()
