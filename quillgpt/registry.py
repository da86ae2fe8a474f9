"""Which model a config's `kind` names: the GPT (`model.py`) or a rung of the learning ladder
(`ladder.py`). Both modules stand on `config` alone; this one sees them both.

    model = build_model(cfg.model)   # cfg.model.kind: gpt | bigram | single-head | multi-head | block
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn

from .config import ModelConfig
from .errors import QuillError, shown
from .ladder import LADDER
from .model import GPT

MODEL_KINDS: dict[str, type[nn.Module]] = {"gpt": GPT, **LADDER}


def build_model(cfg: ModelConfig) -> nn.Module:
    """The model named by `cfg.kind`: the GPT, or one of the learning ladder's rungs. Weights
    that do not fit in memory are a `QuillError` (see `exceeds_memory`)."""
    if cfg.kind not in MODEL_KINDS:
        raise QuillError(f"unknown model kind {shown(cfg.kind)} (choose from {', '.join(MODEL_KINDS)})")
    try:
        return MODEL_KINDS[cfg.kind](cfg)
    except (torch.OutOfMemoryError, MemoryError):
        raise QuillError(out_of_memory(cfg)) from None
    except RuntimeError:
        # PyTorch's CPU allocator reports a failed allocation as a plain RuntimeError, with no
        # type of its own: it is one when the weights outgrow the memory this process may use
        if not exceeds_memory(cfg):
            raise
        raise QuillError(out_of_memory(cfg)) from None


def weight_bytes(cfg: ModelConfig) -> int:
    """The bytes of the model's parameters and buffers, counted on the meta device (nothing is
    allocated; the first use of the meta device costs a second or two of imports)."""
    with torch.device("meta"):
        model = MODEL_KINDS[cfg.kind](cfg)
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


def memory_limit() -> int | None:
    """The bytes this process may still take: the memory the OS calls available (Linux's
    MemAvailable, else its free pages), and under an address-space limit (`ulimit -v`) what is
    left of it. None where the OS does not say."""
    limits = []
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            limits += [int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")]
    except (OSError, ValueError, IndexError):
        pass
    if not limits and hasattr(os, "sysconf"):
        try:
            limits.append(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))
        except (ValueError, OSError):
            pass
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
        if soft != resource.RLIM_INFINITY:
            with open("/proc/self/statm", encoding="ascii") as f:
                used = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
            limits.append(soft - used)
    except (ImportError, OSError, ValueError, IndexError):
        pass
    return min(limits) if limits else None


def exceeds_memory(cfg: ModelConfig) -> bool:
    """Do the model's weights need more memory than this process may still take?"""
    limit = memory_limit()
    if limit is None:
        return False
    try:
        return weight_bytes(cfg) > limit
    except Exception:  # noqa: BLE001 - cannot be counted: the error was not about its size
        return False


def out_of_memory(cfg: ModelConfig) -> str:
    return (f"not enough memory for a model of {cfg.n_layer} layers, {cfg.n_embd} wide, context "
            f"{cfg.block_size}, vocabulary {cfg.vocab_size}")
