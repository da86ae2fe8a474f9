"""The interface every tokenizer implements; the model, data and sampling code see only this."""

from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, ClassVar

from ..errors import QuillError, shown
from ..fileio import atomic_write_text, read_regular

# Bounds on what a tokenizer file may hold: far above any real tokenizer (GPT-2's file is about
# 1 MB), low enough that a hostile file is refused before it costs memory or time.
MAX_VOCAB_SIZE = 1 << 20
MAX_FILE_BYTES = 256 << 20
MAX_SPECIAL_CHARS = 256
MAX_SPECIAL_TOKENS = 10_000  # chat, tool and reserved tokens of real tokenizers: a few hundred


class Tokenizer(ABC):
    """Text <-> token ids. Subclasses set `kind` and implement the abstract methods."""

    kind: ClassVar[str]

    @property
    @abstractmethod
    def vocab_size(self) -> int: ...

    @property
    def special_tokens(self) -> dict[str, int]:
        """Special tokens such as <|endoftext|>, by text; none by default."""
        return {}

    @property
    def eot_id(self) -> int | None:
        """The end-of-text token that separates documents, where the tokenizer has one."""
        return self.special_tokens.get("<|endoftext|>")

    @abstractmethod
    def encode(self, text: str) -> list[int]: ...

    @abstractmethod
    def decode(self, ids: list[int]) -> str: ...

    def encode_ordinary(self, text: str) -> list[int]:
        """Token ids of `text` as plain text: a special token's string in it (a user typing
        "<|end|>") is encoded as ordinary characters, never as the special token."""
        return self.encode(text)

    def with_special_tokens(self, names: Sequence[str]) -> Tokenizer:
        """A copy of this tokenizer with `names` as special tokens: those it lacks are appended
        to the vocabulary (ids vocab_size, vocab_size + 1, ...), the others keep their ids."""
        raise QuillError(f"the {self.kind} tokenizer cannot take special tokens")

    def token_strings(self, ids: list[int]) -> list[str]:
        """Each token as text, for showing a split token by token."""
        return [self.decode([i]) for i in ids]

    @abstractmethod
    def to_dict(self) -> dict[str, Any]:
        """Everything needed to rebuild this tokenizer; must include "kind"."""

    @classmethod
    @abstractmethod
    def from_dict(cls, data: dict[str, Any]) -> Tokenizer: ...

    def save(self, path: str | Path) -> None:
        atomic_write_text(Path(path), json.dumps(self.to_dict(), ensure_ascii=False))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Tokenizer) and self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash(json.dumps(self.to_dict(), sort_keys=True))


TOKENIZER_KINDS: dict[str, type[Tokenizer]] = {}


def appended_specials(existing: dict[str, int], names: Sequence[str], vocab_size: int) -> dict[str, int]:
    """`existing` plus each of `names` it lacks, numbered on from `vocab_size`."""
    specials = dict(existing)
    for name in names:
        if not isinstance(name, str) or not name:
            raise QuillError(f"a special token must be a non-empty string, got {name!r}")
        if name not in specials:
            specials[name] = vocab_size + len(specials) - len(existing)
    return specials


def check_appended_specials(specials: Any, base_size: int) -> dict[str, int]:
    """The special tokens of a char or syllable tokenizer file: a mapping of non-empty strings
    to the ids right after the `base_size` ordinary tokens, each id once."""
    if not isinstance(specials, dict):
        raise ValueError("'special_tokens' must be a mapping of token to id")
    if len(specials) > MAX_SPECIAL_TOKENS:
        raise ValueError(f"{len(specials):,} special tokens, more than any tokenizer has ({MAX_SPECIAL_TOKENS:,})")
    if not all(isinstance(k, str) and k for k in specials):
        raise ValueError("special tokens must be non-empty strings")
    ids = sorted(specials.values()) if all(type(i) is int for i in specials.values()) else None
    if ids != list(range(base_size, base_size + len(specials))):
        raise ValueError(f"special token ids must be {base_size}..{base_size + len(specials) - 1}, each once")
    return dict(specials)


def register(cls: type[Tokenizer]) -> type[Tokenizer]:
    TOKENIZER_KINDS[cls.kind] = cls
    return cls


def check_special_tokens(specials: Any, n_ids: int) -> dict[str, int]:
    """Special tokens as a file gives them: a mapping of non-empty strings (at most
    MAX_SPECIAL_CHARS characters) to distinct integer ids in 0..n_ids-1. ValueError otherwise:
    an empty one would match everywhere, and tiktoken would loop on it forever."""
    if not isinstance(specials, dict):
        raise ValueError("'special_tokens' must be a mapping of text to id")
    if len(specials) > MAX_SPECIAL_TOKENS:
        raise ValueError(f"{len(specials):,} special tokens, more than any tokenizer has ({MAX_SPECIAL_TOKENS:,})")
    for text, i in specials.items():
        if not isinstance(text, str) or not text:
            raise ValueError(f"special token {shown(text)} must be a non-empty string")
        if len(text) > MAX_SPECIAL_CHARS:
            raise ValueError(f"special token {shown(text)} is longer than {MAX_SPECIAL_CHARS} characters")
        if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < n_ids:
            raise ValueError(f"special token {shown(text)} has id {shown(i)}; ids are integers in 0..{n_ids - 1}")
    if len(set(specials.values())) != len(specials):
        raise ValueError("two special tokens share an id")
    return dict(specials)


class SpecialMatcher:
    """Finds special tokens in text in one left-to-right pass, the longest at each position (as
    an alternation sorted longest first would, without its cost: a regex of many alternatives
    is tried alternative by alternative). Candidate positions are found by a character class of
    the tokens' first characters; from each, a walk down a trie of the tokens (at most
    MAX_SPECIAL_CHARS steps) finds the longest one there."""

    def __init__(self, specials: Iterable[str]):
        self.trie: dict[str, Any] = {}
        for text in specials:
            node = self.trie
            for c in text:
                node = node.setdefault(c, {})
            node[""] = text  # "" is no character: the end of a token
        self.starts = re.compile("[" + "".join(re.escape(c) for c in sorted(self.trie)) + "]")

    def _longest(self, text: str, i: int) -> str | None:
        node, found = self.trie, None
        for c in text[i:i + MAX_SPECIAL_CHARS]:
            node = node.get(c)
            if node is None:
                break
            found = node.get("", found)
        return found

    def split(self, text: str) -> list[str]:
        """As `regex.split` with the tokens as one captured group: plain text at even
        positions, the special tokens found at odd ones."""
        out, last, pos = [], 0, 0
        while (m := self.starts.search(text, pos)) is not None:
            i = m.start()
            token = self._longest(text, i)
            if token is None:
                pos = i + 1
                continue
            out += [text[last:i], token]
            last = pos = i + len(token)
        out.append(text[last:])
        return out


def check_vocabulary_size(n: int, what: str) -> None:
    if n > MAX_VOCAB_SIZE:
        raise ValueError(f"{what} has {n:,} entries, more than any tokenizer ({MAX_VOCAB_SIZE:,})")


def tokenizer_from_dict(data: Any, source: str = "tokenizer") -> Tokenizer:
    if not isinstance(data, dict) or "kind" not in data:
        raise QuillError(f"{source} is not a quill tokenizer file (no 'kind')")
    kind = data["kind"]
    if not isinstance(kind, str) or kind not in TOKENIZER_KINDS:
        raise QuillError(f"{source}: unknown tokenizer kind {shown(kind)}")
    try:
        return TOKENIZER_KINDS[kind].from_dict(data)
    except QuillError:
        raise
    except (KeyError, TypeError, ValueError, OverflowError, RecursionError) as e:
        reason = str(e)
        reason = reason if len(reason) <= 200 else reason[:197] + "..."
        raise QuillError(f"{source} is corrupt or truncated ({type(e).__name__}: {reason})") from None


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a tokenizer saved with `Tokenizer.save` (any kind)."""
    path = Path(path)
    try:
        text = read_regular(path, MAX_FILE_BYTES).decode("utf-8")
    except FileNotFoundError:
        raise QuillError(f"tokenizer file not found: {path}") from None
    except IsADirectoryError:
        raise QuillError(f"tokenizer file {path} is a directory") from None
    except (OSError, UnicodeDecodeError) as e:
        raise QuillError(f"cannot read tokenizer file {path}: {e}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise QuillError(f"{path} is corrupt or truncated JSON ({e.msg} at line {e.lineno})") from None
    except RecursionError:
        raise QuillError(f"{path} is not a tokenizer file: its JSON is nested too deeply") from None
    return tokenizer_from_dict(data, str(path))
