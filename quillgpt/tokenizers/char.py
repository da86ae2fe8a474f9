"""Character tokenizer: one token per distinct character of the training text."""

from __future__ import annotations

from typing import Any

from ..errors import QuillError
from .base import Tokenizer, check_vocabulary_size, register


@register
class CharTokenizer(Tokenizer):
    kind = "char"

    def __init__(self, chars: list[str]):
        self.chars = list(chars)
        self.stoi = {c: i for i, c in enumerate(self.chars)}

    @classmethod
    def train(cls, text: str) -> CharTokenizer:
        """Vocabulary = the sorted distinct characters of `text`."""
        return cls(sorted(set(text)))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        stoi = self.stoi
        try:
            return [stoi[c] for c in text]
        except KeyError:
            for pos, c in enumerate(text):
                if c not in stoi:
                    raise QuillError(
                        f"character {c!r} (U+{ord(c):04X}) at position {pos} is not in the "
                        f"tokenizer's vocabulary of {len(self.chars)} characters"
                    ) from None
            raise

    def decode(self, ids: list[int]) -> str:
        return "".join(self.chars[i] for i in ids)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "chars": self.chars}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CharTokenizer:
        chars = data["chars"]
        if isinstance(chars, list):
            check_vocabulary_size(len(chars), "'chars'")
        if not isinstance(chars, list) or not all(isinstance(c, str) and len(c) == 1 for c in chars):
            raise ValueError("'chars' must be a list of single characters")
        if len(set(chars)) != len(chars):
            raise ValueError("'chars' has duplicates")
        return cls(chars)
