"""What a training run sets up before its first step, each piece in one place:

- `start_process`: everything process-wide: the config checked, torchrun's process group joined
  (when launched by it), the device, TF32 matmuls on CUDA, the log given to rank 0 only;
- `initial_model`: the model's weights, seeded the same on every rank, then each rank's own random
  stream (the only place the loop seeds the global generators; a resume restores them instead);
- `setup_lines`: what the run says before it starts.

`train.Trainer` calls them in order, with `train.run_place` (the run directory, the checkpoint
it resumes) and `train.settle_inputs` (the data, and the edits that it and fine-tuning make to
`cfg`) in between.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn

from . import distributed as qdist
from . import runtime
from .config import Config
from .data import TrainingData
from .optim import check_optimizer
from .registry import build_model
from .runtime import resolve_device, seed_everything


@dataclass
class Process:
    """This process's part in the run: its rank (`dist`), its device, its log (rank 0's; the
    other ranks say nothing) and whether it shows the progress bar."""

    dist: qdist.DistInfo
    device: torch.device
    log: Callable[[str], None]
    progress: bool


def start_process(cfg: Config, progress: bool, log: Callable[[str], None] | None) -> Process:
    """Check `cfg`, join torchrun's process group if launched by it (NCCL or gloo; see
    `distributed`), pick this rank's device and turn on TF32 matmuls there (Ampere and newer).
    Nothing is read or written yet."""
    cfg.validate()
    t = cfg.train
    device = resolve_device(t.device)
    check_optimizer(cfg, t.fsdp)
    dist, device = qdist.init_distributed(device, t.fsdp)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    say = log or (lambda msg: print(msg, file=sys.stderr))
    return Process(dist, device, say if dist.is_main else (lambda msg: None), progress and dist.is_main)


def initial_model(cfg: Config, state: dict[str, torch.Tensor] | None, process: Process) -> nn.Module:
    """The model `cfg.model` names, on the process's device: its initial weights drawn from
    `seed` (the same on every rank) or `state` (fine-tuning). Then, under DDP/FSDP, each rank's
    global generators continue from seed + rank: its own dropout masks."""
    seed_everything(cfg.train.seed)
    model = build_model(cfg.model)
    if state is not None:
        model.load_state_dict(state)
    model.to(process.device)
    if process.dist.enabled:
        torch.manual_seed(cfg.train.seed + process.dist.rank)
    return model


def setup_lines(cfg: Config, n_params: int, data: TrainingData, device: torch.device, dtype: str,
                dist: qdist.DistInfo) -> list[str]:
    """What a run says before it starts: its size, its data, where and in what precision."""
    t = cfg.train
    dtype_note = f"{dtype} (auto)" if t.dtype == "auto" else dtype
    ranks = f", {dist.world_size} processes ({'FSDP' if t.fsdp else 'DDP'})" if dist.enabled else ""
    lines = [f"number of parameters: {n_params / 1e6:.2f}M",
             f"data: {data.describe()}, vocabulary {data.tokenizer.vocab_size}, device {device}, "
             f"dtype {dtype_note}{ranks}"]
    if dtype == "bfloat16" and device.type == "cpu" and not runtime.native_bfloat16(device):
        lines.append("warning: this CPU has no native bfloat16 (AVX-512-BF16 or AMX), so bfloat16 is "
                     "emulated and far slower than float32; --dtype auto picks float32 here")
    return lines


def out_of_memory_message(cfg: Config) -> str:
    t = cfg.train
    return (f"CUDA out of memory with batch_size {t.batch_size} x block_size {cfg.model.block_size}; "
            f"try --batch-size {max(1, t.batch_size // 2)} --gradient-accumulation-steps "
            f"{t.gradient_accumulation_steps * 2} (same tokens per step)")
