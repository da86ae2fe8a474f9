"""quillgpt: GPT-style language models from scratch in PyTorch, from a laptop CPU to a GPU node.

Importing the package is cheap; the torch-heavy parts load on first use:

    from quillgpt import load_config, load_run
    from quillgpt.train import train
    from quillgpt.generate import generate

(`train` and `generate` are also the names of their modules, so they are imported from there.)
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

from .config import Config, ModelConfig, TrainConfig, load_config  # noqa: E402
from .errors import QuillError  # noqa: E402

_LAZY = {
    "GPT": "model",
    "build_model": "registry",
    "Trainer": "train",
    "TrainResult": "train",
    "load_run": "checkpoint",
    "Run": "checkpoint",
}

__all__ = ["Config", "ModelConfig", "QuillError", "TrainConfig", "load_config", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module = importlib.import_module(f".{_LAZY[name]}", __name__)
        value = getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'quillgpt' has no attribute {name!r}")
