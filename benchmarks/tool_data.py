"""Multiplications of 3-5 digit numbers as chat data, with calculator calls and with answers
alone (docs/tools.md; benchmarks/tools.py measures what the calls buy).

    python benchmarks/tool_data.py --out out/tools

writes, in OpenAI's shapes, one per line:

- `tool_chats.jsonl`: "What is 4821 times 37?" answered by a calculator call, its result and the
  answer, with the calculator's definition as the line's `tools` (for `quill sft`);
- `plain_chats.jsonl`: the same questions answered alone;
- `test.jsonl`: held-out questions (pairs in neither file) and their answers;
- `tokenizer.json`: a byte-level BPE tokenizer learnt on the tool conversations, whose merges
  cross words (the tool list becomes one token) and never enter a number (each digit is its own
  token): `quill sft --tokenizer out/tools/tokenizer.json`.

Deterministic for a given --seed. No torch needed.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parent.parent)

from benchmarks.script import run_main  # noqa: E402

PHRASINGS = ("What is {a} times {b}?", "{a} * {b} =", "Multiply {a} by {b}.", "{a} x {b}?")
VOCAB = 600  # byte-level BPE: the tool list and the phrasings become a few tokens; digits stay one each


def calculator_definition() -> dict:
    """The built-in calculator's definition, as `quill chat --tools calculator` lists it."""
    from quillgpt.tools import BUILTINS  # plain Python: no torch

    return BUILTINS["calculator"].definition()


def operand(rng: random.Random) -> int:
    digits = rng.randint(3, 5)
    return rng.randint(10 ** (digits - 1), 10**digits - 1)


def question(a: int, b: int, rng: random.Random) -> dict:
    return {"role": "user", "content": rng.choice(PHRASINGS).format(a=a, b=b)}


def with_calculator(a: int, b: int, rng: random.Random, i: int) -> dict:
    call = {"id": f"call_{i}", "type": "function",
            "function": {"name": "calculator", "arguments": json.dumps({"expression": f"{a}*{b}"})}}
    return {"messages": [question(a, b, rng), {"role": "assistant", "content": None, "tool_calls": [call]},
                         {"role": "tool", "tool_call_id": f"call_{i}", "content": str(a * b)},
                         {"role": "assistant", "content": str(a * b)}],
            "tools": [calculator_definition()]}


def write_data(out: Path, n_train: int, n_test: int, seed: int) -> dict[str, Path]:
    """The three files (module docstring); the same questions in both training files."""
    rng = random.Random(seed)
    test_pairs: list[tuple[int, int]] = []
    while len(test_pairs) < n_test:
        test_pairs.append((operand(rng), operand(rng)))
    held = set(test_pairs)
    train_pairs = []
    while len(train_pairs) < n_train:
        pair = (operand(rng), operand(rng))
        if pair not in held:
            train_pairs.append(pair)
    out.mkdir(parents=True, exist_ok=True)
    files = {"tools": out / "tool_chats.jsonl", "plain": out / "plain_chats.jsonl", "test": out / "test.jsonl"}
    tool_rows, plain_rows = [], []
    for i, (a, b) in enumerate(train_pairs):
        state = rng.getstate()
        tool_rows.append(with_calculator(a, b, rng, i))
        rng.setstate(state)  # the same phrasing in both files
        plain_rows.append({"messages": [question(a, b, rng), {"role": "assistant", "content": str(a * b)}]})
    test_rows = [{"messages": [question(a, b, rng)], "answer": str(a * b)} for a, b in test_pairs]
    for key, rows in (("tools", tool_rows), ("plain", plain_rows), ("test", test_rows)):
        files[key].write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return files


def write_tokenizer(data: Path, out: Path, sample: int = 3000) -> Path:
    """A byte-level BPE tokenizer of VOCAB tokens learnt on the first `sample` lines of `data`
    (the tool list, the messages' text and the calls, as `quill sft` reads them), merging across
    words (the tool list becomes one token) and never inside a number (each digit is its own
    token, so copying a number is copying digits). Both models use it."""
    from quillgpt.tokenizers.bpe import ByteBPETokenizer  # no torch

    parts = []
    for line in data.read_text(encoding="utf-8").splitlines()[:sample]:
        row = json.loads(line)
        parts += [json.dumps(t, ensure_ascii=False) for t in row.get("tools", [])]
        for m in row["messages"]:
            parts.append(m["content"] or "")
            parts += [f"{c['function']['name']} {c['function']['arguments']}" for c in m.get("tool_calls", [])]
    ByteBPETokenizer.train("\n".join(parts), VOCAB, within_words=False, no_merge="0123456789").save(out)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="directory for the files")
    p.add_argument("--train", type=int, default=50_000, help="training conversations per file (default 50000)")
    p.add_argument("--test", type=int, default=500, help="held-out questions (default 500)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    files = write_all(args.out, args.train, args.test, args.seed)
    print(f"wrote {files['tools']}, {files['plain']} ({args.train} conversations each), {files['test']} "
          f"({args.test} held out), {files['tokenizer']}", file=sys.stderr)
    return 0


def write_all(out: Path, n_train: int, n_test: int, seed: int) -> dict[str, Path]:
    """The data and the tokenizer (module docstring); ValueError for sizes that make no data."""
    if n_train < 2 or n_test < 1:
        raise ValueError("--train must be at least 2 and --test at least 1")
    files = write_data(out, n_train, n_test, seed)
    files["tokenizer"] = write_tokenizer(files["tools"], out / "tokenizer.json")
    return files


if __name__ == "__main__":
    run_main(main)
