"""A conversation set for a skill a base model does not have: spelling a word backwards.

    python benchmarks/reverse_words.py --out out/reverse [--words shakespeare | FILE | random]

writes `train.jsonl` and `test.jsonl` in OpenAI's messages shape, one conversation per line:

    {"messages": [{"role": "user", "content": "reverse: tyrant"}, {"role": "assistant", "content": "tnaryt"}]}

The words (lower-case, 3 to 8 letters) come from tiny-shakespeare (quill's cached copy, downloaded
once into $QUILL_CACHE), a text file of yours, or are random letters (`--words random`). The held-
out test words never appear in the training set, so a model can only answer them by having learnt
the skill. A third of the conversations open with a system message, and the user asks in one of a
few phrasings. Deterministic for a given --seed. No torch needed.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import string
import sys
from pathlib import Path

# the repository instead of this folder, so that `benchmarks.script` imports from any directory
sys.path[0] = str(Path(__file__).resolve().parent.parent)

from benchmarks.script import SHAKESPEARE, run_main, text_file  # noqa: E402

PHRASINGS = ("reverse: {w}", "Reverse the word {w}", "{w} backwards?")
SYSTEM = "Reverse words."


def words_from(source: str, rng: random.Random, n: int) -> list[str]:
    """Distinct lower-case words of 3 to 8 letters: from a text, or random letters."""
    if source != "random":
        text = text_file(source).read_text(encoding="utf-8").lower()
        return sorted(set(re.findall(r"\b[a-z]{3,8}\b", text)))
    out: set[str] = set()
    while len(out) < n:
        out.add("".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 8))))
    return sorted(out)


def conversation(word: str, rng: random.Random) -> dict:
    messages = [{"role": "user", "content": rng.choice(PHRASINGS).format(w=word)},
                {"role": "assistant", "content": word[::-1]}]
    if rng.random() < 1 / 3:
        messages.insert(0, {"role": "system", "content": SYSTEM})
    return {"messages": messages}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--words", default=SHAKESPEARE,
                   help="where the words come from: shakespeare (default: tiny-shakespeare from quill's cache), "
                        "a text file, or random (random letters)")
    p.add_argument("--out", type=Path, required=True, help="directory for train.jsonl and test.jsonl")
    p.add_argument("--test-words", type=int, default=200, help="held-out words (default 200)")
    p.add_argument("--train", type=int, default=20000, help="training conversations (default 20000)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.train < 1 or args.test_words < 1:
        p.error("--train and --test-words must be at least 1")
    rng = random.Random(args.seed)
    words = words_from(args.words, rng, args.train + args.test_words)
    rng.shuffle(words)
    test, train = words[: args.test_words], words[args.test_words:]
    if not train:
        raise ValueError(f"{args.words}: {len(words)} distinct words of 3 to 8 letters, none left for training "
                         f"after {args.test_words} held out")
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "train.jsonl", "w", encoding="utf-8") as f:
        for _ in range(args.train):  # training words repeat, with other phrasings
            f.write(json.dumps(conversation(rng.choice(train), rng)) + "\n")
    with open(args.out / "test.jsonl", "w", encoding="utf-8") as f:
        for w in test:
            f.write(json.dumps(conversation(w, rng)) + "\n")
    print(f"{len(train)} training words, {args.train} training conversations; {len(test)} held-out "
          f"words in {args.out / 'test.jsonl'}")
    return 0


if __name__ == "__main__":
    run_main(main)
