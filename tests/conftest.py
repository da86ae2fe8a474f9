"""Shared test fixtures. Tests run on CPU, offline, with text they write themselves or the two
public data files (tiny-shakespeare, GPT-2's ranks), found where quill finds them."""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path
from unittest import mock

import pytest
import torch

from quillgpt.download import (
    SHAKESPEARE_NAME,
    SHAKESPEARE_SHA256,
    SHAKESPEARE_URL,
    cache_dir,
    check_cached,
    fetch_cached,
)
from quillgpt.errors import QuillError
from quillgpt.tokenizers.gpt2 import GPT2_RANKS_NAME, GPT2_RANKS_SHA256, GPT2_RANKS_URL

# The user's cache, read before `_isolated_cache` gives every test an empty one of its own.
USER_CACHE = cache_dir()
SHARED_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
DATA_FILES = {SHAKESPEARE_NAME: (SHAKESPEARE_URL, SHAKESPEARE_SHA256),
              GPT2_RANKS_NAME: (GPT2_RANKS_URL, GPT2_RANKS_SHA256)}
_located: dict[str, Path | str] = {}  # name -> path, or the reason to skip
LM_EVAL_TASKS = Path(__file__).resolve().parent / "lm_eval_tasks"  # offline benchmark tasks
LOOPBACK = ("127.0.0.1", "::1", "localhost")


def data_file(name: str) -> Path:
    """tinyshakespeare.txt or gpt2.tiktoken, where quill finds it: the user's $QUILL_CACHE
    (default ~/.cache/quillgpt), then ../shared/data beside the checkout; else downloaded into
    the user's cache as quill downloads it (sha256-checked). Skips, with one line saying so, only
    when there is no copy and no network."""
    if name not in _located:
        _located[name] = _locate(name)
    found = _located[name]
    if isinstance(found, str):
        pytest.skip(found)
    return found


def _locate(name: str) -> Path | str:
    url, sha256 = DATA_FILES[name]
    if (USER_CACHE / name).is_file():
        return check_cached(USER_CACHE / name, sha256)  # a corrupt copy fails, saying to delete it
    if (SHARED_DATA / name).is_file():
        return SHARED_DATA / name
    with mock.patch.dict(os.environ, {"QUILL_CACHE": str(USER_CACHE)}):
        try:
            return fetch_cached(name, url, sha256)
        except QuillError as e:
            return f"{name}: no copy in {USER_CACHE} or {SHARED_DATA}, and no download ({e})"


def seed_cache(name: str) -> Path:
    """Copy a data file into this test's (isolated, empty) $QUILL_CACHE, as a user's first
    download leaves it."""
    dest = cache_dir() / name
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(data_file(name), dest)
    return dest


@pytest.fixture
def shakespeare() -> Path:
    return data_file(SHAKESPEARE_NAME)


@pytest.fixture
def gpt2_cache() -> Path:
    """GPT-2's ranks in this test's $QUILL_CACHE (no download)."""
    return seed_cache(GPT2_RANKS_NAME)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Each test gets an empty $QUILL_CACHE, so nothing depends on (or writes) the user's cache."""
    monkeypatch.setenv("QUILL_CACHE", str(tmp_path_factory.mktemp("cache")))
    torch.set_num_threads(max(1, torch.get_num_threads()))


@pytest.fixture
def small_text(tmp_path) -> Path:
    """A small text the tests write themselves: ~6 KB of repeated verse."""
    lines = [
        "To be, or not to be, that is the question:",
        "Whether 'tis nobler in the mind to suffer",
        "The slings and arrows of outrageous fortune,",
        "Or to take arms against a sea of troubles",
        "And by opposing end them. To die: to sleep;",
    ]
    path = tmp_path / "verse.txt"
    path.write_text("\n".join(lines * 30) + "\n", encoding="utf-8")
    return path


def make_run(path: Path, model_cfg, tokenizer, seed: int = 0) -> Path:
    """A run directory as quill train writes it, with random weights (perturbed from the init so
    that zero-initialised or tied tensors are not special)."""
    from quillgpt import checkpoint as ckpt
    from quillgpt.config import Config, TrainConfig
    from quillgpt.model import GPT

    model_cfg.vocab_size = tokenizer.vocab_size
    torch.manual_seed(seed)
    model = GPT(model_cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    path.mkdir(parents=True)
    ckpt.save_config(Config(model=model_cfg, train=TrainConfig()), path)
    tokenizer.save(path / ckpt.TOKENIZER_FILE)
    ckpt.save_weights(model, path / ckpt.MODEL_FILE)
    return path


def make_any_run(path: Path, model_cfg, tokenizer, seed: int = 0) -> Path:
    """As make_run, for any model kind (the ladder's rungs too)."""
    from quillgpt import checkpoint as ckpt
    from quillgpt.config import Config, TrainConfig
    from quillgpt.registry import build_model

    model_cfg.vocab_size = tokenizer.vocab_size
    torch.manual_seed(seed)
    model = build_model(model_cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    path.mkdir(parents=True)
    ckpt.save_config(Config(model=model_cfg, train=TrainConfig()), path)
    tokenizer.save(path / ckpt.TOKENIZER_FILE)
    ckpt.save_weights(model, path / ckpt.MODEL_FILE)
    return path


def task_text() -> str:
    """Every string of the offline benchmark tasks' data (a char tokenizer trained on it knows them all)."""
    parts = []
    for path in sorted((LM_EVAL_TASKS / "data").glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            parts += [v if isinstance(v, str) else " ".join(v) for v in json.loads(line).values()
                      if isinstance(v, (str, list))]
    return "\n".join(parts) + "\n"


@pytest.fixture(scope="module")
def offline():
    """Any connection to another host fails (loopback stays open), for a whole test module:
    `pytestmark = pytest.mark.usefixtures("offline")`."""
    real_connect = socket.socket.connect

    def connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in LOOPBACK:
            raise OSError(f"the tests run offline, yet something connected to {address}")
        return real_connect(self, address)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", connect)
        yield
