"""Syllable tokenizer: the seed gpt-burn's "simple vowel" tokenizer, made lossless.

Text is cut into chunks: every whitespace character and every ASCII punctuation character is a
chunk of its own, and inside a word a new chunk starts before a vowel (a e i o u ä ö ü) once the
current chunk is longer than three characters:

    "Albert Einstein war" -> "Albert", " ", "Einst", "ein", " ", "war"

The vocabulary is the N most frequent chunks of the training text plus one catch-all token for
every chunk outside it, then any special tokens (the chat template's `<|user|>`, ...; encoding
never produces them). Unlike the seed, the last chunk is never dropped, so
decode(encode(x)) == x whenever every chunk of x is in the vocabulary.
"""

from __future__ import annotations

import string
from collections import Counter
from collections.abc import Sequence
from typing import Any

from ..errors import QuillError
from .base import Tokenizer, appended_specials, check_appended_specials, check_vocabulary_size, register

VOWELS = frozenset("aeiouäöü")
SEPARATORS = frozenset(string.punctuation)  # plus every whitespace character
MIN_CHUNK = 3  # cut before a vowel only once the chunk is longer than this
UNKNOWN = "\ufffd"  # how the catch-all token decodes
DEFAULT_VOCAB_SIZE = 4096
MAX_VOCAB_SIZE = 1 << 20


def split_syllables(text: str) -> list[str]:
    """`text` cut into chunks as the module docstring says; "".join(chunks) == text."""
    chunks: list[str] = []
    current = ""
    for c in text:
        if c.isspace() or c in SEPARATORS:
            if current:
                chunks.append(current)
                current = ""
            chunks.append(c)
        elif c in VOWELS and len(current) > MIN_CHUNK:
            chunks.append(current)
            current = c
        else:
            current += c
    if current:
        chunks.append(current)
    return chunks


@register
class SyllableTokenizer(Tokenizer):
    """The most frequent chunks by id (0 = most frequent), then the catch-all token."""

    kind = "syllable"

    def __init__(self, chunks: list[str], coverage: float | None = None,
                 special_tokens: dict[str, int] | None = None):
        self.chunks = list(chunks)
        self.stoi = {c: i for i, c in enumerate(self.chunks)}
        self.unknown_id = len(self.chunks)
        self.coverage = coverage  # share of the training chunks the vocabulary covers
        self.specials = dict(special_tokens or {})
        # every token's text by id: the chunks, the catch-all, the specials
        self.tokens = [*self.chunks, UNKNOWN, *sorted(self.specials, key=self.specials.__getitem__)]

    @classmethod
    def train(cls, text: str, vocab_size: int = DEFAULT_VOCAB_SIZE) -> SyllableTokenizer:
        """Keep the `vocab_size - 1` most frequent chunks (ties: the string order) + catch-all."""
        if vocab_size < 2:
            raise QuillError(f"syllable vocab size {vocab_size} is too small (at least 2: one "
                             f"chunk and the catch-all token)")
        if vocab_size > MAX_VOCAB_SIZE:
            raise QuillError(f"vocab size {vocab_size} is absurdly large (at most {MAX_VOCAB_SIZE:,})")
        counts = Counter(split_syllables(text))
        ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[: vocab_size - 1]
        total = sum(counts.values())
        covered = sum(n for _, n in ranked)
        return cls([c for c, _ in ranked], covered / total if total else 1.0)

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    @property
    def special_tokens(self) -> dict[str, int]:
        return dict(self.specials)

    def with_special_tokens(self, names: Sequence[str]) -> SyllableTokenizer:
        return SyllableTokenizer(self.chunks, self.coverage,
                                 appended_specials(self.specials, names, self.vocab_size))

    def encode(self, text: str) -> list[int]:
        get, unknown = self.stoi.get, self.unknown_id
        return [get(c, unknown) for c in split_syllables(text)]

    def decode(self, ids: list[int]) -> str:
        tokens = self.tokens
        try:
            return "".join(tokens[i] for i in ids)
        except (IndexError, TypeError):
            raise QuillError(f"token id outside the vocabulary of {self.vocab_size}") from None

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"kind": self.kind, "chunks": self.chunks, "coverage": self.coverage}
        if self.specials:
            data["special_tokens"] = self.specials
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SyllableTokenizer:
        chunks = data["chunks"]
        if isinstance(chunks, list):
            check_vocabulary_size(len(chunks), "'chunks'")
        if not isinstance(chunks, list) or not all(isinstance(c, str) and c for c in chunks):
            raise ValueError("'chunks' must be a list of non-empty strings")
        if len(set(chunks)) != len(chunks):
            raise ValueError("'chunks' has duplicates")
        coverage = data.get("coverage")
        if coverage is not None and (not isinstance(coverage, (int, float)) or not 0 <= coverage <= 1):
            raise ValueError("'coverage' must be a number in [0, 1]")
        specials = check_appended_specials(data.get("special_tokens", {}), len(chunks) + 1)
        return cls(chunks, float(coverage) if coverage is not None else None, specials)
