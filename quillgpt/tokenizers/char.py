"""Character tokenizer: one token per distinct character of the training text.

Special tokens (the chat template's `<|user|>`, ...) may follow the characters, with the ids
after them. Encoding never produces them: text is always read character by character.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..errors import QuillError
from .base import Tokenizer, appended_specials, check_appended_specials, check_vocabulary_size, register


@register
class CharTokenizer(Tokenizer):
    kind = "char"

    def __init__(self, chars: list[str], special_tokens: dict[str, int] | None = None):
        self.chars = list(chars)
        self.stoi = {c: i for i, c in enumerate(self.chars)}
        self.specials = dict(special_tokens or {})
        self.tokens = self.chars + sorted(self.specials, key=self.specials.__getitem__)  # by id

    @classmethod
    def train(cls, text: str) -> CharTokenizer:
        """Vocabulary = the sorted distinct characters of `text`."""
        return cls(sorted(set(text)))

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    @property
    def special_tokens(self) -> dict[str, int]:
        return dict(self.specials)

    def with_special_tokens(self, names: Sequence[str]) -> CharTokenizer:
        return CharTokenizer(self.chars, appended_specials(self.specials, names, self.vocab_size))

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
        return "".join(self.tokens[i] for i in ids)

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"kind": self.kind, "chars": self.chars}
        if self.specials:
            data["special_tokens"] = self.specials
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CharTokenizer:
        chars = data["chars"]
        if isinstance(chars, list):
            check_vocabulary_size(len(chars), "'chars'")
        if not isinstance(chars, list) or not all(isinstance(c, str) and len(c) == 1 for c in chars):
            raise ValueError("'chars' must be a list of single characters")
        if len(set(chars)) != len(chars):
            raise ValueError("'chars' has duplicates")
        return cls(chars, check_appended_specials(data.get("special_tokens", {}), len(chars)))
