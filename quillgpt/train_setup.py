"""What a training run sets up before its first step, each piece in one place:

- `start_process`: everything process-wide: the config checked, torchrun's process group joined
  (when launched by it), the device, TF32 matmuls on CUDA, the log given to rank 0 only;
- `run_place`: where the run writes (it sets `cfg.train.out`) and the checkpoint it resumes;
- `training_data`: the corpus, or on resume the data with the checkpoint's fingerprint (it sets
  `cfg.train.data` to where that is now);
- `initial_model`: the model's weights, seeded the same on every rank, then each rank's own random
  stream (the only place the loop seeds the global generators; a resume restores them instead);
- `setup_lines`: what the run says before it starts.

`train.Trainer` calls them in this order; `train.settle_inputs` gathers the data and the edits
that it and fine-tuning make to `cfg`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from . import distributed as qdist
from . import runtime
from .config import Config
from .data import TokenData, TrainingData
from .optim import check_optimizer
from .registry import build_model
from .resume import check_resume, run_dir_for
from .resume import resume_data as resume_training_data
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


@dataclass
class RunPlace:
    """Where a run writes and what it resumes."""

    out: Path
    save: bool  # this rank writes the run directory
    resume_dir: Path | None
    resumed: dict[str, Any] | None  # the checkpoint's loop state, checked before anything is built


def run_place(cfg: Config, resume: str | Path | None, overwrite: bool, save: bool,
              dist: qdist.DistInfo) -> RunPlace:
    """The run directory (the run resumed, --out, or runs/<data name>; an existing run is replaced
    only with `overwrite`), and the newest checkpoint of a resumed run, checked against `cfg`.
    When the run is saved or resumed, `cfg.train.out` becomes the directory, as config.yaml says."""
    resume_dir = Path(resume) if resume is not None else None
    resumed = check_resume(resume_dir, cfg) if resume_dir is not None else None
    out = run_dir_for(cfg, resume_dir, overwrite, save and dist.is_main)
    if save or resume_dir is not None:
        cfg.train.out = str(out)
    return RunPlace(out, (save or resume_dir is not None) and dist.is_main, resume_dir, resumed)


def training_data(cfg: Config, place: RunPlace, resume_data: str | None) -> TrainingData:
    """The corpus `cfg` names; for a resumed run, the data with the checkpoint's fingerprint
    (never downloaded: see `resume.resume_data`), and `cfg.train.data` says where it is now."""
    if place.resume_dir is None or place.resumed is None:
        return TokenData.from_config(cfg)
    found = resume_training_data(place.resume_dir, cfg, resume_data, place.resumed["data_sha256"])
    if resume_data is not None:
        cfg.train.data = str(resume_data)
    return found


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
