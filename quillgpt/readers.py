"""Readers: every kind of input `--data` names, as documents in pieces of text.

    files, root = resolve_inputs("corpus/")          # a file, directory, URL or known name
    for piece in iter_pieces(files, ReadOptions(), piece_bytes=1 << 19):  # Piece(text, starts_doc, ...)
        ...

Inputs: a UTF-8 text file (`.txt`, or any other name; `.gz` is decompressed), a directory of such
files (searched recursively, hidden names skipped, each file read by its suffix), a `.jsonl` file
(one JSON object per line, text under `--text-field`), a `.parquet` file (the first string
column, or `--column`), an http(s) URL (downloaded once into the cache), or a known name
(`shakespeare`).

Each text file, JSON line or Parquet row is one *document*. Documents are read in pieces of at
most about `piece_bytes` (the caller's choice), cut where tokenising the pieces one by one gives
the same tokens as tokenising the whole document, so memory stays bounded whatever the corpus
size. Invalid input (a missing file, binary data, bad UTF-8, a JSON line without the text field)
raises `QuillError` naming the file and where in it.

This module imports neither torch nor numpy nor the tokenizers (pyarrow only for .parquet).
"""

from __future__ import annotations

import gzip
import json
import os
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from .download import KNOWN_DATASETS, download
from .errors import QuillError, lone_surrogate, shown


@dataclass
class ReadOptions:
    """How to read documents out of the input files."""

    text_field: str = "text"  # .jsonl: the field that holds the text
    column: str | None = None  # .parquet: the column; None means the first string column
    encoding_errors: str = "strict"  # strict: stop at invalid UTF-8; replace: use U+FFFD
    max_bytes: int | None = None  # read only this many bytes of input in all


@dataclass
class Piece:
    """Up to about `piece_bytes` of one document's text."""

    text: str
    starts_doc: bool
    nbytes: int  # input bytes this piece came from (for the MB/s figure and the byte cap)
    ends_doc: bool = False


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


def _text_pieces(path: Path, opts: ReadOptions, budget: _Budget, piece_bytes: int) -> Iterator[Piece]:
    """A text file (gzip when named .gz) as one document, in pieces cut at line starts."""
    offset, carry, first = 0, b"", True
    with _open(path) as f:
        while True:
            n = budget.want(piece_bytes - len(carry))
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


def _split_long(text: str, nbytes: int, piece_bytes: int) -> Iterator[Piece]:
    """One document's text as pieces of about `piece_bytes` (cut as `_safe_cut` does)."""
    if len(text) <= piece_bytes:
        yield Piece(text, True, nbytes)
        return
    start, first = 0, True
    while start < len(text):
        end = min(len(text), start + piece_bytes)
        if end < len(text):
            pos = text.rfind("\n", start + piece_bytes // 2, end - 1)
            while pos != -1 and not ("!" <= text[pos - 1] <= "~" and "!" <= text[pos + 1] <= "~"):
                pos = text.rfind("\n", start + piece_bytes // 2, pos)
            end = pos + 1 if pos != -1 else end
        part = text[start:end]
        yield Piece(part, first, round(nbytes * len(part) / len(text)))
        start, first = end, False


def _jsonl_pieces(path: Path, opts: ReadOptions, budget: _Budget, piece_bytes: int) -> Iterator[Piece]:
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
            except RecursionError:
                raise QuillError(f"{path} line {lineno} is nested too deeply to be a document") from None
            if not isinstance(obj, dict) or opts.text_field not in obj:
                fields = shown(", ".join(map(str, obj)))[1:-1] if isinstance(obj, dict) else type(obj).__name__
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
            if (bad := lone_surrogate(text)) is not None:
                raise QuillError(f"{path} line {lineno}: field {opts.text_field!r} holds a lone surrogate ({bad}), "
                                 f"which is not valid Unicode")
            yield from _split_long(text, len(line), piece_bytes)


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


def _parquet_pieces(path: Path, opts: ReadOptions, budget: _Budget, piece_bytes: int) -> Iterator[Piece]:
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
            yield from _split_long(text, nbytes, piece_bytes)


READERS = {"text": _text_pieces, "jsonl": _jsonl_pieces, "parquet": _parquet_pieces}


def _checked(pieces: Iterator[Any], path: Path) -> Iterator[Any]:
    """`pieces`, with a damaged .gz or a failing read turned into one QuillError naming `path`."""
    try:
        yield from pieces
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise QuillError(f"data file {path} is not a valid gzip file ({e})") from None
    except OSError as e:
        raise QuillError(f"cannot read data file {path}: {e.strerror or e}") from None


def iter_pieces(files: list[Path], opts: ReadOptions, piece_bytes: int) -> Iterator[Piece]:
    """Every document of every file, in order, as pieces of at most about `piece_bytes`.

    `ends_doc` marks each document's last piece.
    """
    budget = _Budget(opts.max_bytes)
    prev: Piece | None = None
    for path in files:
        for piece in _checked(READERS[_kind(path)](path, opts, budget, piece_bytes), path):
            if prev is not None:
                prev.ends_doc = piece.starts_doc
                yield prev
            prev = piece
        if budget.spent:
            break
    if prev is not None:
        prev.ends_doc = True
        yield prev


def _lines(path: Path) -> Iterator[bytes]:
    with _open(path) as f:
        yield from f


def count_documents(files: list[Path], opts: ReadOptions, stop_at: int) -> int:
    """How many documents the files hold, counting no further than `stop_at` (cheap)."""
    n = 0
    for path in files:
        kind = _kind(path)
        if kind == "text":
            n += os.path.getsize(path) > 0
        elif kind == "jsonl":
            for line in _checked(_lines(path), path):
                n += bool(line.strip())
                if n >= stop_at:
                    break
        else:
            pf, _ = _parquet_column(path, opts)
            n += pf.metadata.num_rows
        if n >= stop_at:
            return n
    return n

