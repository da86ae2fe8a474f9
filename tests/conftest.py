"""Shared test fixtures. Tests run on CPU, offline, with data from ../shared/data or written here."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
LM_EVAL_TASKS = Path(__file__).resolve().parent / "lm_eval_tasks"  # offline benchmark tasks
LOOPBACK = ("127.0.0.1", "::1", "localhost")


def shared_file(name: str) -> Path:
    """A file from ../shared/data, or skip the test with the reason."""
    path = SHARED_DATA / name
    if not path.is_file():
        pytest.skip(f"{path} not found (CI has ../shared/data beside the checkout)")
    return path


@pytest.fixture
def shakespeare() -> Path:
    return shared_file("tinyshakespeare.txt")


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
