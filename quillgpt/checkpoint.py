"""Run directories: the unit users move around.

    RUN/config.yaml         the fully resolved configuration
    RUN/tokenizer.json      enough to rebuild the exact tokenizer
    RUN/model.safetensors   final weights (safetensors: loading a stranger's run runs no code)
    RUN/best.safetensors    weights at the lowest validation loss
    RUN/metrics.csv         one row per logged step
    RUN/loss.png            train and validation loss curves
    RUN/train_state/        checkpoints for exact resume (see below)

Every file is written atomically (temporary file, fsync, rename).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .config import Config, ModelConfig, config_from_dict, parse_yaml
from .errors import QuillError
from .fileio import (
    atomic_write_bytes,
    atomic_write_text,
    confined,
    disk_full,
    fsync_dir,
    make_temp_dir,
    open_regular,
    read_regular,
    sweep_temporaries,
)
from .inference import check_inference_dtype, set_inference_dtype
from .registry import build_model
from .tokenizers import Tokenizer, load_tokenizer

CONFIG_FILE = "config.yaml"
TOKENIZER_FILE = "tokenizer.json"
MODEL_FILE = "model.safetensors"
BEST_FILE = "best.safetensors"
METRICS_FILE = "metrics.csv"
PLOT_FILE = "loss.png"
# the files a run directory holds, whose temporaries a killed run may have left behind
# what a run's files may weigh: read only as regular files of at most this (fileio.open_regular)
MAX_TEXT_BYTES = 256 << 20  # config.yaml, state.json, manifest.json: far more than any run writes
MAX_WEIGHTS_BYTES = 1 << 40
RUN_FILES = (CONFIG_FILE, TOKENIZER_FILE, MODEL_FILE, BEST_FILE, METRICS_FILE, PLOT_FILE)


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
    save_tensors(state_dict_for_saving(model), path, metadata)


def save_tensors(tensors: dict[str, torch.Tensor], path: str | Path,
                 metadata: dict[str, str] | None = None) -> None:
    """Write CPU tensors (e.g. `state_dict_for_saving(model)`) as one safetensors file, atomically."""
    atomic_write_bytes(Path(path), st_save(tensors, metadata=metadata))


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    try:
        data = read_regular(path, MAX_WEIGHTS_BYTES)
    except FileNotFoundError:
        raise QuillError(f"weights file not found: {path}") from None
    except OSError as e:
        raise QuillError(f"cannot read {path}: {e.strerror}") from None
    try:
        return st_load(data)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise QuillError(f"{path} is corrupt or not a safetensors file ({e})") from None


MAX_HEADER_BYTES = 100 << 20  # a safetensors header (names, shapes, offsets) is far smaller


def safetensors_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """The tensor names and shapes a safetensors file's header lists; the tensors are not read."""
    path = Path(path)
    try:
        with open_regular(path, MAX_WEIGHTS_BYTES) as f:
            size = os.fstat(f.fileno()).st_size
            n = int.from_bytes(f.read(8), "little") if size >= 8 else -1
            if not 2 <= n <= min(size - 8, MAX_HEADER_BYTES):
                raise ValueError("no safetensors header")
            header = json.loads(f.read(n))
        shapes = {}
        for name, entry in header.items():
            if name != "__metadata__":
                shape = entry["shape"]
                if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
                    raise ValueError(f"bad shape for {name}")
                shapes[name] = tuple(shape)
        return shapes
    except FileNotFoundError:
        raise QuillError(f"weights file not found: {path}") from None
    except (OSError, ValueError, RecursionError, KeyError, TypeError, AttributeError) as e:
        raise QuillError(f"{path} is corrupt or not a safetensors file ({type(e).__name__})") from None


def model_tensors(model: nn.Module) -> tuple[dict[str, tuple[int, ...]], set[str]]:
    """The shapes of every tensor in the model's state dict, and the names a weights file must
    hold: tied tensors once (`state_dict_for_saving`), though a file may hold their twins too (a
    full state dict gathered under FSDP does)."""
    saved = model.state_dict()
    names = [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers()]
    return {n: tuple(t.shape) for n, t in saved.items()}, {n for n in names if n in saved}


def name_mismatch(missing: list[str], unexpected: list[str]) -> str:
    """'missing a, b; unexpected c': at most five names of each."""
    def some(names: list[str]) -> str:
        return f"{', '.join(names[:5])}{' ...' if len(names) > 5 else ''}"

    parts = [f"missing {some(missing)}"] if missing else []
    return "; ".join(parts + ([f"unexpected {some(unexpected)}"] if unexpected else []))


def check_weights_fit(path: str | Path, cfg: ModelConfig) -> None:
    """QuillError unless the weights file's header lists the tensors the config's model has, in
    their shapes: checked before the model is allocated (a config edited to a huge model, or
    weights of another model, end in one line, not in an allocation failure)."""
    with torch.device("meta"):  # shapes only: nothing allocated
        want, required = model_tensors(build_model(cfg))
    have = safetensors_shapes(path)
    missing = [k for k in want if k in required and k not in have]
    unexpected = [k for k in have if k not in want]
    if missing or unexpected:
        raise QuillError(f"{path} does not match the model of config.yaml: {name_mismatch(missing, unexpected)}")
    for name, shape in want.items():
        if name in have and have[name] != shape:
            raise QuillError(f"{path}: {name} has shape {have[name]}, the model of config.yaml "
                             f"expects {shape}")


WEIGHT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def checked_weight(t: torch.Tensor, like: torch.Tensor, name: str, source: str | Path) -> torch.Tensor:
    """Tensor `t` of a weights file as the model's tensor `like` holds it: a floating tensor
    only from a floating dtype a run can hold (not int, bool or complex), converted to the
    model's dtype and finite after the conversion (float64's 1e300 is infinite as float32)."""
    if not like.is_floating_point():
        if t.dtype != like.dtype:
            raise QuillError(f"{source}: {name} is {str(t.dtype).removeprefix('torch.')}, the model holds "
                             f"{str(like.dtype).removeprefix('torch.')}")
        return t
    if t.dtype not in WEIGHT_DTYPES:
        raise QuillError(f"{source}: {name} is {str(t.dtype).removeprefix('torch.')}; weights must be "
                         f"float16, bfloat16, float32 or float64")
    converted = t.to(like.dtype)
    if not torch.isfinite(converted).all():
        note = "" if t.dtype == like.dtype or not torch.isfinite(t).all() else \
            f" once converted from {str(t.dtype).removeprefix('torch.')} to {str(like.dtype).removeprefix('torch.')}"
        raise QuillError(f"{source}: {name} holds NaN or infinite values{note}; these weights are damaged")
    return converted


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Load weights saved by `save_weights`, checking that every tensor matches and is finite."""
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
        raise QuillError(f"{path} does not match the model: {name_mismatch(missing, unexpected)}")
    for name, t in tensors.items():
        if t.shape != expected[name].shape:
            raise QuillError(
                f"{path}: {name} has shape {tuple(t.shape)}, the model expects {tuple(expected[name].shape)}"
            )
        tensors[name] = checked_weight(t, expected[name], name, path)
    model.load_state_dict(tensors, strict=False)


def run_file(run_dir: str | Path, name: str) -> Path:
    """RUN/name, refused (QuillError) if it is a link that leads out of the run directory."""
    return confined(Path(run_dir) / name, run_dir)


def state_file(checkpoint: Path, name: str) -> Path:
    """RUN/train_state/step-N/name, refused if it is a link that leads out of the run directory."""
    return confined(checkpoint / name, checkpoint.parent.parent)


def is_run_dir(path: str | Path) -> bool:
    path = Path(path)
    return (path / CONFIG_FILE).is_file() and (path / TOKENIZER_FILE).is_file()


def save_config(cfg: Config, run_dir: str | Path) -> None:
    atomic_write_text(Path(run_dir) / CONFIG_FILE, cfg.to_yaml())


def read_run_config(run_dir: str | Path) -> Config:
    """RUN/config.yaml as a Config, every value checked (a run may come from anyone)."""
    path = run_file(run_dir, CONFIG_FILE)
    try:
        text = read_regular(path, MAX_TEXT_BYTES).decode("utf-8")
    except FileNotFoundError:
        raise QuillError(f"{path} not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise QuillError(f"cannot read {path}: {e}") from None
    try:
        cfg = config_from_dict(parse_yaml(text, path))
        cfg.validate()
    except QuillError as e:
        raise QuillError(f"{path}: {e}" if str(path) not in str(e) else str(e)) from None
    return cfg


@dataclass
class Run:
    """A loaded run: its config, tokenizer and model (in eval mode)."""

    path: Path
    config: Config
    tokenizer: Tokenizer
    model: nn.Module


def load_run(run_dir: str | Path, device: str | torch.device = "cpu", weights: str = MODEL_FILE,
             dtype: str = "float32", warn: Callable[[str], None] | None = None) -> Run:
    """Load a run directory written by `quill train`, for inference in `dtype` (float32, bfloat16,
    int8 or auto: `quillgpt.inference.set_inference_dtype`, which tells `warn` about emulated bf16)."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise QuillError(f"run directory not found: {run_dir}")
    if not is_run_dir(run_dir):
        raise QuillError(
            f"{run_dir} is not a run directory (no {CONFIG_FILE} and {TOKENIZER_FILE}); "
            f"create one with quill train --out {run_dir}"
        )
    cfg = read_run_config(run_dir)
    tokenizer = load_tokenizer(run_file(run_dir, TOKENIZER_FILE))
    if cfg.model.vocab_size != tokenizer.vocab_size:
        raise QuillError(
            f"{run_dir}: config vocab_size {cfg.model.vocab_size} does not match the tokenizer's "
            f"{tokenizer.vocab_size}"
        )
    check_inference_dtype(dtype)
    weights_path = run_file(run_dir, weights)
    if not weights_path.is_file():
        raise QuillError(f"{run_dir} has no weights ({weights} is missing)")
    check_weights_fit(weights_path, cfg.model)
    model = build_model(cfg.model)
    load_weights(model, weights_path)
    model.to(device)
    model.eval()
    set_inference_dtype(model, dtype, warn)
    return Run(run_dir, cfg, tokenizer, model)


# --- train_state/: everything needed to resume a run exactly ---------------------------------
#
#   RUN/train_state/step-00000500/model.safetensors   the weights at that step
#   RUN/train_state/step-00000500/state.safetensors   every tensor of the state below
#   RUN/train_state/step-00000500/state.json          the rest: step, optimizer structure, RNG
#                                                     states, data-sampler state, metrics so far
#   RUN/train_state/step-00000500/manifest.json       sha256 of the three files above
#
# A checkpoint is written into a hidden temporary directory, every file fsynced, the manifest
# last, then the directory is renamed into place: a kill at any instant leaves either a complete
# checkpoint or a hidden leftover that is ignored (and removed by the next save). The manifest's
# checksums catch a checkpoint damaged later on disk; resume then falls back to the previous one.
# Nothing is pickled: tensors go to safetensors, everything else to JSON.

TRAIN_STATE_DIR = "train_state"
STATE_TENSORS_FILE = "state.safetensors"
STATE_JSON_FILE = "state.json"
MANIFEST_FILE = "manifest.json"
_CHECKPOINT_FILES = (MODEL_FILE, STATE_TENSORS_FILE, STATE_JSON_FILE)


def pack_state(obj: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """Split a nested state (dicts, lists, tuples, tensors, numpy arrays, scalars) into a
    JSON-able skeleton and a flat dict of tensors for safetensors. `unpack_state` inverts it.

    Works for any `optimizer.state_dict()` (integer keys, tensors, None, floats, tuples)."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            key = str(len(tensors))
            tensors[key] = x.detach().to("cpu").contiguous()
            return {"__tensor__": key}
        if isinstance(x, np.ndarray):
            return {"__ndarray__": x.tolist(), "dtype": str(x.dtype)}
        if isinstance(x, np.generic):
            return x.item()
        if isinstance(x, dict):
            if all(isinstance(k, str) and not k.startswith("__") for k in x):
                return {k: walk(v) for k, v in x.items()}
            return {"__items__": [[walk(k), walk(v)] for k, v in x.items()]}
        if isinstance(x, tuple):
            return {"__tuple__": [walk(v) for v in x]}
        if isinstance(x, list):
            return [walk(v) for v in x]
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        raise TypeError(f"cannot store a {type(x).__name__} in a checkpoint")

    return walk(obj), tensors


def unpack_state(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    def walk(x: Any) -> Any:
        if isinstance(x, list):
            return [walk(v) for v in x]
        if not isinstance(x, dict):
            return x
        if "__tensor__" in x:
            return tensors[x["__tensor__"]]
        if "__ndarray__" in x:
            return np.array(x["__ndarray__"], dtype=x["dtype"])
        if "__tuple__" in x:
            return tuple(walk(v) for v in x["__tuple__"])
        if "__items__" in x:
            return {walk(k): walk(v) for k, v in x["__items__"]}
        return {k: walk(v) for k, v in x.items()}

    return walk(skeleton)


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def save_train_state(run_dir: str | Path, step: int, weights: dict[str, torch.Tensor],
                     state: dict[str, Any], keep_last: int = 2) -> Path:
    """Write RUN/train_state/step-N atomically; then keep only the `keep_last` newest
    checkpoints plus the one with the lowest validation loss (`state["val_loss"]`)."""
    root = Path(run_dir) / TRAIN_STATE_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / checkpoint_name(step)
    tmp = make_temp_dir(root, final.name)
    try:
        skeleton, tensors = pack_state(state)
        blobs = {
            MODEL_FILE: st_save(weights, metadata={"step": str(step)}),
            STATE_TENSORS_FILE: st_save(tensors),
            STATE_JSON_FILE: json.dumps(skeleton).encode("utf-8"),
        }
        for name, data in blobs.items():
            _write_synced(tmp / name, data)
        manifest = {"step": step, "sha256": {name: _sha256(data) for name, data in blobs.items()}}
        _write_synced(tmp / MANIFEST_FILE, json.dumps(manifest, indent=1).encode("utf-8"))
        fsync_dir(tmp)
        if final.exists():  # same step saved again (e.g. a signal right after an interval save)
            remove_checkpoint(final)
        os.replace(tmp, final)
        fsync_dir(root)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and (full := disk_full(e, final)) is not None:
            raise full from None
        raise
    prune_checkpoints(root, keep_last)
    return final


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints (those with a manifest), oldest first."""
    root = Path(run_dir) / TRAIN_STATE_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir()
             if p.is_dir() and p.name.startswith("step-") and (p / MANIFEST_FILE).is_file()]
    return sorted(found, key=lambda p: p.name)


def prune_checkpoints(root: Path, keep_last: int) -> None:
    """Remove leftovers of interrupted saves (of writers no longer running) and all but the
    newest `keep_last` checkpoints and the best one."""
    sweep_temporaries(root)
    checkpoints = list_checkpoints(root.parent)
    keep = set(checkpoints[-max(1, keep_last):])
    best, best_val = None, float("inf")
    for p in checkpoints:
        try:
            val = json.loads(read_regular(state_file(p, STATE_JSON_FILE), MAX_TEXT_BYTES)).get("val_loss")
        except (OSError, ValueError, AttributeError, QuillError):
            continue
        if isinstance(val, (int, float)) and val < best_val:
            best, best_val = p, val
    if best is not None:
        keep.add(best)
    for p in checkpoints:
        if p not in keep:
            remove_checkpoint(p)


def remove_checkpoint(path: Path) -> None:
    """Delete a checkpoint so that a kill midway never leaves a partial one under a valid name:
    first rename it to a hidden leftover (atomic), which the next save sweeps away."""
    trash = path.with_name(f".{path.name}.{os.getpid()}.removed.tmp")
    os.replace(path, trash)
    fsync_dir(path.parent)
    shutil.rmtree(trash, ignore_errors=True)


def verify_checkpoint(path: Path) -> str | None:
    """None if every file matches the manifest's checksum, else what is wrong."""
    try:
        manifest = json.loads(read_regular(state_file(path, MANIFEST_FILE), MAX_TEXT_BYTES))
        expected = manifest["sha256"]
    except (OSError, ValueError, KeyError, TypeError, QuillError) as e:
        return f"unreadable manifest ({e})"
    for name in _CHECKPOINT_FILES:
        try:
            data = read_regular(state_file(path, name), MAX_TEXT_BYTES if name == STATE_JSON_FILE else MAX_WEIGHTS_BYTES)
        except OSError:
            return f"{name} is missing"
        except QuillError as e:
            return str(e)
        if _sha256(data) != expected.get(name):
            return f"{name} does not match its checksum"
    return None


def peek_train_state(run_dir: str | Path) -> tuple[Path, dict[str, Any]]:
    """The newest checkpoint whose state.json matches its manifest, and that JSON as written
    (tensors left as references): what a resume checks before it loads anything big."""
    checkpoints = list_checkpoints(run_dir)
    if not checkpoints:
        raise QuillError(f"{run_dir} has no checkpoint to resume from ({TRAIN_STATE_DIR}/ is empty "
                         f"or missing)")
    for path in reversed(checkpoints):
        try:
            manifest = json.loads(read_regular(state_file(path, MANIFEST_FILE), MAX_TEXT_BYTES))
            data = read_regular(state_file(path, STATE_JSON_FILE), MAX_TEXT_BYTES)
            if not isinstance(manifest, dict) or _sha256(data) != manifest.get("sha256", {}).get(STATE_JSON_FILE):
                continue
            skeleton = json.loads(data)
        except (OSError, ValueError, RecursionError, AttributeError, QuillError):
            continue
        if isinstance(skeleton, dict):
            return path, skeleton
    raise QuillError(f"no intact checkpoint in {Path(run_dir) / TRAIN_STATE_DIR}")


def check_tensors_fit(tensors: dict[str, torch.Tensor], model: nn.Module, source: str) -> None:
    """QuillError unless `tensors` are the model's (tied ones at least once), in its shapes."""
    want, required = model_tensors(model)
    have = {n: tuple(t.shape) for n, t in tensors.items() if isinstance(t, torch.Tensor)}
    wrong = sorted((required - set(have)) | (set(have) - set(want)) | {n for n in have if n in want and
                                                                         have[n] != want[n]})
    if wrong or len(have) != len(tensors):
        raise QuillError(f"{source} does not fit the model of config.yaml (at {', '.join(wrong[:3])})")
    expected = model.state_dict()
    for name, t in tensors.items():
        tensors[name] = checked_weight(t, expected[name], name, source)


@dataclass
class TrainState:
    path: Path
    step: int
    weights: dict[str, torch.Tensor]
    state: dict[str, Any]


def load_train_state(run_dir: str | Path, warn: Callable[[str], None] | None = None) -> TrainState:
    """The newest checkpoint whose checksums verify; damaged newer ones are skipped with a warning."""
    warn = warn or (lambda msg: None)
    checkpoints = list_checkpoints(run_dir)
    if not checkpoints:
        raise QuillError(f"{run_dir} has no checkpoint to resume from ({TRAIN_STATE_DIR}/ is empty "
                         f"or missing)")
    for path in reversed(checkpoints):
        problem = verify_checkpoint(path)
        if problem is None:
            try:
                weights = st_load(read_regular(state_file(path, MODEL_FILE), MAX_WEIGHTS_BYTES))
                tensors = st_load(read_regular(state_file(path, STATE_TENSORS_FILE), MAX_WEIGHTS_BYTES))
                skeleton = json.loads(read_regular(state_file(path, STATE_JSON_FILE), MAX_TEXT_BYTES))
                state = unpack_state(skeleton, tensors)
                return TrainState(path, int(state["step"]), weights, state)
            except (SafetensorError, ValueError, KeyError, OSError, QuillError) as e:
                problem = f"unreadable ({e})"
        warn(f"warning: checkpoint {path} is corrupt: {problem}; falling back to an older one")
    raise QuillError(f"no intact checkpoint in {Path(run_dir) / TRAIN_STATE_DIR} "
                     f"(all {len(checkpoints)} failed their checksums)")
