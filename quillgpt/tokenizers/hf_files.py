"""Byte-level BPE tokenizers from Hugging Face's files: `tokenizer.json` (what transformers'
`save_pretrained` writes today) or GPT-2's older `vocab.json` + `merges.txt`; and back.

    tok = from_tokenizer_json("gpt2-dir/tokenizer.json")
    tok = from_vocab_merges("gpt2-dir/vocab.json", "gpt2-dir/merges.txt")
    save_vocab_merges(tok, "out-dir")                   # out-dir/vocab.json, out-dir/merges.txt

This module stands on `bpe` (never the other way round).

Only what our `ByteBPETokenizer` encodes exactly is accepted: a BPE model over GPT-2's byte
alphabet, no normalizer, GPT-2's pre-tokenisation (or one of our other patterns, as our export
writes it), merged tokens numbered in merge order. Anything else, and any malformed file, is a
one-line `QuillError` naming the file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import QuillError, shown
from ..fileio import atomic_write_text, read_regular
from .base import MAX_FILE_BYTES
from .bpe import (
    GPT2_PATTERN,
    KNOWN_PATTERNS,
    ByteBPETokenizer,
    bytes_to_unicode,
    merges_from_ranks,
    printable_to_token,
    token_to_printable,
)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(read_regular(path, MAX_FILE_BYTES).decode("utf-8"))
    except FileNotFoundError:
        raise QuillError(f"file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise QuillError(f"cannot read {path}: {e}") from None
    except json.JSONDecodeError as e:
        raise QuillError(f"{path} is corrupt JSON ({e.msg} at line {e.lineno})") from None
    except RecursionError:
        raise QuillError(f"{path} is not a tokenizer file: its JSON is nested too deeply") from None


def from_vocab_merges(vocab_json: str | Path, merges_txt: str | Path, name: str = "hf") -> ByteBPETokenizer:
    """GPT-2's `vocab.json` + `merges.txt`. Tokens that are neither single bytes nor a merge
    result are specials (GPT-2's `<|endoftext|>`)."""
    vocab_json, merges_txt = Path(vocab_json), Path(merges_txt)
    vocab = _read_json(vocab_json)
    try:
        lines = read_regular(merges_txt, MAX_FILE_BYTES).decode("utf-8").splitlines()
    except FileNotFoundError:
        raise QuillError(f"file not found: {merges_txt}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise QuillError(f"cannot read {merges_txt}: {e}") from None
    merges = []
    for n, line in enumerate(lines):
        if not line.strip() or (n == 0 and line.startswith("#version")):
            continue
        parts = line.split(" ")
        if len(parts) != 2:
            raise QuillError(f"{merges_txt}: line {n + 1} is not 'left right': {shown(line)}")
        merges.append((parts[0], parts[1]))
    return _from_vocab(vocab, merges, {}, GPT2_PATTERN, name, str(vocab_json))


def from_tokenizer_json(path: str | Path, name: str = "hf") -> ByteBPETokenizer:
    """A `tokenizer.json` of a byte-level BPE (GPT-2's, or one our export wrote)."""
    path = Path(path)
    data = _read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise QuillError(f"{path} is not a tokenizer.json (no 'model')")
    model = data["model"]
    if model.get("type", "BPE") != "BPE":
        raise QuillError(f"{path}: a {shown(model.get('type'))} tokenizer; only byte-level BPE (GPT-2's kind) imports")
    unsupported = [k for k, ok in (("normalizer", data.get("normalizer") is None),
                                   ("byte_fallback", not model.get("byte_fallback")),
                                   ("continuing_subword_prefix", not model.get("continuing_subword_prefix")),
                                   ("end_of_word_suffix", not model.get("end_of_word_suffix")),
                                   ("dropout", model.get("dropout") in (None, 0, 0.0))) if not ok]
    if unsupported:
        raise QuillError(f"{path}: unsupported tokenizer settings: {', '.join(unsupported)}")
    merges = []
    for m in model.get("merges") or []:
        pair = m.split(" ") if isinstance(m, str) else m
        if not isinstance(pair, list) or len(pair) != 2 or not all(isinstance(p, str) for p in pair):
            raise QuillError(f"{path}: merge {shown(m)} is not a pair of tokens")
        merges.append((pair[0], pair[1]))
    added = {}
    for t in data.get("added_tokens") or []:
        if not isinstance(t, dict) or not isinstance(t.get("content"), str):
            raise QuillError(f"{path}: added token {shown(t)} has no text")
        added[t["content"]] = t.get("id")
    return _from_vocab(model.get("vocab"), merges, added, _pattern(data.get("pre_tokenizer"), path), name,
                       str(path))


def _pattern(pre: Any, path: Path) -> str:
    """Our pre-tokenisation regex for a tokenizer.json `pre_tokenizer`."""
    def byte_level(p: Any, use_regex: bool) -> bool:
        return (isinstance(p, dict) and p.get("type") == "ByteLevel" and not p.get("add_prefix_space")
                and bool(p.get("use_regex", True)) == use_regex)

    if byte_level(pre, True):
        return GPT2_PATTERN
    steps = pre.get("pretokenizers") if isinstance(pre, dict) and pre.get("type") == "Sequence" else None
    if isinstance(steps, list) and len(steps) == 2 and byte_level(steps[1], False):
        split = steps[0]
        regex = split.get("pattern", {}).get("Regex") if isinstance(split, dict) else None
        if (split.get("type") == "Split" and split.get("behavior") == "Isolated" and not split.get("invert")
                and regex in KNOWN_PATTERNS):
            return regex
    raise QuillError(f"{path}: pre_tokenizer {shown(pre)} is not GPT-2's byte-level splitting (nor one of "
                     f"quill's patterns)")


def _from_vocab(vocab: Any, merges: list[tuple[str, str]], added: dict[str, Any], pattern: str, name: str,
                source: str) -> ByteBPETokenizer:
    """The tokenizer for a token -> id `vocab`, its `merges` in order and `added` special tokens."""
    if not isinstance(vocab, dict) or not all(isinstance(i, int) and not isinstance(i, bool) for i in vocab.values()):
        raise QuillError(f"{source} has no vocabulary (a mapping of token to integer id)")
    table = bytes_to_unicode()
    missing = [c for c in (table[b] for b in range(256)) if c not in vocab]
    if missing:
        raise QuillError(f"{source} lacks byte tokens (e.g. {missing[0]!r}); not byte-level BPE")
    mergeable = {table[b] for b in range(256)}
    last_id = -1
    for n, (left, right) in enumerate(merges):
        merged = left + right
        if merged not in vocab:
            raise QuillError(f"{source}: merge {n + 1} makes {shown(merged)}, which is not in the vocabulary")
        if vocab[merged] <= last_id:
            raise QuillError(f"{source}: ids of merged tokens are not in merge order (at {shown(merged)}); "
                             f"unsupported")
        last_id = vocab[merged]
        mergeable.add(merged)
    specials = {t: i for t, i in vocab.items() if t not in mergeable}
    for text, i in added.items():
        if text not in mergeable:
            specials[text] = i
    try:
        ranks = {printable_to_token(t): vocab[t] for t in mergeable}
        return ByteBPETokenizer(ranks, specials, pattern, name)
    except ValueError as e:
        raise QuillError(f"{source}: {e}") from None


def save_vocab_merges(tokenizer: ByteBPETokenizer, directory: str | Path) -> tuple[Path, Path]:
    """Write Hugging Face's `vocab.json` and `merges.txt` for `tokenizer` into `directory`."""
    directory = Path(directory)
    vocab = {token_to_printable(t): i for t, i in tokenizer.ranks.items()}
    vocab.update(tokenizer.specials)
    vocab = dict(sorted(vocab.items(), key=lambda kv: kv[1]))
    try:
        merges = merges_from_ranks(tokenizer.ranks)
    except ValueError as e:
        raise QuillError(f"cannot write merges.txt: {e}") from None
    lines = ["#version: 0.2"] + [f"{token_to_printable(a)} {token_to_printable(b)}" for a, b in merges]
    vocab_path, merges_path = directory / "vocab.json", directory / "merges.txt"
    atomic_write_text(vocab_path, json.dumps(vocab, ensure_ascii=False))
    atomic_write_text(merges_path, "\n".join(lines) + "\n")
    return vocab_path, merges_path
