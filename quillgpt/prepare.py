"""Any corpus to token files: readers -> parallel tokenisation -> train.bin / val.bin / meta.json.

    quill prepare --data corpus/ --tokenizer gpt2 --out data/mycorpus

Inputs (`--data`): a UTF-8 text file (`.txt`, or any other name; `.gz` is decompressed), a
directory of such files (searched recursively, hidden names skipped, each file read by its
suffix), a `.jsonl` file (one JSON object per line, text under `--text-field`), a `.parquet` file
(the first string column, or `--column`), an http(s) URL (downloaded once into the cache), or the
known name `shakespeare`.

Each text file, JSON line or Parquet row is one *document*. Documents are separated by the
tokenizer's end-of-text token where it has one (GPT-2's `<|endoftext|>` after every document);
a tokenizer without one (char) gets a newline between two documents where the first does not
already end with one.

Validation split: with many documents (at least 10 / val_fraction) every document whose index
crosses a multiple of 1 / val_fraction goes to val (documents 9, 19, 29, ... at 0.1), so whole
documents are held out, spread evenly over the corpus. With fewer documents (a single text
file) the last `val_fraction` of the tokens is held out, as nanoGPT does.

Output: `train.bin` and `val.bin` hold the token ids back to back (uint16 when the vocabulary
fits, uint32 otherwise; read them with `np.memmap`), `meta.json` says how they were made and
`tokenizer.json` rebuilds the tokenizer. The work is spread over all cores; memory stays bounded
whatever the corpus size (documents are read and tokenised in pieces of about a megabyte).

This module does not import torch, so the worker processes start fast.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import shutil
import sys
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from .errors import QuillError
from .fileio import atomic_write_bytes, atomic_write_text
from .tokenizers import (
    TOKENIZER_KINDS,
    Tokenizer,
    build_tokenizer,
    load_tokenizer,
    named_tokenizer,
    tokenizer_from_dict,
)

SHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
)
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
SHAKESPEARE_NAME = "tinyshakespeare.txt"

FORMAT = "quillgpt-tokens"
FORMAT_VERSION = 2  # 2: the tail split rounds as nanoGPT (train = first int(n * 0.9) tokens)
TRAIN_FILE, VAL_FILE, META_FILE, TOKENIZER_FILE = "train.bin", "val.bin", "meta.json", "tokenizer.json"

PIECE_BYTES = 1 << 19  # text is read and tokenised in pieces of at most this size...
ITEM_BYTES = 1 << 20  # ...grouped into work items of about this size for the worker processes
PARALLEL_MIN_BYTES = 4 << 20  # smaller inputs are tokenised in this process (no start-up cost)
MIN_VAL_DOCUMENTS = 10  # split by documents when this many would go to validation
TOKENIZER_SAMPLE_BYTES = 50 << 20  # trained tokenizers (bpe, ...) learn from this much text


# --- the cache and downloads ------------------------------------------------------------------

def cache_dir() -> Path:
    """`$QUILL_CACHE`, or ~/.cache/quillgpt."""
    return Path(os.environ.get("QUILL_CACHE") or Path.home() / ".cache" / "quillgpt")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_cached(name: str, url: str, sha256: str | None) -> Path:
    """A file in the cache directory, downloaded once from `url` and checked against `sha256`."""
    path = cache_dir() / name
    if path.is_file():
        return path
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            data = response.read()
    except (urllib.error.URLError, OSError) as e:
        raise QuillError(
            f"cannot download {name} from {url} ({getattr(e, 'reason', e)}); offline? "
            f"pass a local file with --data FILE, or place it at {path}"
        ) from None
    digest = hashlib.sha256(data).hexdigest()
    if sha256 is not None and digest != sha256:
        raise QuillError(f"downloaded {name} has sha256 {digest}, expected {sha256}; not saved")
    atomic_write_bytes(path, data)
    return path


def shakespeare_path() -> Path:
    """tiny-shakespeare from the cache, downloaded on first use."""
    return fetch_cached(SHAKESPEARE_NAME, SHAKESPEARE_URL, SHAKESPEARE_SHA256)


def download(url: str) -> Path:
    """A URL's content, downloaded once into the cache (no checksum known: trusted as served)."""
    key = hashlib.sha256(url.encode()).hexdigest()[:16]
    base = re.sub(r"[^A-Za-z0-9_.-]+", "_", url.rstrip("/").rsplit("/", 1)[-1].split("?")[0]) or "data"
    return fetch_cached(f"downloads/{key}-{base}", url, None)


KNOWN_DATASETS: dict[str, Callable[[], Path]] = {"shakespeare": shakespeare_path}


def read_text(path: str | Path, max_megabytes: float | None = None) -> str:
    """The contents of a UTF-8 text file, with clear errors for anything else."""
    path = Path(path)
    if path.is_dir():
        raise QuillError(f"data path {path} is a directory, expected a UTF-8 text file")
    try:
        with open(path, "rb") as f:
            data = f.read() if max_megabytes is None else f.read(int(max_megabytes * 1_000_000))
    except FileNotFoundError:
        raise QuillError(f"data file not found: {path}") from None
    except OSError as e:
        raise QuillError(f"cannot read data file {path}: {e.strerror}") from None
    if not data:
        raise QuillError(f"data file {path} is empty")
    return _decode(data, path, 0, "strict", truncated=max_megabytes is not None)


def _decode(data: bytes, path: Path, offset: int, errors: str, truncated: bool = False) -> str:
    """UTF-8 bytes read from `path` at byte `offset` as text; NUL bytes mean a binary file."""
    nul = data.find(b"\x00")
    if nul != -1:
        raise QuillError(
            f"data file {path} looks binary (NUL byte at offset {offset + nul}), expected UTF-8 text"
        )
    try:
        return data.decode("utf-8", errors=errors)
    except UnicodeDecodeError as e:
        if truncated and e.start >= len(data) - 3 and e.reason == "unexpected end of data":
            # the byte cap cut a multi-byte character in two: drop the partial character
            return data[: e.start].decode("utf-8")
        raise QuillError(
            f"data file {path} is not UTF-8: invalid byte 0x{data[e.start]:02x} at offset "
            f"{offset + e.start}; pass --encoding-errors replace to go on"
        ) from None


# --- inputs -----------------------------------------------------------------------------------

@dataclass
class ReadOptions:
    """How to read documents out of the input files."""

    text_field: str = "text"  # .jsonl: the field that holds the text
    column: str | None = None  # .parquet: the column; None means the first string column
    encoding_errors: str = "strict"  # strict: stop at invalid UTF-8; replace: use U+FFFD
    max_bytes: int | None = None  # read only this many bytes of input in all


@dataclass
class Piece:
    """Up to about PIECE_BYTES of one document's text."""

    text: str
    starts_doc: bool
    nbytes: int  # input bytes this piece came from (for the MB/s figure and the byte cap)
    ends_doc: bool = False


def resolve_inputs(data: str) -> tuple[list[Path], Path | None]:
    """The files named by `--data`, and the directory they were found under (if any)."""
    if re.match(r"https?://", data):
        return [download(data)], None
    path = Path(data).expanduser()
    if not path.exists() and data in KNOWN_DATASETS:
        return [KNOWN_DATASETS[data]()], None
    if path.is_file():
        return [path], None
    if path.is_dir():
        files = sorted(
            p for p in path.rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
        if not files:
            raise QuillError(f"data directory {path} has no files")
        return files, path
    if not path.exists():
        known = ", ".join(KNOWN_DATASETS)
        hint = f" (or a known name: {known})" if "/" not in data and "." not in data else ""
        raise QuillError(f"data file not found: {path}{hint}")
    raise QuillError(f"data path {path} is neither a file nor a directory")


def _kind(path: Path) -> str:
    name = path.name.lower()
    if name.endswith((".jsonl", ".jsonl.gz", ".ndjson", ".ndjson.gz")):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    return "text"


def _open(path: Path) -> IO[bytes]:
    try:
        return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")
    except OSError as e:
        raise QuillError(f"cannot read data file {path}: {e.strerror}") from None


class _Budget:
    """The bytes of input still to read under `max_bytes` (None: no limit)."""

    def __init__(self, max_bytes: int | None):
        self.left = max_bytes

    def want(self, n: int) -> int:
        return n if self.left is None else min(n, self.left)

    def take(self, n: int) -> None:
        if self.left is not None:
            self.left -= n

    @property
    def spent(self) -> bool:
        return self.left is not None and self.left <= 0


def _visible(byte: int) -> bool:
    return 0x21 <= byte <= 0x7E  # printable ASCII other than space


def _safe_cut(buf: bytes) -> int:
    """Where to cut a long text so tokenising the parts gives the same tokens as the whole.

    Just after a newline that sits between two visible ASCII characters ("x\\nY"): GPT-2-style
    pre-tokenisers make such a newline a token of its own, so no token crosses the cut. (Not
    after a blank line: "\\n\\n" at the end of a part would become one token.) Failing that,
    before a space between two visible characters; failing that, at a character boundary.
    """
    half = len(buf) // 2
    pos = buf.rfind(b"\n", half, len(buf) - 1)
    while pos > 0:
        if _visible(buf[pos - 1]) and _visible(buf[pos + 1]):
            return pos + 1
        pos = buf.rfind(b"\n", half, pos)
    pos = buf.rfind(b" ", half, len(buf) - 1)
    while pos > 0:
        if _visible(buf[pos - 1]) and _visible(buf[pos + 1]):
            return pos
        pos = buf.rfind(b" ", half, pos)
    cut = len(buf)
    while cut > len(buf) - 4 and cut > 0 and 0x80 <= buf[cut - 1] < 0xC0:
        cut -= 1  # step back over UTF-8 continuation bytes...
    if cut > 0 and buf[cut - 1] >= 0xC0:
        cut -= 1  # ...to the lead byte of the character they belong to
    return cut or len(buf)


def _text_pieces(path: Path, opts: ReadOptions, budget: _Budget) -> Iterator[Piece]:
    """A text file (gzip when named .gz) as one document, in pieces cut at line starts."""
    offset, carry, first = 0, b"", True
    with _open(path) as f:
        while True:
            n = budget.want(PIECE_BYTES - len(carry))
            block = f.read(n) if n > 0 else b""
            budget.take(len(block))
            eof = len(block) < n or n <= 0
            buf = carry + block
            cut = len(buf) if eof else _safe_cut(buf)
            chunk, carry = buf[:cut], buf[cut:]
            if chunk:
                text = _decode(chunk, path, offset, opts.encoding_errors, truncated=eof and budget.spent)
                yield Piece(text, first, len(chunk))
                first = False
            offset += len(chunk)
            if eof:
                return


def _split_long(text: str, nbytes: int) -> Iterator[Piece]:
    """One document's text as pieces of about PIECE_BYTES (cut as `_safe_cut` does)."""
    if len(text) <= PIECE_BYTES:
        yield Piece(text, True, nbytes)
        return
    start, first = 0, True
    while start < len(text):
        end = min(len(text), start + PIECE_BYTES)
        if end < len(text):
            pos = text.rfind("\n", start + PIECE_BYTES // 2, end - 1)
            while pos != -1 and not ("!" <= text[pos - 1] <= "~" and "!" <= text[pos + 1] <= "~"):
                pos = text.rfind("\n", start + PIECE_BYTES // 2, pos)
            end = pos + 1 if pos != -1 else end
        part = text[start:end]
        yield Piece(part, first, round(nbytes * len(part) / len(text)))
        start, first = end, False


def _jsonl_pieces(path: Path, opts: ReadOptions, budget: _Budget) -> Iterator[Piece]:
    """One document per line: the string under `opts.text_field`; blank lines are skipped."""
    offset = 0
    with _open(path) as f:
        for lineno, line in enumerate(f, 1):
            if budget.spent:
                return
            budget.take(len(line))
            start, offset = offset, offset + len(line)
            if not line.strip():
                continue
            text_line = _decode(line, path, start, opts.encoding_errors)
            try:
                obj = json.loads(text_line)
            except json.JSONDecodeError as e:
                raise QuillError(f"{path} line {lineno} is not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict) or opts.text_field not in obj:
                fields = ", ".join(map(str, obj)) if isinstance(obj, dict) else type(obj).__name__
                raise QuillError(
                    f"{path} line {lineno} has no field {opts.text_field!r} (it has: {fields}); "
                    f"choose one with --text-field"
                )
            text = obj[opts.text_field]
            if text is None or text == "":
                continue
            if not isinstance(text, str):
                raise QuillError(
                    f"{path} line {lineno}: field {opts.text_field!r} is {type(text).__name__}, "
                    f"expected a string"
                )
            yield from _split_long(text, len(line))


def _parquet_column(path: Path, opts: ReadOptions) -> tuple[Any, str]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise QuillError(
            f"reading {path} needs pyarrow: pip install 'quillgpt[parquet]'"
        ) from None
    try:
        pf = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as e:
        raise QuillError(f"{path} is not a readable Parquet file ({e})") from None
    schema = pf.schema_arrow
    strings = [f.name for f in schema if pa.types.is_string(f.type) or pa.types.is_large_string(f.type)]
    if opts.column is not None:
        if opts.column not in schema.names:
            raise QuillError(
                f"{path} has no column {opts.column!r} (columns: {', '.join(schema.names)})"
            )
        if opts.column not in strings:
            raise QuillError(f"{path}: column {opts.column!r} holds {schema.field(opts.column).type}, "
                             f"not strings")
        return pf, opts.column
    if not strings:
        raise QuillError(f"{path} has no string column (columns: {', '.join(schema.names)})")
    return pf, strings[0]


def _parquet_pieces(path: Path, opts: ReadOptions, budget: _Budget) -> Iterator[Piece]:
    """One document per row of the text column (the first string column unless `opts.column`)."""
    pf, column = _parquet_column(path, opts)
    for batch in pf.iter_batches(batch_size=1024, columns=[column]):
        for text in batch.column(0).to_pylist():
            if budget.spent:
                return
            if not text:
                continue
            nbytes = len(text.encode("utf-8"))
            budget.take(nbytes)
            yield from _split_long(text, nbytes)


READERS = {"text": _text_pieces, "jsonl": _jsonl_pieces, "parquet": _parquet_pieces}


def iter_pieces(files: list[Path], opts: ReadOptions) -> Iterator[Piece]:
    """Every document of every file, in order, as pieces; `ends_doc` marks each document's last."""
    budget = _Budget(opts.max_bytes)
    prev: Piece | None = None
    for path in files:
        for piece in READERS[_kind(path)](path, opts, budget):
            if prev is not None:
                prev.ends_doc = piece.starts_doc
                yield prev
            prev = piece
        if budget.spent:
            break
    if prev is not None:
        prev.ends_doc = True
        yield prev


def count_documents(files: list[Path], opts: ReadOptions, stop_at: int) -> int:
    """How many documents the files hold, counting no further than `stop_at` (cheap)."""
    n = 0
    for path in files:
        kind = _kind(path)
        if kind == "text":
            n += os.path.getsize(path) > 0
        elif kind == "jsonl":
            with _open(path) as f:
                for line in f:
                    n += bool(line.strip())
                    if n >= stop_at:
                        break
        else:
            pf, _ = _parquet_column(path, opts)
            n += pf.metadata.num_rows
        if n >= stop_at:
            return n
    return n


# --- tokenisation -----------------------------------------------------------------------------

@dataclass
class _Item:
    """A unit of work for a tokeniser process: pieces with their split (train or val)."""

    texts: list[str] = field(default_factory=list)
    to_val: list[bool] = field(default_factory=list)
    ends_doc: list[bool] = field(default_factory=list)
    nbytes: int = 0
    size: int = 0


def encode_item(tokenizer: Tokenizer, item: _Item, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray, int]:
    """(train tokens, val tokens, input bytes) of one work item."""
    out: tuple[list[int], list[int]] = ([], [])
    eot = tokenizer.eot_id
    for text, to_val, ends_doc in zip(item.texts, item.to_val, item.ends_doc):
        ids = out[to_val]
        ids.extend(tokenizer.encode(text))
        if ends_doc and eot is not None:
            ids.append(eot)
    return np.asarray(out[0], dtype=dtype), np.asarray(out[1], dtype=dtype), item.nbytes


_WORKER: dict[str, Any] = {}


def _init_worker(tokenizer: dict[str, Any], dtype: str) -> None:
    _WORKER["tokenizer"] = tokenizer_from_dict(tokenizer)
    _WORKER["dtype"] = np.dtype(dtype)


def _encode_in_worker(item: _Item) -> tuple[np.ndarray, np.ndarray, int]:
    return encode_item(_WORKER["tokenizer"], item, _WORKER["dtype"])


def encode_items(items: Iterable[_Item], tokenizer: Tokenizer, dtype: np.dtype, workers: int,
                 tokenizer_dict: dict[str, Any] | None = None) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
    """Results of `encode_item`, in order, computed by `workers` processes.

    At most 2 items per worker are in flight, so memory does not grow with the corpus.
    """
    if workers <= 1:
        for item in items:
            yield encode_item(tokenizer, item, dtype)
        return
    import multiprocessing

    # fork where there is one: workers start at once, and a script calling prepare() needs no
    # `if __name__ == "__main__"` guard. The workers run only tokenizer code (no torch), so the
    # parent's thread pools do not matter. Elsewhere (macOS, Windows): spawn.
    method = "fork" if sys.platform.startswith("linux") else "spawn"
    ctx = multiprocessing.get_context(method)
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                             initargs=(tokenizer_dict or tokenizer.to_dict(), dtype.str)) as pool:
        pending: deque[Future] = deque()
        try:
            for item in items:
                pending.append(pool.submit(_encode_in_worker, item))
                if len(pending) >= 2 * workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for fut in pending:
                fut.cancel()


def default_workers() -> int:
    """All cores, shared out among the processes torchrun started on this machine (if any)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


# --- the tokenizer ----------------------------------------------------------------------------

def _tokenizer_spec_id(spec: str) -> str:
    """What identifies a tokenizer spec in the cache key (a file or run directory: its content)."""
    path = Path(spec)
    if path.is_dir() and (path / TOKENIZER_FILE).is_file():
        path = path / TOKENIZER_FILE
    if path.is_file():
        return "file:" + sha256_file(path)
    if spec.endswith(".json"):
        raise QuillError(f"tokenizer file not found: {path}")
    return spec


def make_tokenizer(spec: str, files: list[Path], opts: ReadOptions) -> Tokenizer:
    """The tokenizer `spec` names, fitted to the corpus where it learns from text.

    `char` learns every character of the corpus (streamed, plus "\\n" when there are several
    documents, for the separator); trained kinds (bpe, syllable) learn from the first
    TOKENIZER_SAMPLE_BYTES of it; gpt2, a .json file or a run directory ignore the corpus.
    """
    if spec == "char":
        from .tokenizers import CharTokenizer

        chars: set[str] = set()
        docs = 0
        for piece in iter_pieces(files, opts):
            chars.update(piece.text)
            docs += piece.starts_doc
        if docs > 1:
            chars.add("\n")
        return CharTokenizer(sorted(chars))
    named = named_tokenizer(spec)
    if named is not None:
        return named
    if spec.partition(":")[0] not in TOKENIZER_KINDS:
        return build_tokenizer(spec, "")  # not a kind that learns: says what the specs are
    sample: list[str] = []
    size = 0
    for piece in iter_pieces(files, opts):
        sample.append(piece.text if not piece.ends_doc else piece.text + "\n")
        size += piece.nbytes
        if size >= TOKENIZER_SAMPLE_BYTES:
            break
    return build_tokenizer(spec, "".join(sample))


# --- preparing a corpus -----------------------------------------------------------------------

@dataclass
class Prepared:
    """A directory of token files and what `meta.json` says about it."""

    path: Path
    meta: dict[str, Any]


class Progress:
    """A tqdm bar in megabytes (MB/s shown), or nothing."""

    def __init__(self, total: int | None, enabled: bool | None, desc: str):
        from tqdm import tqdm

        # disable=None: shown only when stderr is a terminal
        self.bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1000, desc=desc,
                        disable=None if enabled is None else not enabled, file=sys.stderr,
                        dynamic_ncols=True, smoothing=0.1)

    def update(self, n: int) -> None:
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()


def _is_val_doc(index: int, val_fraction: float) -> bool:
    """Every document whose index crosses a multiple of 1/val_fraction (9, 19, ... at 0.1)."""
    return int((index + 1) * val_fraction) > int(index * val_fraction)


def _items(pieces: Iterator[Piece], by_docs: bool, val_fraction: float,
           separator: str | None) -> Iterator[_Item]:
    """Pieces grouped into work items of about ITEM_BYTES, each routed to train or val.

    `separator` (for tokenizers without end-of-text) goes between two documents of the same
    split when the earlier one does not end with it.
    """
    item = _Item()
    doc = -1
    ends_with_sep = [True, True]  # per split: does the text written so far end with the separator
    to_val = False
    for piece in pieces:
        text = piece.text
        if piece.starts_doc:
            doc += 1
            to_val = by_docs and _is_val_doc(doc, val_fraction)
            if separator is not None and not ends_with_sep[to_val]:
                text = separator + text
        if separator is not None:
            ends_with_sep[to_val] = text.endswith(separator)
        item.texts.append(text)
        item.to_val.append(to_val)
        item.ends_doc.append(piece.ends_doc)
        item.nbytes += piece.nbytes
        item.size += len(text)
        if item.size >= ITEM_BYTES:
            yield item
            item = _Item()
    if item.texts:
        yield item


def _move_tail(train_path: Path, val_path: Path, n_total: int, n_val: int, dtype: np.dtype) -> None:
    """Move the last `n_val` tokens of train.bin to the end of val.bin (streamed)."""
    itemsize = dtype.itemsize
    start = (n_total - n_val) * itemsize
    with open(train_path, "r+b") as src, open(val_path, "ab") as dst:
        src.seek(start)
        shutil.copyfileobj(src, dst, 16 << 20)
        src.truncate(start)


def prepare(data: str, tokenizer: str = "char", out: str | Path | None = None,
            opts: ReadOptions | None = None, val_fraction: float = 0.1, workers: int | None = None,
            overwrite: bool = False, progress: bool | None = None) -> Prepared:
    """Tokenise the corpus `data` into `out` (default: the cache, keyed by content + tokenizer).

    A cached directory that already holds this corpus, tokenizer and options is reused as is.
    `progress=None` shows a bar only when stderr is a terminal.
    """
    opts = opts or ReadOptions()
    if opts.encoding_errors not in ("strict", "replace"):
        raise QuillError(f"encoding_errors must be strict or replace, got {opts.encoding_errors!r}")
    if not 0.0 < val_fraction < 1.0:
        raise QuillError(f"val_fraction must be in (0, 1), got {val_fraction}")
    files, root = resolve_inputs(data)
    sources = [
        {"path": str(p.relative_to(root) if root else p), "bytes": os.path.getsize(p), "sha256": sha256_file(p)}
        for p in files
    ]
    key_fields = {
        "format": FORMAT_VERSION, "tokenizer": _tokenizer_spec_id(tokenizer), "val_fraction": val_fraction,
        "text_field": opts.text_field, "column": opts.column, "encoding_errors": opts.encoding_errors,
        "max_bytes": opts.max_bytes, "sources": [(s["path"], s["sha256"]) for s in sources],
    }
    key = hashlib.sha256(json.dumps(key_fields, sort_keys=True).encode()).hexdigest()
    cached = out is None
    if cached:
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", (root or files[0]).name.split(".")[0]) or "data"
        tok = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(tokenizer).stem if tokenizer.endswith(".json") else tokenizer)
        out = cache_dir() / "prepared" / f"{name}-{tok}-{key[:16]}"
        if (Path(out) / META_FILE).is_file():
            try:
                meta = json.loads((Path(out) / META_FILE).read_text(encoding="utf-8"))
            except (OSError, ValueError):
                meta = {}
            if meta.get("key") == key:
                return Prepared(Path(out), meta)
        overwrite = True  # a half-written or stale cache entry is replaced
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise QuillError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise QuillError(f"--out {out} is not empty; pass --overwrite to replace it")

    started = time.time()
    tok = make_tokenizer(tokenizer, files, opts)
    tok_dict = tok.to_dict()  # once: GPT-2's takes ~0.4 s
    dtype = np.dtype(np.uint16 if tok.vocab_size <= 2**16 else np.uint32)
    n_docs_seen = count_documents(files, opts, stop_at=int(np.ceil(MIN_VAL_DOCUMENTS / val_fraction)))
    by_docs = n_docs_seen * val_fraction >= MIN_VAL_DOCUMENTS
    separator = None if tok.eot_id is not None else "\n"
    total_bytes = sum(s["bytes"] for s in sources)
    if workers is None:
        workers = default_workers() if total_bytes >= PARALLEL_MIN_BYTES else 1
    workers = max(1, workers)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        counts = [0, 0]
        in_bytes = 0
        known = None if any(f.name.endswith(".gz") for f in files) else total_bytes
        if known is not None and opts.max_bytes is not None:
            known = min(known, opts.max_bytes)
        bar = Progress(known, progress,
                       f"tokenizing ({workers} process{'es' if workers > 1 else ''})")
        pieces = iter_pieces(files, opts)
        docs = _DocCounter(pieces)
        items = _items(docs, by_docs, val_fraction, separator)
        with open(tmp / TRAIN_FILE, "wb") as ftrain, open(tmp / VAL_FILE, "wb") as fval:
            for train_ids, val_ids, nbytes in encode_items(items, tok, dtype, workers, tok_dict):
                train_ids.tofile(ftrain)
                val_ids.tofile(fval)
                counts[0] += len(train_ids)
                counts[1] += len(val_ids)
                in_bytes += nbytes
                bar.update(nbytes)
        bar.close()
        if docs.n == 0:
            raise QuillError(f"data file {files[0]} is empty" if len(files) == 1 and root is None
                             else f"no text found in {data}")
        split = "documents"
        if not by_docs or counts[1] == 0:
            split = "tail"
            total = counts[0] + counts[1]
            n_val = total - int(total * (1 - val_fraction)) - counts[1]  # nanoGPT: train = data[:int(n * 0.9)]
            _move_tail(tmp / TRAIN_FILE, tmp / VAL_FILE, counts[0], n_val, dtype)
            counts = [counts[0] - n_val, counts[1] + n_val]
        elapsed = time.time() - started
        meta = {
            "format": FORMAT, "version": FORMAT_VERSION, "key": key,
            "dtype": dtype.name, "vocab_size": tok.vocab_size,
            "tokenizer_spec": tokenizer, "tokenizer": tok_dict,
            "train_tokens": counts[0], "val_tokens": counts[1],
            "documents": docs.n, "split": split, "val_fraction": val_fraction,
            "separator": "<|endoftext|>" if separator is None else separator,
            "input_bytes": in_bytes, "seconds": round(elapsed, 3), "workers": workers,
            "options": {"text_field": opts.text_field, "column": opts.column,
                        "encoding_errors": opts.encoding_errors, "max_bytes": opts.max_bytes},
            "data": data, "sources": sources,
        }
        atomic_write_text(tmp / TOKENIZER_FILE, json.dumps(tok_dict, ensure_ascii=False))  # = tok.save
        atomic_write_text(tmp / META_FILE, json.dumps(meta, indent=1, ensure_ascii=False) + "\n")
        _install(tmp, out, key if cached else None)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return Prepared(out, meta)


def _install(tmp: Path, out: Path, keep_key: str | None) -> None:
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


class _DocCounter:
    """Passes pieces through, counting documents."""

    def __init__(self, pieces: Iterator[Piece]):
        self.pieces = pieces
        self.n = 0

    def __iter__(self) -> Iterator[Piece]:
        for piece in self.pieces:
            self.n += piece.starts_doc
            yield piece


# --- reading prepared data --------------------------------------------------------------------

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
            meta = json.loads((path / META_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise QuillError(f"{path / META_FILE} is corrupt or unreadable ({e})") from None
        if not isinstance(meta, dict):
            raise QuillError(f"{path / META_FILE} is corrupt (not a JSON object)")
    if "tokenizer" in meta:
        tokenizer = tokenizer_from_dict(meta["tokenizer"], str(path / META_FILE))
    elif (path / TOKENIZER_FILE).is_file():
        tokenizer = load_tokenizer(path / TOKENIZER_FILE)
    else:
        raise QuillError(f"prepared data {path} has no tokenizer (no meta.json or tokenizer.json)")
    default = "uint16" if tokenizer.vocab_size <= 2**16 else "uint32"
    dtype_name = meta.get("dtype", default)
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
