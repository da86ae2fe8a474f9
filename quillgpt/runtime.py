"""Where and in what precision a model runs: the device, the dtype, autocast, random state.

    device = resolve_device("auto")                       # cuda > mps > cpu
    dtype = resolve_dtype("auto", device, n_embd=384)     # "bfloat16" where it is native, ...
    with autocast_context(device, dtype): ...

Training, sampling, evaluation and serving all stand on this module; it knows nothing of them.
"""

from __future__ import annotations

import contextlib
import random
from typing import Any

import numpy as np
import torch

from .errors import QuillError


def resolve_device(name: str = "auto") -> torch.device:
    """cuda > mps > cpu for "auto"; otherwise the device named, if it exists."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise QuillError(f"unknown device {name!r} (use auto, cpu, cuda, cuda:N or mps)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise QuillError("device cuda requested but CUDA is not available")
    mps = getattr(torch.backends, "mps", None)
    if device.type == "mps" and not (mps and mps.is_available()):
        raise QuillError("device mps requested but MPS is not available")
    return device


def native_bfloat16(device: torch.device) -> bool:
    """Does this device multiply bfloat16 matrices in hardware? CUDA with bf16 support, or a CPU
    with AVX-512-BF16 or AMX. Elsewhere bf16 products are emulated: on a 2-core AVX2-only EPYC a
    512 x 512 product ran at 1.2 GFLOP/s in bf16 against 73 in fp32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return False


CPU_BF16_MIN_WIDTH = 256  # benchmarks/train.py: bf16 0.82x at n_embd 128, 1.55x at n_embd 384


def resolve_dtype(dtype: str, device: torch.device, n_embd: int | None = None) -> str:
    """`auto`: bfloat16 where the hardware multiplies it natively (CUDA with bf16, CPUs with
    AVX-512-BF16 or AMX), float16 on older GPUs (with a GradScaler), else float32.

    On a CPU, bf16 pays only when matrix products dominate the step: for models narrower than
    CPU_BF16_MIN_WIDTH (`n_embd`) the casts cost more than they save, and auto stays float32."""
    if dtype != "auto":
        return dtype
    if device.type == "cuda":
        return "bfloat16" if native_bfloat16(device) else "float16"
    if device.type == "cpu" and (n_embd is None or n_embd >= CPU_BF16_MIN_WIDTH) and native_bfloat16(device):
        return "bfloat16"
    return "float32"


def autocast_context(device: torch.device, dtype: str) -> contextlib.AbstractContextManager:
    """Mixed precision: autocast to bfloat16/float16 for matrix products; nothing for float32."""
    dtype = resolve_dtype(dtype, device)
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=getattr(torch, dtype))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """The state of every random number generator the loop touches (python, numpy, torch, cuda)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
