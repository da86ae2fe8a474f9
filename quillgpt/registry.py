"""Which model a config's `kind` names: the GPT (`model.py`) or a rung of the learning ladder
(`ladder.py`). Both modules stand on `config` alone; this one sees them both.

    model = build_model(cfg.model)   # cfg.model.kind: gpt | bigram | single-head | multi-head | block
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .config import ModelConfig
from .errors import QuillError, shown
from .ladder import LADDER
from .model import GPT

MODEL_KINDS: dict[str, type[nn.Module]] = {"gpt": GPT, **LADDER}


def build_model(cfg: ModelConfig) -> nn.Module:
    """The model named by `cfg.kind`: the GPT, or one of the learning ladder's rungs."""
    if cfg.kind not in MODEL_KINDS:
        raise QuillError(f"unknown model kind {shown(cfg.kind)} (choose from {', '.join(MODEL_KINDS)})")
    try:
        return MODEL_KINDS[cfg.kind](cfg)
    except (torch.OutOfMemoryError, MemoryError):
        raise QuillError(out_of_memory(cfg)) from None
    except RuntimeError as e:
        if "allocate" not in str(e):
            raise
        raise QuillError(out_of_memory(cfg)) from None


def out_of_memory(cfg: ModelConfig) -> str:
    return (f"not enough memory for a model of {cfg.n_layer} layers, {cfg.n_embd} wide, context "
            f"{cfg.block_size}, vocabulary {cfg.vocab_size}")
