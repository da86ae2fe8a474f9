"""Tokenizers behind one small interface (`Tokenizer`): encode, decode, vocab_size, save/load.

    char          one token per character of the training text
    syllable[:N]  the seed gpt-burn's vowel-cut chunks, the N most frequent + a catch-all
    bpe[:N]       byte-level BPE trained on the text (GPT-2's scheme), N tokens in all
    gpt2          GPT-2's own 50,257-token vocabulary
    FILE.json     a saved tokenizer (or a run directory: its tokenizer.json)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import QuillError
from .base import TOKENIZER_KINDS, Tokenizer, load_tokenizer, tokenizer_from_dict
from .bpe import ByteBPETokenizer
from .char import CharTokenizer
from .syllable import SyllableTokenizer

__all__ = [
    "TOKENIZER_KINDS",
    "ByteBPETokenizer",
    "CharTokenizer",
    "SyllableTokenizer",
    "Tokenizer",
    "build_tokenizer",
    "load_tokenizer",
    "named_tokenizer",
    "tokenizer_from_dict",
    "train_tokenizer",
]

SPEC_HELP = "char, syllable[:N], bpe[:N], gpt2, or a tokenizer .json file / run directory"
DEFAULT_BPE_VOCAB = 4096


def _size(spec: str, default: int) -> int:
    name, _, size = spec.partition(":")
    if not size:
        return default
    try:
        return int(size)
    except ValueError:
        raise QuillError(f"tokenizer {spec!r}: {size!r} is not a vocabulary size ({name}:N)") from None


def named_tokenizer(spec: str) -> Tokenizer | None:
    """The tokenizer `spec` names without training (gpt2, a .json file, a run dir), else None."""
    if spec == "gpt2":
        from .gpt2 import gpt2_tokenizer

        return gpt2_tokenizer()
    path = Path(spec)
    if spec.endswith(".json"):
        return load_tokenizer(path)
    if path.is_dir() and (path / "tokenizer.json").is_file():
        return load_tokenizer(path / "tokenizer.json")
    return None


def build_tokenizer(spec: str, text: str) -> Tokenizer:
    """The tokenizer named by `spec` (see the module docstring), trained on `text` if it learns."""
    name = spec.partition(":")[0]
    if spec == "char":
        return CharTokenizer.train(text)
    if name == "syllable":
        from .syllable import DEFAULT_VOCAB_SIZE

        return SyllableTokenizer.train(text, _size(spec, DEFAULT_VOCAB_SIZE))
    if name == "bpe":
        return ByteBPETokenizer.train(text, _size(spec, DEFAULT_BPE_VOCAB))
    tokenizer = named_tokenizer(spec)
    if tokenizer is None:
        raise QuillError(f"unknown tokenizer {spec!r} (use {SPEC_HELP})")
    return tokenizer


def train_tokenizer(kind: str, text: str, vocab_size: int, **bpe_options: Any) -> Tokenizer:
    """Train a `kind` ("bpe", "syllable" or "char") tokenizer on `text`.

    bpe_options go to `ByteBPETokenizer.train` (special_tokens, within_words, space_prefix,
    no_merge, progress); the other kinds ignore them.
    """
    if kind == "bpe":
        return ByteBPETokenizer.train(text, vocab_size, **bpe_options)
    if kind == "syllable":
        return SyllableTokenizer.train(text, vocab_size)
    if kind == "char":
        return CharTokenizer.train(text)
    raise QuillError(f"unknown tokenizer kind {kind!r} (use bpe, syllable or char)")
