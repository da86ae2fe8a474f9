"""Builds the offline tasks' data from data/sonnets.jsonl (13 of Shakespeare's sonnets, none of
them in tiny-shakespeare, which holds plays): run `python tests/lm_eval_tasks/make_data.py` to
rebuild verse_choice.jsonl, verse_lastword.jsonl and verse_repeat.jsonl (fixed seed: the same
files every time).

    verse_choice    multiple choice: after a line, which is the next line? The true one, its words
                    shuffled, its letters shuffled inside each word, or a line of another sonnet
    verse_lastword  the last word of each line after the sonnet so far (LAMBADA's form):
                    its log-likelihood and whether greedy decoding finds it
    verse_repeat    generation: a three-word phrase twice, then its first word; complete the phrase
"""

from __future__ import annotations

import json
import random
from pathlib import Path

DATA = Path(__file__).resolve().parent / "data"
PUNCTUATION = ",.;:!?'"


def read_sonnets() -> list[list[str]]:
    with open(DATA / "sonnets.jsonl", encoding="utf-8") as f:
        return [json.loads(line)["text"].splitlines() for line in f if line.strip()]


def shuffled(items: list, rng: random.Random) -> list:
    out = list(items)
    for _ in range(20):
        rng.shuffle(out)
        if out != items:
            break
    return out


def scramble_letters(line: str, rng: random.Random) -> str:
    words = []
    for word in line.split(" "):
        core = word.rstrip(PUNCTUATION)
        words.append("".join(shuffled(list(core), rng)) + word[len(core):] if len(core) > 2 else word)
    return " ".join(words)


def verse_choice(sonnets: list[list[str]], rng: random.Random) -> list[dict]:
    items = []
    for s, lines in enumerate(sonnets):
        for i in range(len(lines) - 1):
            true = lines[i + 1]
            other = sonnets[(s + 1 + rng.randrange(len(sonnets) - 1)) % len(sonnets)][i + 1]
            choices = [true, " ".join(shuffled(true.split(" "), rng)), scramble_letters(true, rng), other]
            order = shuffled(list(range(4)), rng)
            items.append({"context": lines[i] + "\n", "choices": [choices[k] for k in order],
                          "label": order.index(0)})
    return items


def verse_lastword(sonnets: list[list[str]]) -> list[dict]:
    items = []
    for lines in sonnets:
        for i, line in enumerate(lines):
            head, _, last = line.rstrip(PUNCTUATION).rpartition(" ")
            items.append({"context": "".join(p + "\n" for p in lines[:i]) + head, "target": " " + last})
    return items


def verse_repeat(sonnets: list[list[str]]) -> list[dict]:
    items = []
    for lines in sonnets:
        for line in lines:
            phrase = " ".join(line.split(" ")[:3]).rstrip(PUNCTUATION)
            first = phrase.split(" ")[0]
            items.append({"context": f"{phrase}\n{phrase}\n{first}", "target": phrase[len(first):]})
    return items


def write_jsonl(name: str, items: list[dict]) -> None:
    with open(DATA / name, "w", encoding="utf-8") as f:
        for item in items:
            f.write(json.dumps(item) + "\n")


if __name__ == "__main__":
    sonnets = read_sonnets()
    write_jsonl("verse_choice.jsonl", verse_choice(sonnets, random.Random(0)))
    write_jsonl("verse_lastword.jsonl", verse_lastword(sonnets))
    write_jsonl("verse_repeat.jsonl", verse_repeat(sonnets))
