"""Prepared data: the directory `quill prepare` writes, its cache, and reading it back.

    data/mycorpus/
      train.bin       training token ids back to back (uint16 when the vocabulary fits, else uint32)
      val.bin         validation token ids, the same way
      meta.json       how they were made: format, version, cache key, dtype, vocab_size,
                      tokenizer_spec, tokenizer, train_tokens, val_tokens, documents, split,
                      val_fraction, separator, input_bytes, seconds, workers, options, data, sources
      tokenizer.json  the tokenizer (what `Tokenizer.save` writes)

    tokenizer, train, val, meta = load_prepared("data/mycorpus")   # train, val: np.memmap

A directory of train.bin / val.bin with only a tokenizer.json (nanoGPT's layout plus our
tokenizer) reads too. Without `--out`, prepared data goes to the cache,
`cache_dir()/prepared/<name>-<tokenizer>-<key>`, where the key hashes the sources' content, the
tokenizer and the read options: an entry whose meta.json holds the same key is reused as is.
A directory is written under a temporary name and renamed into place when complete, so a crash
never leaves a half-written one that looks finished.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .download import cache_dir, sha256_file
from .errors import QuillError
from .fileio import atomic_write_text, confined, read_regular, sweep_temporaries
from .readers import ReadOptions
from .tokenizers import Tokenizer, load_tokenizer, tokenizer_from_dict

FORMAT = "quillgpt-tokens"
MAX_META_BYTES = 512 << 20  # meta.json: the tokenizer and the sources it lists
FORMAT_VERSION = 2  # 2: the tail split rounds as nanoGPT (train = first int(n * 0.9) tokens)
TRAIN_FILE, VAL_FILE, META_FILE, TOKENIZER_FILE = "train.bin", "val.bin", "meta.json", "tokenizer.json"


@dataclass
class Prepared:
    """A directory of token files and what `meta.json` says about it."""

    path: Path
    meta: dict[str, Any]


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every token id fits, else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


# --- the cache --------------------------------------------------------------------------------

def describe_sources(files: list[Path], root: Path | None) -> list[dict[str, Any]]:
    """Each input file's path (relative to `root`), size and sha256, for meta.json and the key."""
    return [
        {"path": str(p.relative_to(root) if root else p), "bytes": os.path.getsize(p), "sha256": sha256_file(p)}
        for p in files
    ]


def tokenizer_spec_id(spec: str) -> str:
    """What identifies a tokenizer spec in the cache key (a file or run directory: its content)."""
    path = Path(spec)
    if path.is_dir() and (path / TOKENIZER_FILE).is_file():
        path = path / TOKENIZER_FILE
    if path.is_file():
        return "file:" + sha256_file(path)
    if spec.endswith(".json"):
        raise QuillError(f"tokenizer file not found: {path}")
    return spec


def cache_key(tokenizer: str, opts: ReadOptions, val_fraction: float, sources: list[dict[str, Any]]) -> str:
    """The hash of everything the tokens depend on: format, tokenizer, options, sources' content."""
    key_fields = {
        "format": FORMAT_VERSION, "tokenizer": tokenizer_spec_id(tokenizer), "val_fraction": val_fraction,
        "text_field": opts.text_field, "column": opts.column, "encoding_errors": opts.encoding_errors,
        "max_bytes": opts.max_bytes, "sources": [(s["path"], s["sha256"]) for s in sources],
    }
    return hashlib.sha256(json.dumps(key_fields, sort_keys=True).encode()).hexdigest()


def cache_path(source: Path, tokenizer: str, key: str) -> Path:
    """`cache_dir()/prepared/<name>-<tokenizer>-<key[:16]>` for a corpus named by `source`."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", source.name.split(".")[0]) or "data"
    tok = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(tokenizer).stem if tokenizer.endswith(".json") else tokenizer)
    return cache_dir() / "prepared" / f"{name}-{tok}-{key[:16]}"


def find_cached(path: Path, key: str) -> Prepared | None:
    """The prepared directory at `path` if its meta.json holds `key` (else None: stale or partial)."""
    if (path / META_FILE).is_file():
        try:
            meta = json.loads(read_regular(confined(path / META_FILE, path), MAX_META_BYTES))
        except (OSError, ValueError, QuillError):
            meta = {}
        if meta.get("key") == key:
            return Prepared(path, meta)
    return None


# --- writing ----------------------------------------------------------------------------------

def check_out_dir(out: Path, overwrite: bool) -> None:
    """`out` may be written: absent, an empty directory, or any directory with `overwrite`."""
    if out.exists() and not out.is_dir():
        raise QuillError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise QuillError(f"--out {out} is not empty; pass --overwrite to replace it")


@contextmanager
def staging_dir(out: Path) -> Iterator[Path]:
    """A fresh empty directory beside `out` to write into; removed on leaving unless installed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    # what killed runs left: any in the cache (ours), only this output's beside a user's --out
    in_cache = out.parent.resolve() == (cache_dir() / "prepared").resolve()
    sweep_temporaries(out.parent, None if in_cache else [out.name])
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_meta(path: Path, meta: dict[str, Any], tokenizer_dict: dict[str, Any]) -> None:
    """tokenizer.json (as `Tokenizer.save` writes it) and meta.json, beside the token files."""
    atomic_write_text(path / TOKENIZER_FILE, json.dumps(tokenizer_dict, ensure_ascii=False))
    # ASCII with escapes: a file name that is not UTF-8 (held as lone surrogates) round-trips
    atomic_write_text(path / META_FILE, json.dumps(meta, indent=1) + "\n")


def install(tmp: Path, out: Path, keep_key: str | None) -> None:
    """Rename the finished `tmp` to `out`, replacing what is there.

    Several processes (DDP ranks) may prepare the same cache entry at once: whoever finishes
    second finds an identical entry (meta.json's key is `keep_key`) in place and keeps it.
    """
    try:
        os.replace(tmp, out)  # succeeds when `out` is absent (or an empty directory)
        return
    except OSError:
        pass
    if keep_key is not None:
        try:
            if json.loads((out / META_FILE).read_text(encoding="utf-8")).get("key") == keep_key:
                return
        except (OSError, ValueError):
            pass
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


# --- reading ----------------------------------------------------------------------------------

def is_prepared_dir(path: str | Path) -> bool:
    """A directory holding train.bin and val.bin (with meta.json or tokenizer.json)."""
    p = Path(path)
    return p.is_dir() and (p / TRAIN_FILE).is_file() and (p / VAL_FILE).is_file()


def load_prepared(path: str | Path) -> tuple[Tokenizer, np.memmap, np.memmap, dict[str, Any]]:
    """The tokenizer, memory-mapped train and val tokens, and meta of a prepared directory.

    The tokenizer comes from meta.json, or from tokenizer.json beside it (so a nanoGPT-style
    directory of train.bin/val.bin plus a tokenizer.json works too; its tokens are uint16 when
    the vocabulary fits).
    """
    path = Path(path)
    meta: dict[str, Any] = {}
    if (path / META_FILE).is_file():
        try:
            meta = json.loads(read_regular(confined(path / META_FILE, path), MAX_META_BYTES))
        except (OSError, ValueError) as e:
            raise QuillError(f"{path / META_FILE} is corrupt or unreadable ({e})") from None
        if not isinstance(meta, dict):
            raise QuillError(f"{path / META_FILE} is corrupt (not a JSON object)")
    if "tokenizer" in meta:
        tokenizer = tokenizer_from_dict(meta["tokenizer"], str(path / META_FILE))
    elif (path / TOKENIZER_FILE).is_file():
        tokenizer = load_tokenizer(confined(path / TOKENIZER_FILE, path))
    else:
        raise QuillError(f"prepared data {path} has no tokenizer (no meta.json or tokenizer.json)")
    dtype_name = meta.get("dtype", token_dtype(tokenizer.vocab_size).name)
    if dtype_name not in ("uint16", "uint32"):
        raise QuillError(f"{path / META_FILE}: unsupported dtype {dtype_name!r}")
    dtype = np.dtype(dtype_name)
    arrays = []
    for name, key in ((TRAIN_FILE, "train_tokens"), (VAL_FILE, "val_tokens")):
        file = path / name
        size = file.stat().st_size
        if size % dtype.itemsize or (key in meta and size != meta[key] * dtype.itemsize):
            raise QuillError(
                f"{file} is truncated or corrupt: {size} bytes, meta.json says "
                f"{meta.get(key, '?')} tokens of {dtype_name}"
            )
        # (an empty file cannot be mapped; the caller reports a split that is too short)
        arrays.append(np.memmap(file, dtype=dtype, mode="r") if size else np.zeros(0, dtype))
    return tokenizer, arrays[0], arrays[1], meta
