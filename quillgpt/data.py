"""Token files in, batches out: prepare or open a corpus, split it, draw training batches.

    tokenizer, splits = prepare_training_data(cfg)      # splits.train / .val are np.memmap
    batches = BatchSampler(splits.train, block_size, batch_size, seed)
    x, y = batches.next()                               # (batch_size, block_size) each

`TokenData` is what the training loop trains on by default: a tokenizer, the splits, and batch
sources drawn from them. Other kinds of training data (conversations with loss masks) give the
loop the same three things: `describe()`, `fingerprint()` and `batches(split, ...)`.

Corpus readers live in `readers.py`, tokenisation in `prepare.py`, the token-file format and its
cache in `prepared.py`, downloads and the cache directory in `download.py`.
"""

from __future__ import annotations

import hashlib
import urllib.request  # noqa: F401 - tests patch quillgpt.data.urllib.request.urlopen
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch

from .download import (  # noqa: F401 - public names of this module since the core
    SHAKESPEARE_NAME,
    SHAKESPEARE_SHA256,
    SHAKESPEARE_URL,
    cache_dir,
    fetch_cached,
    sha256_file,
    shakespeare_path,
)
from .errors import QuillError
from .prepare import prepare
from .prepared import is_prepared_dir, load_prepared
from .readers import ReadOptions, read_text  # noqa: F401 - read_text: a public name of this module

if TYPE_CHECKING:
    from .config import Config
    from .tokenizers import Tokenizer


@dataclass
class Splits:
    """Training and validation token ids: np.memmap over train.bin / val.bin (or in-memory arrays)."""

    train: np.ndarray
    val: np.ndarray


def split_tokens(ids: list[int] | np.ndarray, val_fraction: float, block_size: int) -> Splits:
    """Contiguous head for training, tail for validation; both must hold one block + 1 token."""
    dtype = np.uint16 if max(ids, default=0) < 2**16 else np.uint32
    arr = np.asarray(ids, dtype=dtype)
    n_train = int(len(arr) * (1 - val_fraction))  # nanoGPT's data[:int(n * 0.9)]
    splits = Splits(arr[:n_train], arr[n_train:])
    check_lengths(splits, block_size)
    return splits


def check_lengths(splits: Splits, block_size: int) -> None:
    """Both splits must hold at least one window of block_size + 1 tokens."""
    need = block_size + 1
    if len(splits.train) < need or len(splits.val) < need:
        total = len(splits.train) + len(splits.val)
        raise QuillError(
            f"data too short: {total} tokens give {len(splits.train)} for training and "
            f"{len(splits.val)} for validation, each needs at least block_size+1 = {need}; use more "
            f"text or a smaller --block-size"
        )


class BatchSampler:
    """Random windows of `block_size + 1` tokens from a token array, from a seeded generator.

    `tokens` may be an np.memmap: only the windows drawn are read (the corpus is never loaded
    into memory). The generator's state (`state()`, a uint8 tensor) is all there is to save:
    restored with `set_state()`, the sampler draws exactly the batches it would have drawn.

    DDP: every rank builds its sampler with the same seed and its own `rank` / `world_size`.
    Each step the generator draws `world_size * batch_size` offsets and rank r keeps the r-th
    slice of `batch_size`, so the ranks never share a draw, their generator states stay equal
    (any rank's state resumes all of them), and with world_size = 1 the draws are the same as
    without DDP.
    """

    def __init__(self, tokens: np.ndarray, block_size: int, batch_size: int, seed: int,
                 device: torch.device | str = "cpu", rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise QuillError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if len(tokens) < block_size + 1:
            raise QuillError(
                f"data too short: {len(tokens)} tokens, a batch needs at least block_size+1 = "
                f"{block_size + 1}"
            )
        self.tokens = tokens
        self.block_size = block_size
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.device = torch.device(device)
        self.generator = torch.Generator().manual_seed(seed)
        self.offsets = np.arange(block_size + 1)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and next-token targets, each (batch_size, block_size), int64 on `device`."""
        high = len(self.tokens) - self.block_size
        starts = torch.randint(high, (self.world_size * self.batch_size,), generator=self.generator)
        mine = starts[self.rank * self.batch_size:(self.rank + 1) * self.batch_size].numpy()
        windows = torch.from_numpy(self.tokens[mine[:, None] + self.offsets].astype(np.int64))  # (B, T+1)
        x, y = windows[:, :-1], windows[:, 1:]
        if self.device.type == "cuda":
            # pinned host memory lets the copies overlap with the GPU's work
            return (x.pin_memory().to(self.device, non_blocking=True),
                    y.pin_memory().to(self.device, non_blocking=True))
        return x.to(self.device), y.to(self.device)

    def state(self) -> torch.Tensor:
        """The generator state (uint8 tensor; store it with the checkpoint)."""
        return self.generator.get_state()

    def set_state(self, state: torch.Tensor) -> None:
        self.generator.set_state(state)


def read_options(cfg: Config) -> ReadOptions:
    t = cfg.train
    return ReadOptions(
        text_field=getattr(t, "text_field", "text"),
        column=getattr(t, "column", None),
        encoding_errors=getattr(t, "encoding_errors", "strict"),
        max_bytes=None if t.max_megabytes is None else int(t.max_megabytes * 1_000_000),
    )


def tokenizer_matches(spec: str, tokenizer: Tokenizer, meta: dict) -> bool:
    """Does the tokenizer spec of a run name the tokenizer that prepared data was made with?"""
    if spec == meta.get("tokenizer_spec") or spec == tokenizer.kind:
        return True
    if spec.endswith(".json") and Path(spec).is_file():
        from .tokenizers import load_tokenizer

        return load_tokenizer(spec) == tokenizer
    return False


def prepare_training_data(cfg: Config, progress: bool | None = None) -> tuple[Tokenizer, Splits]:
    """The run's tokenizer and its train/val tokens (memory-mapped), from `cfg.train.data`.

    `data` may be a prepared directory (train.bin / val.bin / meta.json, used as is; its
    tokenizer must be the one `cfg.train.tokenizer` names) or any raw input `quill prepare`
    reads (no data means tiny-shakespeare), which is prepared once into
    `cache_dir()/prepared/<name>-<tokenizer>-<hash>` and reused while the content, tokenizer and
    options stay the same.
    """
    t = cfg.train
    data = t.data or "shakespeare"
    if is_prepared_dir(data):
        tokenizer, train, val, meta = load_prepared(data)
        if not tokenizer_matches(t.tokenizer, tokenizer, meta):
            made = meta.get("tokenizer_spec", tokenizer.kind)
            raise QuillError(
                f"{data} was prepared with the {made} tokenizer but this run's tokenizer is "
                f"{t.tokenizer}; pass --tokenizer {made}, or prepare the data again with "
                f"--tokenizer {t.tokenizer}"
            )
        check_token_ids(Splits(train, val), tokenizer.vocab_size, data)
    else:
        prepared = prepare(data, t.tokenizer, opts=read_options(cfg), val_fraction=t.val_fraction,
                           progress=progress)
        tokenizer, train, val, _ = load_prepared(prepared.path)
    splits = Splits(train, val)
    check_lengths(splits, cfg.model.block_size)
    return tokenizer, splits


def check_token_ids(splits: Splits, vocab_size: int, source: str, chunk: int = 1 << 24) -> None:
    """Every token id of a prepared directory someone else made is below the vocabulary size
    (an id past it would fail deep inside the model's embedding, mid-run)."""
    for name, arr in (("train.bin", splits.train), ("val.bin", splits.val)):
        for start in range(0, len(arr), chunk):
            top = int(np.max(arr[start:start + chunk]))
            if top >= vocab_size:
                raise QuillError(f"{source}/{name} holds token id {top}, outside the tokenizer's vocabulary of "
                                 f"{vocab_size}; prepare the data again with its tokenizer")


class BatchSource(Protocol):
    """Anything the loop draws batches from: inputs and targets (B, T) each, where a target of
    -1 is not scored; and a state to checkpoint so that a resumed run draws the same batches.

    `next()` may return `(x, y, extra)`: the loop reads `x` and `y` and hands the whole tuple to
    the data's `token_loss` (see `TrainingData`); `extra` is whatever that needs (weights,
    advantages, ...)."""

    def next(self) -> tuple[torch.Tensor, ...]: ...

    def state(self) -> torch.Tensor: ...

    def set_state(self, state: torch.Tensor) -> None: ...


class TrainingData(Protocol):
    """What a training run learns from: its tokenizer and batch sources for each split.

    Optionally a method `token_loss(nll, batch) -> scalar tensor`: `nll` is the per-token
    negative log-likelihood of the targets (`losses.token_nll`: float32, the shape of `y`, 0
    where `y == -1`), `batch` the tuple `next()` returned. The loop then trains on its result as
    the micro-batch loss (and divides it for gradient accumulation itself); without it, on the
    mean over the scored tokens. Evaluation always reports that plain mean."""

    tokenizer: Tokenizer

    def describe(self) -> str: ...

    def fingerprint(self) -> str: ...

    def batches(self, split: str, batch_size: int, seed: int, device: torch.device,
                rank: int = 0, world_size: int = 1) -> BatchSource: ...


def data_fingerprint(splits: Splits, chunk: int = 1 << 20) -> str:
    """sha256 of the split sizes and a sample of the tokens (head, tail and 64 strided pieces),
    to notice a resume on different data without reading a large memory-mapped corpus."""
    h = hashlib.sha256()
    for arr in (splits.train, splits.val):
        arr = np.asarray(arr)
        h.update(f"{len(arr)}:{arr.dtype}".encode())
        if len(arr) <= 8 * chunk:
            h.update(np.ascontiguousarray(arr).tobytes())
            continue
        for start in np.linspace(0, len(arr) - chunk // 16, 64).astype(np.int64):
            h.update(np.ascontiguousarray(arr[start:start + chunk // 16]).tobytes())
    return h.hexdigest()


@dataclass
class TokenData:
    """A tokenized corpus split in two; batches are random windows of `block_size + 1` tokens."""

    tokenizer: Tokenizer
    splits: Splits
    block_size: int

    @classmethod
    def from_config(cls, cfg: Config) -> TokenData:
        tokenizer, splits = prepare_training_data(cfg)
        return cls(tokenizer, splits, cfg.model.block_size)

    def describe(self) -> str:
        return f"{len(self.splits.train):,} train / {len(self.splits.val):,} val tokens"

    def fingerprint(self) -> str:
        return data_fingerprint(self.splits)

    def batches(self, split: str, batch_size: int, seed: int, device: torch.device,
                rank: int = 0, world_size: int = 1) -> BatchSampler:
        tokens = self.splits.train if split == "train" else self.splits.val
        return BatchSampler(tokens, self.block_size, batch_size, seed, device, rank=rank,
                            world_size=world_size)
