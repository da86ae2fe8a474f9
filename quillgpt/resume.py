"""Training into a run directory: where a run goes, when it may be replaced or continued, and
the checkpoints in RUN/train_state/ that make a resumed run continue exactly.

    cfg = resume_config("runs/x")                  # the run's own config (or a checked new one)
    Trainer(cfg, resume="runs/x").run()           # continues from the newest intact checkpoint
"""

from __future__ import annotations

import copy
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from . import checkpoint as ckpt
from . import distributed as qdist
from .config import Config, config_from_dict, load_config
from .data import BatchSource, Splits, TokenData, check_lengths, data_fingerprint
from .download import KNOWN_DATASETS, cache_dir
from .errors import QuillError, shown
from .fileio import check_apart, sweep_temporaries
from .prepared import is_prepared_dir, load_prepared
from .runtime import set_rng_state
from .tokenizers import Tokenizer, load_tokenizer

# Keys that may change when a run is resumed (with --allow-config-change): they steer the rest of
# the schedule, logging and speed, not what has been trained so far.
SAFE_ON_RESUME = {
    "max_iters", "lr_decay_iters", "learning_rate", "min_lr", "warmup_iters", "grad_clip",
    "eval_interval", "eval_iters", "log_interval", "checkpoint_interval", "keep_last",
    "sample_tokens", "sample_temperature", "time_budget", "tensorboard", "device", "dtype", "compile",
    "lr_schedule", "cooldown_frac", "muon_lr",
    "eval_tasks", "eval_tasks_interval", "eval_tasks_limit", "eval_tasks_path",
}
# Keys never compared on resume: where the run lives, what the tokenizer fills in, and where its
# data is now (the data's fingerprint decides whether it is the same data).
IGNORED_ON_RESUME = {"out", "vocab_size", "data"}


def default_out_dir(cfg: Config) -> Path:
    name = Path(cfg.train.data).stem if cfg.train.data else "shakespeare"
    return Path("runs") / name


def check_out_dir(out: Path, overwrite: bool) -> None:
    """Refuse to train into an existing run (or any non-empty directory) without --overwrite."""
    if out.exists() and not out.is_dir():
        raise QuillError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        what = "a run" if ckpt.is_run_dir(out) else "a non-empty directory"
        raise QuillError(f"--out {out} is {what}; pass --overwrite to replace it "
                         f"(or --resume {out} to continue it)")


def run_dir_for(cfg: Config, resume_dir: Path | None, overwrite: bool, check: bool) -> Path:
    """Where a run writes: the run it resumes, --out, or runs/<data name>. `check`: refuse to
    replace an existing run or non-empty directory without `overwrite`."""
    if resume_dir is not None:
        return resume_dir
    out = Path(cfg.train.out) if cfg.train.out else default_out_dir(cfg)
    if check:
        t = cfg.train
        check_apart(out, [p for p in (t.data, t.tokenizer, t.init_from) if p and not str(p).startswith("http")])
        check_out_dir(out, overwrite)
    return out


def config_differences(old: Config, new: Config) -> list[tuple[str, Any, Any]]:
    """(key, old value, new value) for every key that differs, in config order."""
    a, b = old.to_dict(), new.to_dict()
    diffs = []
    for section in ("model", "train"):
        for key, value in a[section].items():
            if key not in IGNORED_ON_RESUME and b[section].get(key) != value:
                diffs.append((key, value, b[section].get(key)))
    return diffs


def resume_config(run_dir: str | Path, config: str | Path | None = None,
                  overrides: dict[str, Any] | None = None, allow_config_change: bool = False) -> Config:
    """The config to continue RUN with: the run's own, or `config`, plus `overrides`.

    Any difference from the run's config is an error that lists the differences;
    `allow_config_change` lets the keys in SAFE_ON_RESUME (max_iters, ...) change."""
    run_dir = Path(run_dir)
    if not ckpt.is_run_dir(run_dir):
        raise QuillError(f"--resume {run_dir}: not a run directory (no {ckpt.CONFIG_FILE} and "
                         f"{ckpt.TOKENIZER_FILE})")
    saved = ckpt.read_run_config(run_dir)
    if config is not None:
        cfg = load_config(config, overrides)
    else:
        cfg = config_from_dict(saved.to_dict())
        cfg.update(overrides or {})
        cfg.validate()
    cfg.model.vocab_size = saved.model.vocab_size
    cfg.train.out = str(run_dir)
    cfg.train.data = saved.train.data  # where the data is comes from --data on resume (Trainer)
    diffs = config_differences(saved, cfg)
    unsafe = [d for d in diffs if d[0] not in SAFE_ON_RESUME]
    if diffs and (unsafe or not allow_config_change):
        listing = ", ".join(f"{k} {a!r} -> {b!r}" for k, a, b in diffs)
        if unsafe:
            hint = (f"{', '.join(k for k, _, _ in unsafe)} cannot change on resume; start a new run "
                    f"with --out")
        else:
            hint = "pass --allow-config-change to continue with the new values"
        raise QuillError(f"the config differs from {run_dir}'s: {listing}; {hint}")
    return cfg


def check_loop_state(st: dict[str, Any], source: str | Path) -> None:
    """The JSON part of a checkpoint's state has the types the loop reads (its checksum only says
    it was not damaged on disk, not that whoever wrote it wrote the right thing)."""
    def need(ok: bool, what: str) -> None:
        if not ok:
            raise QuillError(f"{source}: state.json {what}; the checkpoint cannot be resumed")

    def number(x: Any) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool)

    need(isinstance(st.get("step"), int) and not isinstance(st.get("step"), bool) and st["step"] >= 0,
         "has no step count")
    need(isinstance(st.get("data_sha256"), str), "has no data fingerprint")
    need(isinstance(st.get("config"), dict), "has no config")
    need(isinstance(st.get("optimizer_format"), str), "has no optimizer format")
    rows = st.get("metrics")
    need(isinstance(rows, list) and all(isinstance(r, dict) and all(isinstance(k, str) and (v is None or isinstance(
        v, (str, int, float))) for k, v in r.items()) for r in rows), "has malformed metrics rows")
    losses = st.get("losses")
    need(isinstance(losses, list) and all(number(x) for x in losses), "has malformed losses")
    need(number(st.get("best_val_loss")), "has no best val loss")
    need(st.get("val_loss") is None or number(st.get("val_loss")), "has a malformed val loss")


def check_resume(run_dir: Path, cfg: Config) -> dict[str, Any]:
    """Before anything is built or written: the newest checkpoint's state (its JSON) is well
    formed, and the config the run resumes with has the checkpoint's shape (config.yaml may have
    been edited since). Returns that JSON state."""
    path, st = ckpt.peek_train_state(run_dir)
    check_loop_state(st, path)
    try:
        trained = config_from_dict(st["config"])
    except QuillError as e:
        raise QuillError(f"{path}: the checkpoint's config is damaged ({e})") from None
    diffs = [d for d in config_differences(trained, cfg) if d[0] not in SAFE_ON_RESUME]
    if diffs:
        listing = ", ".join(f"{k} {shown(a)} -> {shown(b)}" for k, a, b in diffs[:8])
        raise QuillError(f"{run_dir / ckpt.CONFIG_FILE} differs from the config its checkpoint {path.name} was "
                         f"trained with: {listing}; a run resumes in its own shape (start a new run with --out)")
    return st


def resume_tokenizer_spec(run_dir: Path, spec: str) -> str:
    """How to tokenize --data for a resumed run: a tokenizer that learns from the data (char,
    bpe[:N], syllable[:N]) learns again (the same cache entry as the first time); GPT-2's when
    its ranks are already here; anything else from the run's own tokenizer.json (a path in the
    run's config is never read)."""
    from .tokenizers.gpt2 import GPT2_RANKS_NAME

    kind = spec.partition(":")[0]
    if kind in ("char", "bpe", "syllable") and not spec.endswith(".json"):
        return spec
    if spec == "gpt2" and (cache_dir() / GPT2_RANKS_NAME).is_file():
        return spec
    return str(run_dir / ckpt.TOKENIZER_FILE)


def resume_data(run_dir: Path, cfg: Config, data: str | None, fingerprint: str) -> TokenData:
    """The data a resumed run continues on, whose fingerprint must be the checkpoint's.

    Resuming never downloads and never reads a path the run's config.yaml names (a run directory
    may come from anyone). With `data` (the user's `--data`): that local corpus, prepared as the
    run's tokenizer says. Without: the prepared data in this machine's cache with that
    fingerprint (where the first session put it)."""
    if data is not None:
        if re.match(r"[a-z]+://", str(data)) or (str(data) in KNOWN_DATASETS and not Path(data).exists()):
            raise QuillError(f"--resume never downloads; pass --data with a local copy of {shown(data)}")
        local = copy.deepcopy(cfg)
        local.train.data, local.train.tokenizer = str(data), resume_tokenizer_spec(run_dir, cfg.train.tokenizer)
        found = TokenData.from_config(local)
        if found.fingerprint() != fingerprint:
            raise QuillError(f"--data {data} is not the data {run_dir} was trained on (its tokens differ); "
                             f"resume with the data it was trained on")
        return found
    stem = Path(cfg.train.data).name.split(".")[0] if cfg.train.data else "tinyshakespeare"
    root = cache_dir() / "prepared"
    entries = sorted(root.iterdir(), key=lambda p: (not p.name.startswith(stem), p.name)) if root.is_dir() else []
    for entry in entries:
        if not is_prepared_dir(entry):
            continue
        try:
            tokenizer, train, val, _ = load_prepared(entry)
        except QuillError:
            continue
        splits = Splits(train, val)
        if data_fingerprint(splits) == fingerprint:
            check_lengths(splits, cfg.model.block_size)
            return TokenData(tokenizer, splits, cfg.model.block_size)
    trained_on = f" ({shown(cfg.train.data)})" if cfg.train.data else ""
    raise QuillError(f"the data {run_dir} was trained on{trained_on} is not in this machine's cache, and "
                     f"resuming never downloads nor reads paths from a run's config: pass --data with a "
                     f"local copy of it (its tokens are checked against the checkpoint)")


class Checkpointer:
    """Writes and reads RUN/train_state/step-N: the full weights and optimizer state (gathered
    from every rank under FSDP; rank 0 writes) and the loop's own state (step, RNG, sampler,
    metrics, ...), plus RUN/model.safetensors with the same weights."""

    def __init__(self, out: Path, dist: qdist.DistInfo, enabled: bool, keep_last: int):
        self.out = out
        self.dist = dist
        self.enabled = enabled  # False: nothing written (rank > 0, or save=False)
        self.keep_last = keep_last

    def start(self, cfg: Config, tokenizer: Tokenizer, fresh: bool) -> None:
        """config.yaml and tokenizer.json first. A fresh run (not a resumed one) in a replaced
        directory drops the old run's checkpoints: they must never be resumed into this one."""
        if not self.enabled:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        sweep_temporaries(self.out, ckpt.RUN_FILES)  # what a killed run left behind
        if fresh:
            shutil.rmtree(self.out / ckpt.TRAIN_STATE_DIR, ignore_errors=True)
        ckpt.save_config(cfg, self.out)
        tokenizer.save(self.out / ckpt.TOKENIZER_FILE)

    def save(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
             state: Callable[[], dict[str, Any]]) -> Path | None:
        """Collective under FSDP; `state()` is the loop's state, asked for on the writing rank only."""
        if not self.enabled and not self.dist.fsdp:
            qdist.barrier(self.dist)
            return None
        weights = qdist.full_model_state(model, self.dist)
        optim_state = qdist.full_optimizer_state(model, optimizer, self.dist)
        path = None
        if self.enabled:
            full = {"step": step, "optimizer": optim_state, "optimizer_format": self.optimizer_format,
                    **state()}
            path = ckpt.save_train_state(self.out, step, weights, full, self.keep_last)
            ckpt.save_tensors(weights, self.out / ckpt.MODEL_FILE, {"step": str(step)})
        qdist.barrier(self.dist)
        return path

    @property
    def optimizer_format(self) -> str:
        return "fqn" if self.dist.fsdp else "torch"

    def load(self, run_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer, batches: BatchSource,
             tokenizer: Tokenizer, data_sha256: str, seed: int, warn: Callable[[str], None]) -> ckpt.TrainState:
        """Load the newest intact checkpoint of `run_dir` into the model, the optimizer, the random
        generators and the batch source, after checking that it was trained with this tokenizer, on
        this data, in this layout. The loop's own state is in the returned `.state`."""
        saved_tok = load_tokenizer(ckpt.run_file(run_dir, ckpt.TOKENIZER_FILE))
        if saved_tok.to_dict() != tokenizer.to_dict():
            raise QuillError(f"--resume {run_dir}: the data gives a different tokenizer than "
                             f"the run's; resume with the data it was trained on")
        ts = ckpt.load_train_state(run_dir, warn=warn)
        st = ts.state
        check_loop_state(st, ts.path)
        if st.get("data_sha256") != data_sha256:
            raise QuillError(f"--resume {run_dir}: the training data differs from the data "
                             f"the run was trained on")
        if st.get("optimizer_format") != self.optimizer_format:
            raise QuillError(f"--resume {run_dir}: the checkpoint was written "
                             f"{'with' if self.optimizer_format == 'torch' else 'without'} --fsdp; "
                             f"resume the same way")
        ckpt.check_tensors_fit(ts.weights, model, str(ts.path / ckpt.MODEL_FILE))
        try:
            qdist.load_full_state(model, optimizer, ts.weights, st["optimizer"], self.dist)
            set_rng_state(st["rng"])
            if self.dist.enabled:  # rank 0's RNG was saved; other ranks get their own stream back
                torch.manual_seed(seed + self.dist.rank + 7919 * ts.step)
            batches.set_state(st["sampler"])
        except (KeyError, TypeError, ValueError, IndexError, RuntimeError, OverflowError) as e:
            raise QuillError(f"{ts.path}: the optimizer, random or sampler state does not fit this run "
                             f"({type(e).__name__}); the checkpoint cannot be resumed") from None
        return ts
