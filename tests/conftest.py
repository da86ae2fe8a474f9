"""Shared test fixtures. Tests run on CPU, offline, with data from ../shared/data or written here."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"


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
