"""Inference precision: float32, bfloat16 or int8 weights for sampling, serving and evaluation.

Decoding one token reads every weight once, so at batch 1 it is bound by memory bandwidth,
not arithmetic: bf16 weights halve the bytes per token and int8 weights halve them again.

- `float32`: the weights as trained.
- `bfloat16`: weights, activations and the KV cache in bf16 (norms and softmax accumulate in
  fp32 inside PyTorch's kernels; the samplers read the logits as fp32). On CPUs with native
  bf16 every Linear weight is pre-packed once into oneDNN's blocked layout
  (`torch.ops.mkldnn._reorder_linear_weight`, what `torch.compile`'s freezing does): at batch 1
  the packed product reads bf16 weights about twice as fast as `F.linear` does. The tied LM head
  gets its own packed copy (the embedding keeps its rows for the lookup).
- `int8`: weight-only quantization. Every Linear weight and both embeddings are stored as
  int8 with one scale per output channel (per row): w ~ q * s, s = max|w_row| / 127, so each
  weight is off by at most s / 2. The token embedding's rows are also the tied LM head's output
  channels, so one int8 table serves both. Products run through PyTorch's
  `_weight_int8pack_mm` on CPUs (int8 weights dequantised inside the kernel); activations,
  norms, biases and the KV cache stay in bf16 where the hardware has it, else fp32.
- `auto`: the fastest choice that keeps perplexity within 0.5% of fp32 (docs/generation.md):
  bfloat16 on CUDA with bf16 and on CPUs with native bf16 (AVX-512-BF16 or AMX), else float32.

`set_inference_dtype(model, dtype)` converts a loaded model in place; `load_run(path,
dtype=...)` calls it. On a CPU without native bf16, bf16 products are emulated and slower than
fp32 (`quillgpt.runtime.native_bfloat16`); the conversion then says so through `warn`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
from torch.nn import functional as F

from .errors import QuillError, shown
from .runtime import native_bfloat16

INFERENCE_DTYPES = ("float32", "bfloat16", "int8", "auto")
INT8_MAX = 127
# `_weight_int8pack_mm` works row by row: its time grows with the rows while a GEMM's barely does.
# Measured on a 2-core AMD EPYC (one thread): for GPT-2's 50257 x 768 head it beats dequantising
# the weight and one bf16 GEMM up to ~64 rows, for a 2304 x 768 projection up to ~20.
INT8_FUSED_MAX_ROWS = 64


# --- int8 weights -----------------------------------------------------------------------------

def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: (q int8 (N, K), scales fp32 (N,)) with weight ~ q * scales[:, None].

    Rounding to nearest keeps every element within scales / 2 of the original."""
    w = weight.detach().float()
    scales = w.abs().amax(dim=1).clamp(min=1e-12) / INT8_MAX  # an all-zero row keeps scale ~0
    q = torch.round(w / scales[:, None]).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scales


def dequantize_int8(q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (q.to(torch.float32) * scales.float()[:, None]).to(dtype)


class Int8Linear(nn.Module):
    """y = x (q * s)^T + b, with the int8 weight `q` (N, K) and per-output-channel scales `s` (N,).

    The weight is a frozen int8 Parameter, so parameter counts and `.to(device)` see it."""

    def __init__(self, q: nn.Parameter, scales: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.weight = q
        self.register_buffer("scales", scales)
        self.bias = bias if bias is None or isinstance(bias, nn.Parameter) else nn.Parameter(bias, False)
        self.in_features, self.out_features = q.size(1), q.size(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if x.device.type == "cpu" and x2.size(0) < INT8_FUSED_MAX_ROWS:
            y = torch.ops.aten._weight_int8pack_mm(x2.contiguous(), self.weight, self.scales)
        else:  # many rows (a prefill, an evaluation), or no fused kernel: dequantise, then one GEMM
            y = F.linear(x2, self.weight.to(x.dtype) * self.scales[:, None])
        if self.bias is not None:
            y = y + self.bias
        return y.view(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


class PackedLinear(nn.Module):
    """y = x W^T + b with W pre-packed by oneDNN (CPU, bf16): the weight is an opaque mkldnn tensor.

    It is a frozen Parameter, so parameter counts see it, except for a copy of a weight that
    lives elsewhere (the tied LM head), which is a buffer."""

    def __init__(self, linear: nn.Linear, copy_of_shared: bool = False):
        super().__init__()
        packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), 1)
        if copy_of_shared:
            self.register_buffer("weight", packed)
        else:
            self.weight = nn.Parameter(packed, requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, oneDNN-packed"


def _pack_linears(model: nn.Module) -> None:
    """Replace every (bf16, CPU) nn.Linear by a PackedLinear."""
    seen: set[int] = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, PackedLinear(child, copy_of_shared=id(child.weight) in seen))
                seen.add(id(child.weight))


def can_pack(device: torch.device) -> bool:
    """oneDNN packing of bf16 weights: CPUs with native bf16 and a PyTorch built with oneDNN."""
    return (device.type == "cpu" and native_bfloat16(device) and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


class Int8Embedding(nn.Module):
    """Rows of an int8 table times their scales: (..., ) ids -> (..., C) in the scales' dtype."""

    def __init__(self, q: nn.Parameter, scales: torch.Tensor):
        super().__init__()
        self.weight = q
        self.register_buffer("scales", scales)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return F.embedding(idx, self.weight).to(self.scales.dtype) * self.scales[idx, None]


def _quantize_modules(model: nn.Module, act: torch.dtype) -> None:
    """Replace every nn.Linear and nn.Embedding of `model` by its int8 twin; tied weights (the
    LM head and the token embedding) share one int8 table."""
    shared: dict[int, tuple[nn.Parameter, torch.Tensor]] = {}

    def int8(weight: torch.Tensor) -> tuple[nn.Parameter, torch.Tensor]:
        key = id(weight)
        if key not in shared:
            q, s = quantize_int8(weight)
            shared[key] = (nn.Parameter(q.to(weight.device), requires_grad=False), s.to(weight.device, act))
        return shared[key]

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                bias = None if child.bias is None else nn.Parameter(child.bias.detach().to(act), False)
                setattr(parent, name, Int8Linear(*int8(child.weight), bias))
            elif isinstance(child, nn.Embedding):
                setattr(parent, name, Int8Embedding(*int8(child.weight)))


# --- choosing and applying a dtype ------------------------------------------------------------

def check_inference_dtype(dtype: str) -> None:
    if dtype not in INFERENCE_DTYPES:
        raise QuillError(f"dtype must be one of {', '.join(INFERENCE_DTYPES)}, got {shown(dtype)}")


def resolve_inference_dtype(dtype: str, device: torch.device | str) -> str:
    """`auto` -> bfloat16 where the device multiplies bf16 natively, else float32 (see module doc)."""
    check_inference_dtype(dtype)
    if dtype != "auto":
        return dtype
    return "bfloat16" if native_bfloat16(torch.device(device)) else "float32"


def activation_dtype(model: nn.Module) -> torch.dtype:
    """The dtype the model computes in: that of its first floating-point parameter."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def set_inference_dtype(model: nn.Module, dtype: str = "float32",
                        warn: Callable[[str], None] | None = None) -> str:
    """Convert a float32 model (on its device, for inference only) to `dtype` in place; return the
    dtype chosen (`auto` resolved). `warn` hears about bf16 emulated on this hardware."""
    device = next(model.parameters()).device
    chosen = resolve_inference_dtype(dtype, device)
    if chosen == "float32":
        return chosen
    model.eval().requires_grad_(False)
    native = native_bfloat16(device)
    if chosen == "bfloat16":
        if not native and warn is not None:
            warn(f"this {device.type} has no native bfloat16 (AVX-512-BF16 or AMX on CPUs), so bfloat16 "
                 "is emulated and slower than float32; --dtype auto picks float32 here")
        model.to(torch.bfloat16)
        if can_pack(device):
            _pack_linears(model)
        return chosen
    # int8: the activations in bf16 where it is native (the fused CPU kernel is fast there), else fp32
    act = torch.bfloat16 if native else torch.float32
    if act == torch.float32 and device.type == "cpu" and warn is not None:
        warn("this CPU has no native bfloat16: int8 weights run with float32 activations, "
             "through a slower kernel than float32's; it saves memory, not time")
    _quantize_modules(model, act)
    model.to(act)  # norms and biases; int8 parameters keep their dtype (.to moves floats only)
    return chosen
