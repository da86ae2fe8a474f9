"""Run directories: the unit users move around.

    RUN/config.yaml         the fully resolved configuration
    RUN/tokenizer.json      enough to rebuild the exact tokenizer
    RUN/model.safetensors   final weights (safetensors: loading a stranger's run runs no code)
    RUN/best.safetensors    weights at the lowest validation loss
    RUN/metrics.csv         one row per logged step

Every file is written atomically (temporary file, fsync, rename).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import yaml
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .config import Config, config_from_dict
from .errors import QuillError
from .fileio import atomic_write_bytes, atomic_write_text
from .model import build_model
from .tokenizers import Tokenizer, load_tokenizer

CONFIG_FILE = "config.yaml"
TOKENIZER_FILE = "tokenizer.json"
MODEL_FILE = "model.safetensors"
BEST_FILE = "best.safetensors"
METRICS_FILE = "metrics.csv"


def state_dict_for_saving(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors with tied (shared) ones stored once, contiguous, on the CPU."""
    seen: set[int] = set()
    tensors = {}
    for name, t in model.state_dict().items():
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen:
            continue
        seen.add(ptr)
        tensors[name] = t.detach().to("cpu").contiguous()
    return tensors


def save_weights(model: nn.Module, path: str | Path, metadata: dict[str, str] | None = None) -> None:
    atomic_write_bytes(Path(path), st_save(state_dict_for_saving(model), metadata=metadata))


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise QuillError(f"weights file not found: {path}") from None
    try:
        return st_load(data)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise QuillError(f"{path} is corrupt or not a safetensors file ({e})") from None


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Load weights saved by `save_weights`, checking that every tensor matches."""
    tensors = read_safetensors(path)
    expected = model.state_dict()
    # tied tensors were stored once: fill in the other names from their twin
    tied = {}
    by_ptr: dict[int, str] = {}
    for name, t in expected.items():
        ptr = t.untyped_storage().data_ptr()
        if ptr in by_ptr:
            tied[name] = by_ptr[ptr]
        else:
            by_ptr[ptr] = name
    missing = [k for k in expected if k not in tensors and k not in tied]
    unexpected = [k for k in tensors if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected {', '.join(unexpected[:5])}{' ...' if len(unexpected) > 5 else ''}")
        raise QuillError(f"{path} does not match the model: {'; '.join(parts)}")
    for name, t in tensors.items():
        if t.shape != expected[name].shape:
            raise QuillError(
                f"{path}: {name} has shape {tuple(t.shape)}, the model expects {tuple(expected[name].shape)}"
            )
    model.load_state_dict(tensors, strict=False)


def is_run_dir(path: str | Path) -> bool:
    path = Path(path)
    return (path / CONFIG_FILE).is_file() and (path / TOKENIZER_FILE).is_file()


def save_config(cfg: Config, run_dir: str | Path) -> None:
    atomic_write_text(Path(run_dir) / CONFIG_FILE, cfg.to_yaml())


def read_run_config(run_dir: str | Path) -> Config:
    path = Path(run_dir) / CONFIG_FILE
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise QuillError(f"cannot read {path}: {e}") from None
    return config_from_dict(values or {})


@dataclass
class Run:
    """A loaded run: its config, tokenizer and model (in eval mode)."""

    path: Path
    config: Config
    tokenizer: Tokenizer
    model: nn.Module


def load_run(run_dir: str | Path, device: str | torch.device = "cpu", weights: str = MODEL_FILE) -> Run:
    """Load a run directory written by `quill train`."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise QuillError(f"run directory not found: {run_dir}")
    if not is_run_dir(run_dir):
        raise QuillError(
            f"{run_dir} is not a run directory (no {CONFIG_FILE} and {TOKENIZER_FILE}); "
            f"create one with quill train --out {run_dir}"
        )
    cfg = read_run_config(run_dir)
    tokenizer = load_tokenizer(run_dir / TOKENIZER_FILE)
    if cfg.model.vocab_size != tokenizer.vocab_size:
        raise QuillError(
            f"{run_dir}: config vocab_size {cfg.model.vocab_size} does not match the tokenizer's "
            f"{tokenizer.vocab_size}"
        )
    cfg.model.validate()
    model = build_model(cfg.model)
    weights_path = run_dir / weights
    if not weights_path.is_file():
        raise QuillError(f"{run_dir} has no weights ({weights} is missing)")
    load_weights(model, weights_path)
    model.to(device)
    model.eval()
    return Run(run_dir, cfg, tokenizer, model)
