"""Tokenizers behind one small interface (`Tokenizer`): encode, decode, vocab_size, save/load."""

from __future__ import annotations

from ..errors import QuillError
from .base import TOKENIZER_KINDS, Tokenizer, load_tokenizer, tokenizer_from_dict
from .char import CharTokenizer

__all__ = [
    "TOKENIZER_KINDS",
    "CharTokenizer",
    "Tokenizer",
    "build_tokenizer",
    "load_tokenizer",
    "tokenizer_from_dict",
]


def build_tokenizer(spec: str, text: str) -> Tokenizer:
    """The tokenizer named by `spec` for training on `text`.

    `char` learns the characters of `text`; a path to a saved tokenizer JSON loads it.
    """
    if spec == "char":
        return CharTokenizer.train(text)
    if spec.endswith(".json"):
        return load_tokenizer(spec)
    raise QuillError(f"unknown tokenizer {spec!r} (use char, or a tokenizer .json file)")
