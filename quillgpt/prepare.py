"""Any corpus to token files, on every core: read -> split -> tokenise -> train.bin / val.bin.

    quill prepare --data corpus/ --tokenizer gpt2 --out data/mycorpus

    from quillgpt.prepare import prepare
    result = prepare("corpus/", "gpt2", out="data/mycorpus")   # result.path, result.meta

This module owns the pipeline: it makes the tokenizer (fitted to the corpus where it learns),
routes each document to train or val, groups the pieces the readers (`readers.py`) yield into
work items, tokenises them in worker processes and streams the ids, in order, into the token
files whose format and cache `prepared.py` owns.

Documents are separated by the tokenizer's end-of-text token where it has one (GPT-2's
`<|endoftext|>` after every document); a tokenizer without one (char) gets a newline between two
documents where the first does not already end with one.

Validation split: with many documents (at least 10 / val_fraction) every document whose index
crosses a multiple of 1 / val_fraction goes to val (documents 9, 19, 29, ... at 0.1), so whole
documents are held out, spread evenly over the corpus. With fewer documents (a single text
file) the last `val_fraction` of the tokens is held out, as nanoGPT does.

The work is spread over all cores; memory stays bounded whatever the corpus size (documents are
read and tokenised in pieces of about half a megabyte, at most 2 work items per worker in
flight). This module does not import torch, so the worker processes start fast.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .download import SHAKESPEARE_NAME, cache_dir  # noqa: F401 - importable from here as before
from .errors import QuillError
from .fileio import check_apart, reporting_disk_full, sweep_temporaries
from .prepared import (  # noqa: F401 - is_prepared_dir, load_prepared: importable from here as before
    FORMAT,
    FORMAT_VERSION,
    TRAIN_FILE,
    VAL_FILE,
    Prepared,
    cache_key,
    cache_path,
    check_out_dir,
    describe_sources,
    find_cached,
    install,
    is_prepared_dir,
    load_prepared,
    staging_dir,
    token_dtype,
    write_meta,
)
from .readers import Piece, ReadOptions, count_documents, iter_pieces, resolve_inputs
from .tokenizers import (
    TOKENIZER_KINDS,
    Tokenizer,
    build_tokenizer,
    named_tokenizer,
    tokenizer_from_dict,
)

PIECE_BYTES = 1 << 19  # text is read and tokenised in pieces of at most this size...
ITEM_BYTES = 1 << 20  # ...grouped into work items of about this size for the worker processes
PARALLEL_MIN_BYTES = 4 << 20  # smaller inputs are tokenised in this process (no start-up cost)
MIN_VAL_DOCUMENTS = 10  # split by documents when this many would go to validation
TOKENIZER_SAMPLE_BYTES = 50 << 20  # trained tokenizers (bpe, ...) learn from this much text


# --- the tokenizer ----------------------------------------------------------------------------

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
        for piece in iter_pieces(files, opts, PIECE_BYTES):
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
    for piece in iter_pieces(files, opts, PIECE_BYTES):
        sample.append(piece.text if not piece.ends_doc else piece.text + "\n")
        size += piece.nbytes
        if size >= TOKENIZER_SAMPLE_BYTES:
            break
    return build_tokenizer(spec, "".join(sample))


# --- work items and worker processes ---------------------------------------------------------

@dataclass
class _Item:
    """A unit of work for a tokeniser process: pieces with their split (train or val)."""

    texts: list[str] = field(default_factory=list)
    to_val: list[bool] = field(default_factory=list)
    ends_doc: list[bool] = field(default_factory=list)
    nbytes: int = 0
    size: int = 0


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
    # Ctrl-C reaches the whole process group: the parent alone handles it, and ends the workers
    # with SIGTERM, which ends a worker at once (not the parent's handler, inherited by fork)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
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
    pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                               initargs=(tokenizer_dict or tokenizer.to_dict(), dtype.str))
    pending: deque[Future] = deque()
    try:
        with sigterm_as_interrupt():
            for item in items:
                pending.append(pool.submit(_encode_in_worker, item))
                if len(pending) >= 2 * workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
    except BaseException:  # an interrupt (SIGINT or SIGTERM), an error, a consumer that stopped
        end_pool(pool)
        raise
    pool.shutdown()


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Inside (on the main thread): SIGTERM raises KeyboardInterrupt as SIGINT does, so the
    workers are ended (`end_pool`) and the command says "interrupted" instead of dying at once
    and leaving its workers blocked on a pipe forever."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def end_pool(pool: ProcessPoolExecutor) -> None:
    """Stop a pool now: its workers terminated (not waited for), its queued work dropped."""
    for process in list((getattr(pool, "_processes", None) or {}).values()):
        with contextlib.suppress(Exception):
            process.terminate()
    pool.shutdown(wait=False, cancel_futures=True)


def default_workers() -> int:
    """All cores, shared out among the processes torchrun started on this machine (if any)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


# --- preparing a corpus -----------------------------------------------------------------------

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


class _DocCounter:
    """Passes pieces through, counting documents."""

    def __init__(self, pieces: Iterator[Piece]):
        self.pieces = pieces
        self.n = 0

    def __iter__(self) -> Iterator[Piece]:
        for piece in self.pieces:
            self.n += piece.starts_doc
            yield piece


@dataclass
class _Plan:
    """How a corpus is tokenised, settled before the first token is written."""

    tokenizer: Tokenizer
    tokenizer_dict: dict[str, Any]  # tokenizer.to_dict(), made once: GPT-2's takes ~0.4 s
    dtype: np.dtype
    by_docs: bool  # hold out whole documents (else the tail of the tokens)
    separator: str | None  # between documents, for a tokenizer without end-of-text
    workers: int


@dataclass
class _Counts:
    """What writing the token files produced."""

    train: int = 0
    val: int = 0
    documents: int = 0
    input_bytes: int = 0


def _check_settings(opts: ReadOptions, val_fraction: float, workers: int | None) -> None:
    if workers is not None and not 1 <= workers <= 1024:
        raise QuillError(f"workers must be in 1..1024 (or empty: every core), got {workers}")
    if opts.encoding_errors not in ("strict", "replace"):
        raise QuillError(f"encoding_errors must be strict or replace, got {opts.encoding_errors!r}")
    if not 0.0 < val_fraction < 1.0:
        raise QuillError(f"val_fraction must be in (0, 1), got {val_fraction}")


def _plan(spec: str, files: list[Path], opts: ReadOptions, val_fraction: float, total_bytes: int,
          workers: int | None) -> _Plan:
    """The tokenizer, token dtype, kind of split, separator and number of worker processes."""
    tok = make_tokenizer(spec, files, opts)
    tok_dict = tok.to_dict()
    n_docs_seen = count_documents(files, opts, stop_at=int(np.ceil(MIN_VAL_DOCUMENTS / val_fraction)))
    if workers is None:
        workers = default_workers() if total_bytes >= PARALLEL_MIN_BYTES else 1
    return _Plan(
        tokenizer=tok,
        tokenizer_dict=tok_dict,
        dtype=token_dtype(tok.vocab_size),
        by_docs=n_docs_seen * val_fraction >= MIN_VAL_DOCUMENTS,
        separator=None if tok.eot_id is not None else "\n",
        workers=max(1, workers),
    )


def _write_tokens(tmp: Path, files: list[Path], opts: ReadOptions, plan: _Plan, val_fraction: float,
                  total_bytes: int, progress: bool | None) -> _Counts:
    """Tokenise every document into `tmp`'s train.bin and val.bin, in order, as the plan says."""
    known = None if any(f.name.endswith(".gz") for f in files) else total_bytes
    if known is not None and opts.max_bytes is not None:
        known = min(known, opts.max_bytes)
    bar = Progress(known, progress, f"tokenizing ({plan.workers} process{'es' if plan.workers > 1 else ''})")
    docs = _DocCounter(iter_pieces(files, opts, PIECE_BYTES))
    items = _items(docs, plan.by_docs, val_fraction, plan.separator)
    counts = _Counts()
    with open(tmp / TRAIN_FILE, "wb") as ftrain, open(tmp / VAL_FILE, "wb") as fval:
        for train_ids, val_ids, nbytes in encode_items(items, plan.tokenizer, plan.dtype, plan.workers,
                                                       plan.tokenizer_dict):
            train_ids.tofile(ftrain)
            val_ids.tofile(fval)
            counts.train += len(train_ids)
            counts.val += len(val_ids)
            counts.input_bytes += nbytes
            bar.update(nbytes)
    bar.close()
    counts.documents = docs.n
    return counts


def _move_tail(train_path: Path, val_path: Path, n_total: int, n_val: int, dtype: np.dtype) -> None:
    """Move the last `n_val` tokens of train.bin to the end of val.bin (streamed)."""
    itemsize = dtype.itemsize
    start = (n_total - n_val) * itemsize
    with open(train_path, "r+b") as src, open(val_path, "ab") as dst:
        src.seek(start)
        shutil.copyfileobj(src, dst, 16 << 20)
        src.truncate(start)


def _split(tmp: Path, counts: _Counts, plan: _Plan, val_fraction: float) -> str:
    """How the validation tokens were held out: "documents", or else move train.bin's tail: "tail"."""
    if plan.by_docs and counts.val > 0:
        return "documents"
    total = counts.train + counts.val
    n_val = total - int(total * (1 - val_fraction)) - counts.val  # nanoGPT: train = data[:int(n * 0.9)]
    _move_tail(tmp / TRAIN_FILE, tmp / VAL_FILE, counts.train, n_val, plan.dtype)
    counts.train, counts.val = counts.train - n_val, counts.val + n_val
    return "tail"


def prepare(data: str, tokenizer: str = "char", out: str | Path | None = None,
            opts: ReadOptions | None = None, val_fraction: float = 0.1, workers: int | None = None,
            overwrite: bool = False, progress: bool | None = None) -> Prepared:
    """Tokenise the corpus `data` into `out` (default: the cache, keyed by content + tokenizer).

    A cached directory that already holds this corpus, tokenizer and options is reused as is.
    `progress=None` shows a bar only when stderr is a terminal.
    """
    opts = opts or ReadOptions()
    _check_settings(opts, val_fraction, workers)
    files, root = resolve_inputs(data)
    sources = describe_sources(files, root)
    key = cache_key(tokenizer, opts, val_fraction, sources)
    cached = out is None
    if out is None:
        out = cache_path(root or files[0], tokenizer, key)
        sweep_temporaries(out.parent)  # the cache is ours: what killed runs left there, every start
        hit = find_cached(out, key)
        if hit is not None:
            return hit
        overwrite = True  # a half-written or stale cache entry is replaced
    out = Path(out)
    check_apart(out, [root or files[0], *([tokenizer] if Path(tokenizer).exists() else [])])
    check_out_dir(out, overwrite)

    started = time.time()
    total_bytes = sum(s["bytes"] for s in sources)
    plan = _plan(tokenizer, files, opts, val_fraction, total_bytes, workers)
    with staging_dir(out) as tmp, reporting_disk_full(out):
        counts = _write_tokens(tmp, files, opts, plan, val_fraction, total_bytes, progress)
        if counts.documents == 0:
            raise QuillError(f"data file {files[0]} is empty" if len(files) == 1 and root is None
                             else f"no text found in {data}")
        split = _split(tmp, counts, plan, val_fraction)
        meta = {
            "format": FORMAT, "version": FORMAT_VERSION, "key": key,
            "dtype": plan.dtype.name, "vocab_size": plan.tokenizer.vocab_size,
            "tokenizer_spec": tokenizer, "tokenizer": plan.tokenizer_dict,
            "train_tokens": counts.train, "val_tokens": counts.val,
            "documents": counts.documents, "split": split, "val_fraction": val_fraction,
            "separator": "<|endoftext|>" if plan.separator is None else plan.separator,
            "input_bytes": counts.input_bytes, "seconds": round(time.time() - started, 3),
            "workers": plan.workers,
            "options": {"text_field": opts.text_field, "column": opts.column,
                        "encoding_errors": opts.encoding_errors, "max_bytes": opts.max_bytes},
            "data": data, "sources": sources,
        }
        write_meta(tmp, meta, plan.tokenizer_dict)
        install(tmp, out, key if cached else None)
    return Prepared(out, meta)
