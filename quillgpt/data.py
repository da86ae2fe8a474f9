"""Text in, batches out: read and check a UTF-8 corpus, split it, draw training batches."""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from .errors import QuillError
from .fileio import atomic_write_bytes

if TYPE_CHECKING:
    from .config import Config
    from .tokenizers import Tokenizer

SHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
)
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
SHAKESPEARE_NAME = "tinyshakespeare.txt"


def cache_dir() -> Path:
    """`$QUILL_CACHE`, or ~/.cache/quillgpt."""
    return Path(os.environ.get("QUILL_CACHE") or Path.home() / ".cache" / "quillgpt")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_cached(name: str, url: str, sha256: str) -> Path:
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
    if digest != sha256:
        raise QuillError(f"downloaded {name} has sha256 {digest}, expected {sha256}; not saved")
    atomic_write_bytes(path, data)
    return path


def shakespeare_path() -> Path:
    """tiny-shakespeare from the cache, downloaded on first use."""
    return fetch_cached(SHAKESPEARE_NAME, SHAKESPEARE_URL, SHAKESPEARE_SHA256)


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
    nul = data.find(b"\x00")
    if nul != -1:
        raise QuillError(f"data file {path} looks binary (NUL byte at offset {nul}), expected UTF-8 text")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        if max_megabytes is not None and e.start >= len(data) - 3 and e.reason == "unexpected end of data":
            # the byte cap cut a multi-byte character in two: drop the partial character
            return data[: e.start].decode("utf-8")
        raise QuillError(
            f"data file {path} is not UTF-8: invalid byte 0x{data[e.start]:02x} at offset {e.start}"
        ) from None


@dataclass
class Splits:
    train: np.ndarray
    val: np.ndarray


def split_tokens(ids: list[int] | np.ndarray, val_fraction: float, block_size: int) -> Splits:
    """Contiguous head for training, tail for validation; both must hold one block + 1 token."""
    dtype = np.uint16 if max(ids, default=0) < 2**16 else np.uint32
    arr = np.asarray(ids, dtype=dtype)
    n_val = int(len(arr) * val_fraction)
    train, val = arr[: len(arr) - n_val], arr[len(arr) - n_val :]
    need = block_size + 1
    if len(train) < need or len(val) < need:
        raise QuillError(
            f"data too short: {len(arr)} tokens give {len(train)} for training and {len(val)} "
            f"for validation, each needs at least block_size+1 = {need}; use more text or a "
            f"smaller --block-size"
        )
    return Splits(train, val)


class BatchSampler:
    """Random windows of `block_size + 1` tokens from a token array, from a seeded generator."""

    def __init__(self, tokens: np.ndarray, block_size: int, batch_size: int, seed: int,
                 device: torch.device | str = "cpu"):
        self.data = torch.from_numpy(tokens.astype(np.int64))
        self.block_size = block_size
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.generator = torch.Generator().manual_seed(seed)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and next-token targets, each (batch_size, block_size)."""
        high = len(self.data) - self.block_size
        starts = torch.randint(high, (self.batch_size,), generator=self.generator)
        offsets = torch.arange(self.block_size + 1)
        windows = self.data[starts[:, None] + offsets]  # (B, T+1)
        x, y = windows[:, :-1], windows[:, 1:]
        if self.device.type == "cuda":
            return (x.pin_memory().to(self.device, non_blocking=True),
                    y.pin_memory().to(self.device, non_blocking=True))
        return x.to(self.device), y.to(self.device)

    def state(self) -> torch.Tensor:
        return self.generator.get_state()

    def set_state(self, state: torch.Tensor) -> None:
        self.generator.set_state(state)


def prepare_training_data(cfg: Config) -> tuple[Tokenizer, Splits]:
    """The run's tokenizer and its train/val token arrays, from `cfg.train.data`.

    No data means tiny-shakespeare from the cache. The tokenizer is built (or trained) as
    `cfg.train.tokenizer` says.
    """
    from .tokenizers import build_tokenizer

    path = cfg.train.data if cfg.train.data else shakespeare_path()
    text = read_text(path, cfg.train.max_megabytes)
    tokenizer = build_tokenizer(cfg.train.tokenizer, text)
    ids = tokenizer.encode(text)
    return tokenizer, split_tokens(ids, cfg.train.val_fraction, cfg.model.block_size)
