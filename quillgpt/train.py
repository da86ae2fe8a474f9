"""The training loop: data -> model -> AdamW with warmup + cosine decay -> run directory.

    from quillgpt import load_config, train
    result = train(load_config("shakespeare-char-cpu", {"data": "input.txt", "out": "runs/x"}))

Beyond the plain loop: mixed precision (`dtype`: bfloat16 / float16 autocast on CUDA and CPU,
`auto`), `torch.compile`, checkpoints in RUN/train_state/ for exact resume (`resume=RUN`), a stop
on SIGINT/SIGTERM that saves first, a wall-clock `time_budget`, DDP/FSDP under torchrun
(see distributed.py), MFU in the progress bar, TensorBoard, and RUN/loss.png at the end.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import random
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

from . import checkpoint as ckpt
from . import distributed as qdist
from .config import Config, config_from_dict, load_config, parse_duration
from .data import BatchSampler, Splits, prepare_training_data
from .errors import QuillError
from .fileio import atomic_write_text
from .generate import generate
from .model import build_model, count_params
from .optim import check_optimizer, lr_at, make_optimizer, native_bfloat16, set_lr  # noqa: F401 - lr_at: part of the API
from .tokenizers import Tokenizer, load_tokenizer

# metrics.csv as in Core; the rows of `Trainer.metrics` also carry "mfu" (progress bar, TensorBoard)
METRICS_COLUMNS = ["step", "elapsed_s", "lr", "train_loss", "val_loss", "tokens_per_s"]

# Keys that may change when a run is resumed (with --allow-config-change): they steer the rest of
# the schedule, logging and speed, not what has been trained so far.
SAFE_ON_RESUME = {
    "max_iters", "lr_decay_iters", "learning_rate", "min_lr", "warmup_iters", "grad_clip",
    "eval_interval", "eval_iters", "log_interval", "checkpoint_interval", "keep_last",
    "sample_tokens", "time_budget", "tensorboard", "device", "dtype", "compile",
    "lr_schedule", "cooldown_frac", "muon_lr",
}
# Keys never compared on resume: where the run lives, and what the tokenizer fills in.
IGNORED_ON_RESUME = {"out", "vocab_size"}


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT/SIGTERM arrived; a checkpoint was saved first."""


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


CPU_PRESET = "shakespeare-char-cpu"


def default_preset(overrides: dict[str, Any] | None = None) -> str | None:
    """The preset `quill train` starts from when it is given none. Where training runs on a CPU:
    nanoGPT's CPU recipe (0.8M parameters, context 64, 2000 steps: minutes on 2 cores), since the
    defaults (nanoGPT's GPU recipe: 10.7M parameters, context 256, evaluation over 200 batches)
    take hours there. On a GPU, and when fine-tuning (`init_from` brings its own model): None,
    the defaults."""
    overrides = overrides or {}
    if overrides.get("init_from"):
        return None
    return CPU_PRESET if resolve_device(overrides.get("device") or "auto").type == "cpu" else None


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


def make_sampler(tokens: np.ndarray, block_size: int, batch_size: int, seed: int, device: torch.device,
                 info: qdist.DistInfo) -> BatchSampler:
    if not info.enabled:
        return BatchSampler(tokens, block_size, batch_size, seed, device)
    return BatchSampler(tokens, block_size, batch_size, seed, device, rank=info.rank,
                        world_size=info.world_size)


def data_fingerprint(splits: Splits, chunk: int = 1 << 20) -> str:
    """sha256 of the split sizes and a sample of the tokens (head, tail and 64 strided pieces),
    to notice a resume on different data without reading a large memory-mapped corpus."""
    h = hashlib.sha256()
    for arr in (splits.train, splits.val):
        arr = np.asarray(arr)
        h.update(f"{len(arr)}:{arr.dtype}".encode())
        if len(arr) <= 8 * chunk:
            h.update(np.ascontiguousarray(arr).tobytes())
            continue
        for start in np.linspace(0, len(arr) - chunk // 16, 64).astype(np.int64):
            h.update(np.ascontiguousarray(arr[start:start + chunk // 16]).tobytes())
    return h.hexdigest()


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


def flops_per_token(model: nn.Module, n_params: int) -> float:
    """Training FLOPs per token (forward + backward), as in the PaLM paper / nanoGPT:
    6 N for the weights plus 12 L T C for attention scores and their use."""
    mc = getattr(model, "config", None)
    extra = 0.0
    if mc is not None:
        extra = 12 * mc.n_layer * mc.block_size * mc.n_embd
    return 6 * n_params + extra


# Dense peak FLOP/s of some GPUs for bf16/fp16 tensor cores (vendor data sheets, SXM parts).
GPU_PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12,
                  "A10": 125e12, "4090": 165e12, "3090": 71e12, "V100": 125e12, "T4": 65e12}
_CPU_PEAK: dict[str, float] = {}


def peak_flops(device: torch.device, dtype: str) -> float | None:
    """The device's peak FLOP/s for `dtype`: a table for GPUs; on a CPU, measured once by timing a
    matrix multiply (so MFU there is relative to what the CPU's matmul actually reaches); none
    for a low precision the CPU only emulates."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, flops in GPU_PEAK_FLOPS.items():
            if key in name:
                return flops if dtype != "float32" else flops / 2  # TF32 runs at half rate
        return None
    if device.type != "cpu" or (dtype != "float32" and not native_bfloat16(device)):
        return None  # an emulated low-precision matmul is no peak to measure against
    if dtype not in _CPU_PEAK:
        n = 512
        g = torch.Generator().manual_seed(0)  # leaves the global RNG alone (exact resume)
        a = torch.randn(n, n, generator=g).to(getattr(torch, dtype))
        b = torch.randn(n, n, generator=g).to(getattr(torch, dtype))
        for _ in range(3):
            a @ b
        reps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < 0.1:
            a @ b
            reps += 1
        _CPU_PEAK[dtype] = 2 * n**3 * reps / (time.perf_counter() - t0)
    return _CPU_PEAK[dtype]


@dataclass
class TrainResult:
    run_dir: Path | None
    steps: int
    train_loss: float
    val_loss: float
    best_val_loss: float
    elapsed_s: float
    tokens_per_s: float
    sample: str
    losses: list[float]  # the training loss of every step, in order


class Trainer:
    """One training run. `Trainer(cfg).run()` does everything `quill train` does.

    `resume=RUN` continues RUN from its newest intact checkpoint (cfg from `resume_config`)."""

    def __init__(self, cfg: Config, overwrite: bool = False, save: bool = True,
                 progress: bool = True, log: Callable[[str], None] | None = None,
                 start_time: float | None = None, resume: str | Path | None = None):
        self.start_time = start_time if start_time is not None else time.time()
        self.cfg = cfg
        cfg.validate()
        t = cfg.train
        device = resolve_device(t.device)
        check_optimizer(cfg, t.fsdp)
        self.dist, self.device = qdist.init_distributed(device, t.fsdp)
        self.is_main = self.dist.is_main
        self.save = save and self.is_main
        self.progress = progress and self.is_main
        quiet = (lambda msg: None)
        self.log = (log or (lambda msg: print(msg, file=sys.stderr))) if self.is_main else quiet
        self.resume_dir = Path(resume) if resume is not None else None
        if self.resume_dir is not None:
            self.out = self.resume_dir
            save = True  # a resumed run goes on writing into its own directory
        else:
            self.out = Path(t.out) if t.out else default_out_dir(cfg)
            if save and self.is_main:
                check_out_dir(self.out, overwrite)
        self.save = save and self.is_main
        if save:
            t.out = str(self.out)
        self.dtype = resolve_dtype(t.dtype, self.device, cfg.model.n_embd)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True  # TF32 on Ampere and newer
            torch.backends.cudnn.allow_tf32 = True

        self.tokenizer: Tokenizer
        self.splits: Splits
        init_state = None
        if t.init_from and self.resume_dir is None:
            from .hf import init_from

            # the source's architecture (block_size cropped), its tokenizer, lr 3e-5 unless set
            _, init_state = init_from(t.init_from, cfg)
            self.log(f"fine-tuning from {t.init_from}: learning rate {t.learning_rate:g}, "
                     f"context {cfg.model.block_size}")
        self.tokenizer, self.splits = prepare_training_data(cfg)
        cfg.model.vocab_size = self.tokenizer.vocab_size
        self.data_sha256 = data_fingerprint(self.splits)

        seed_everything(t.seed)  # the same initial weights on every rank
        self.model = build_model(cfg.model)
        if init_state is not None:
            self.model.load_state_dict(init_state)
        self.model.to(self.device)
        self.n_params = count_params(self.model)
        self.flops_per_token = flops_per_token(self.model, self.n_params)
        self.log(f"number of parameters: {self.n_params / 1e6:.2f}M")
        dtype_note = f"{self.dtype} (auto)" if t.dtype == "auto" else self.dtype
        ranks = f", {self.dist.world_size} processes ({'FSDP' if t.fsdp else 'DDP'})" \
            if self.dist.enabled else ""
        self.log(
            f"data: {len(self.splits.train):,} train / {len(self.splits.val):,} val tokens, "
            f"vocabulary {self.tokenizer.vocab_size}, device {self.device}, dtype {dtype_note}{ranks}"
        )
        if self.dtype == "bfloat16" and self.device.type == "cpu" and not native_bfloat16(self.device):
            self.log("warning: this CPU has no native bfloat16 (AVX-512-BF16 or AMX), so bfloat16 is "
                     "emulated and far slower than float32; --dtype auto picks float32 here")
        self.train_model = qdist.wrap_model(self.model, self.dist, self.device)
        self.optimizer = make_optimizer(self.model, cfg, self.device)
        self.train_model = self._maybe_compile(self.train_model)
        self.forward_model = self.train_model if not isinstance(
            self.train_model, nn.parallel.DistributedDataParallel) else self.model
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == "float16")
        self.autocast = autocast_context(self.device, self.dtype)
        self.batches = make_sampler(self.splits.train, cfg.model.block_size, t.batch_size, t.seed,
                                    self.device, self.dist)
        if self.dist.enabled:
            torch.manual_seed(t.seed + self.dist.rank)  # different dropout masks per rank
        self.metrics: list[dict] = []
        self.best_val = float("inf")
        self.last_val: float | None = None
        self.losses: list[float] = []
        self.step = 0
        self.total_iters = t.max_iters
        self.budget_s = parse_duration(t.time_budget) if t.time_budget else None
        self._stop_signal: int | None = None
        self._compile_checked = not t.compile
        self.tb = None
        if self.resume_dir is not None:
            self._load_checkpoint()

    # --- setup ---------------------------------------------------------------------------------

    def _maybe_compile(self, model: nn.Module) -> nn.Module:
        if not self.cfg.train.compile:
            return model
        try:
            return torch.compile(model)
        except Exception as e:  # noqa: BLE001 - any compiler failure falls back to eager
            self.log(f"torch.compile unavailable ({type(e).__name__}: {e}); training without it")
            self._compile_checked = True
            return model

    def _call(self, which: str, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """self.<which>(x, y); torch.compile's errors surface on the first call: fall back then."""
        if self._compile_checked:
            return getattr(self, which)(x, y)
        try:
            out = getattr(self, which)(x, y)
        except Exception as e:  # noqa: BLE001 - any compiler failure falls back to eager
            self._compile_fallback(e)
            out = getattr(self, which)(x, y)
        if which == "train_model":
            self._compile_checked = True
        return out

    def _compile_fallback(self, e: Exception) -> None:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        self.log(f"torch.compile failed ({type(e).__name__}: {first[:200]}); training without it")
        self.train_model = getattr(self.train_model, "_orig_mod", self.train_model)  # un-compiled
        self.forward_model = self.train_model if not isinstance(
            self.train_model, nn.parallel.DistributedDataParallel) else self.model
        self.optimizer.zero_grad(set_to_none=True)
        self._compile_checked = True

    # --- checkpoints ---------------------------------------------------------------------------

    def _load_checkpoint(self) -> None:
        assert self.resume_dir is not None
        saved_tok = load_tokenizer(self.resume_dir / ckpt.TOKENIZER_FILE)
        if saved_tok.to_dict() != self.tokenizer.to_dict():
            raise QuillError(f"--resume {self.resume_dir}: the data gives a different tokenizer than "
                             f"the run's; resume with the data it was trained on")
        ts = ckpt.load_train_state(self.resume_dir, warn=self.log)
        st = ts.state
        if st.get("data_sha256") != self.data_sha256:
            raise QuillError(f"--resume {self.resume_dir}: the training data differs from the data "
                             f"the run was trained on")
        fmt = "fqn" if self.dist.fsdp else "torch"
        if st.get("optimizer_format") != fmt:
            raise QuillError(f"--resume {self.resume_dir}: the checkpoint was written "
                             f"{'with' if fmt == 'torch' else 'without'} --fsdp; resume the same way")
        qdist.load_full_state(self.model, self.optimizer, ts.weights, st["optimizer"], self.dist)
        set_rng_state(st["rng"])
        if self.dist.enabled:  # rank 0's RNG was saved; other ranks get their own stream back
            torch.manual_seed(self.cfg.train.seed + self.dist.rank + 7919 * ts.step)
        self.batches.set_state(st["sampler"])
        self.metrics = st["metrics"]
        self.losses = [float(x) for x in st["losses"]]
        self.best_val = float(st["best_val_loss"])
        self.last_val = st.get("val_loss")
        self.step = ts.step
        self.log(f"resuming {self.resume_dir} from step {ts.step} ({ts.path.name})")

    def save_checkpoint(self) -> Path | None:
        """Write RUN/train_state/step-N (collective under FSDP; rank 0 writes)."""
        if not self.save and not self.dist.fsdp:
            qdist.barrier(self.dist)
            return None
        weights = qdist.full_model_state(self.model, self.dist)
        optim_state = qdist.full_optimizer_state(self.model, self.optimizer, self.dist)
        path = None
        if self.save:
            state = {
                "step": self.step,
                "optimizer": optim_state,
                "optimizer_format": "fqn" if self.dist.fsdp else "torch",
                "rng": rng_state(),
                "sampler": self.batches.state(),
                "metrics": self.metrics,
                "losses": self.losses,
                "best_val_loss": self.best_val,
                "val_loss": self.last_val,
                "data_sha256": self.data_sha256,
                "config": self.cfg.to_dict(),
            }
            path = ckpt.save_train_state(self.out, self.step, weights, state, self.cfg.train.keep_last)
            ckpt.save_tensors(weights, self.out / ckpt.MODEL_FILE, {"step": str(self.step)})
            self.write_metrics()
        qdist.barrier(self.dist)
        return path

    # --- the loop ------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean loss over `eval_iters` batches of each split, from fixed seeds (same batches each time)."""
        self.model.eval()
        out = {}
        t = self.cfg.train
        for i, (name, tokens) in enumerate((("train", self.splits.train), ("val", self.splits.val))):
            sampler = BatchSampler(tokens, self.cfg.model.block_size, t.batch_size, t.seed + 1 + i,
                                   self.device)
            total = torch.zeros((), device=self.device)
            for _ in range(t.eval_iters):
                x, y = sampler.next()
                with self.autocast:
                    _, loss = self._call("forward_model", x, y)
                total += loss.float()
            # the mean over ranks, so that every rank takes the same decisions (best weights)
            out[name] = qdist.all_reduce_mean(total, self.dist).item() / t.eval_iters
        self.model.train()
        return out

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's micro-batch. All ranks share one random stream and each keeps its own
        slice of every draw (see BatchSampler), so N processes see exactly the batches one
        process sees with N x the gradient accumulation."""
        return self.batches.next()

    def train_step(self, step: int) -> tuple[torch.Tensor, float]:
        """One optimizer step (with gradient accumulation); returns (loss as a tensor, lr)."""
        t = self.cfg.train
        lr = self.lr(step)
        set_lr(self.optimizer, lr, self.cfg)
        total = torch.zeros((), device=self.device)
        accum = t.gradient_accumulation_steps
        for micro in range(accum):
            x, y = self.next_batch()
            last = micro == accum - 1
            with self._no_sync(last), self.autocast:
                _, loss = self._call("train_model", x, y)
                loss = loss / accum
            with self._no_sync(last):
                self.scaler.scale(loss).backward()
            total += loss.detach().float()
        if t.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return total, lr

    def _no_sync(self, last: bool) -> contextlib.AbstractContextManager:
        """Gradient accumulation under DDP: communicate only on the last micro-step."""
        if last or not self.dist.enabled:
            if self.dist.fsdp:
                self.model.set_requires_gradient_sync(True)
            return contextlib.nullcontext()
        if self.dist.fsdp:
            self.model.set_requires_gradient_sync(False)
            return contextlib.nullcontext()
        return self.train_model.no_sync()

    def lr(self, step: int) -> float:
        return lr_at(step, self.cfg)

    def write_metrics(self) -> None:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=METRICS_COLUMNS)
        writer.writeheader()
        for row in self.metrics:
            writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in METRICS_COLUMNS})
        atomic_write_text(self.out / ckpt.METRICS_FILE, buf.getvalue())

    def _install_signal_handlers(self) -> dict:
        if threading.current_thread() is not threading.main_thread():
            return {}

        def handler(signum: int, frame: Any) -> None:
            self._stop_signal = signum

        previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, handler)
        return previous

    def _plan(self, now: float, steps_this_session: int, session_start: float) -> None:
        """Under a time budget: fit max_iters (and the LR decay) to the time left, from the
        average time per step so far (evaluations included)."""
        if self.budget_s is None or steps_this_session < 5:
            return
        t = self.cfg.train
        per_step = (now - session_start) / steps_this_session
        reserve = 0.03 * self.budget_s + 2 * self._eval_seconds  # final eval, sample and save
        left = self.budget_s - (now - self.start_time) - reserve
        planned = self.step + max(0, int(left / per_step))  # 0 more: out of time, stop here
        if planned != self.total_iters:
            self.total_iters = planned
            t.max_iters = planned
            t.lr_decay_iters = planned
            t.warmup_iters = min(t.warmup_iters, max(0, planned // 10))

    def run(self) -> TrainResult:
        try:
            return self._run()
        except torch.cuda.OutOfMemoryError:
            t = self.cfg.train
            smaller = max(1, t.batch_size // 2)
            raise QuillError(
                f"CUDA out of memory with batch_size {t.batch_size} x block_size "
                f"{self.cfg.model.block_size}; try --batch-size {smaller} --gradient-accumulation-steps "
                f"{t.gradient_accumulation_steps * 2} (same tokens per step)") from None
        finally:
            if self.tb is not None:
                self.tb.close()
            qdist.cleanup(self.dist)

    def _run(self) -> TrainResult:
        cfg, t = self.cfg, self.cfg.train
        if self.save:
            self.out.mkdir(parents=True, exist_ok=True)
            if self.resume_dir is None:  # --overwrite: the old run's checkpoints must not resume
                shutil.rmtree(self.out / ckpt.TRAIN_STATE_DIR, ignore_errors=True)
            ckpt.save_config(cfg, self.out)
            self.tokenizer.save(self.out / ckpt.TOKENIZER_FILE)
            if t.tensorboard:
                self.tb = open_tensorboard(self.out, self.log)
        tokens_per_step = (t.batch_size * t.gradient_accumulation_steps * cfg.model.block_size
                           * self.dist.world_size)
        checkpoint_every = t.checkpoint_interval or t.eval_interval
        self._eval_seconds = 0.0
        last_eval: dict[str, float] | None = None
        if self.step == 0:
            t0 = time.time()
            last_eval = self.evaluate()
            self._eval_seconds = time.time() - t0
            self._record(0, t.learning_rate if t.warmup_iters == 0 else lr_at(0, cfg), last_eval["train"],
                         last_eval, None)
        bar = tqdm(total=self.total_iters, initial=self.step, disable=not self.progress, unit="step",
                   dynamic_ncols=True, file=sys.stderr)
        pending: list[torch.Tensor] = []  # losses not yet copied to the host (one sync per log)
        last_logged = self.step
        window_start = session_start = time.time()
        start_step = self.step
        tokens_per_s = 0.0
        previous_handlers = self._install_signal_handlers()
        try:
            while self.step < self.total_iters:
                loss, lr = self.train_step(self.step)
                pending.append(loss)
                self.step += 1
                bar.update(1)
                step = self.step
                is_eval = step % t.eval_interval == 0 or step == self.total_iters
                stop = qdist.any_rank(self._stop_signal is not None, self.dist, self.device) \
                    if self.dist.enabled else self._stop_signal is not None
                if step % t.log_interval == 0 or is_eval or stop:
                    now = time.time()
                    pending = self._flush_losses(pending)
                    n = step - last_logged
                    tokens_per_s = n * tokens_per_step / max(now - window_start, 1e-9)
                    ev = None
                    if is_eval:
                        t0 = time.time()
                        ev = last_eval = self.evaluate()
                        self._eval_seconds = time.time() - t0
                    window = self.losses[last_logged:step]
                    mfu = self._mfu(tokens_per_s)
                    self._record(step, lr, sum(window) / len(window), ev, tokens_per_s, mfu)
                    postfix = {"loss": f"{window[-1]:.4f}", "tok/s": f"{tokens_per_s:,.0f}"}
                    if mfu is not None:
                        postfix["mfu"] = f"{100 * mfu:.1f}%"
                    if ev:
                        postfix["val"] = f"{ev['val']:.4f}"
                        msg = f"step {step}: train loss {ev['train']:.4f}, val loss {ev['val']:.4f}"
                        if self.progress:
                            bar.write(msg, file=sys.stderr)
                        else:
                            self.log(msg)
                    bar.set_postfix(postfix)
                    last_logged = step
                    self._plan(time.time(), step - start_step, session_start)
                    if bar.total != self.total_iters:
                        bar.total = self.total_iters
                        bar.refresh()
                    window_start = time.time()  # evaluation time is not counted in tokens/s
                if stop:
                    bar.close()
                    self.save_checkpoint()
                    if self.save:
                        self.write_metrics()
                        self._plot()
                    self.log(f"stopped by signal {self._stop_signal} at step {step}; checkpoint saved. "
                             f"Continue with: quill train --resume {self.out}")
                    raise TrainingInterrupted(f"stopped at step {step}")
                if step % checkpoint_every == 0 and step < self.total_iters:
                    pending = self._flush_losses(pending)  # the checkpoint holds every loss so far
                    self.save_checkpoint()
        finally:
            for sig, h in previous_handlers.items():
                signal.signal(sig, h)
        bar.close()
        train_time = time.time() - session_start
        avg_tokens_per_s = (self.step - start_step) * tokens_per_step / max(train_time, 1e-9)
        if last_eval is None:  # resumed at the very end: nothing trained in this session
            last_eval = self.evaluate()

        sample = ""
        if t.sample_tokens > 0:
            sample = generate(self.model, self.tokenizer, "", max_new_tokens=t.sample_tokens,
                              temperature=0.8, top_k=200, seed=t.seed)
        if self.budget_s is not None and self.save:
            ckpt.save_config(cfg, self.out)  # max_iters as actually trained
        self.save_checkpoint()
        if self.save:
            self._plot()
        return TrainResult(
            run_dir=self.out if self.save else None,
            steps=self.step,
            train_loss=last_eval["train"],
            val_loss=last_eval["val"],
            best_val_loss=self.best_val,
            elapsed_s=time.time() - self.start_time,
            tokens_per_s=avg_tokens_per_s,
            sample=sample,
            losses=list(self.losses),
        )

    def _flush_losses(self, pending: list[torch.Tensor]) -> list[torch.Tensor]:
        """Copy the losses of the steps since the last flush to the host (one sync), averaged
        over ranks, into self.losses; returns the emptied list."""
        if pending:
            self.losses.extend(qdist.all_reduce_mean(torch.stack(pending), self.dist).tolist())
        return []

    def _mfu(self, tokens_per_s: float) -> float | None:
        if not self.progress and self.tb is None and not self.save:
            return None
        peak = peak_flops(self.device, self.dtype)
        if not peak:
            return None
        return tokens_per_s * self.flops_per_token / (peak * self.dist.world_size)

    def _plot(self) -> None:
        from .plot import plot_run

        try:
            plot_run(self.out)
        except QuillError as e:
            self.log(f"no loss.png: {e}")

    def _record(self, step: int, lr: float, train_loss: float, ev: dict | None,
                tokens_per_s: float | None, mfu: float | None = None) -> None:
        row = {
            "step": step,
            "elapsed_s": round(time.time() - self.start_time, 3),
            "lr": f"{lr:.6g}",
            "train_loss": f"{train_loss:.6f}",
            "val_loss": f"{ev['val']:.6f}" if ev else None,
            "tokens_per_s": f"{tokens_per_s:.1f}" if tokens_per_s is not None else None,
            "mfu": f"{mfu:.4f}" if mfu is not None else None,
        }
        self.metrics.append(row)
        if self.tb is not None:
            self.tb.add_scalar("loss/train", train_loss, step)
            self.tb.add_scalar("lr", lr, step)
            if ev:
                self.tb.add_scalar("loss/val", ev["val"], step)
            if tokens_per_s:
                self.tb.add_scalar("tokens_per_s", tokens_per_s, step)
        if ev:
            self.last_val = ev["val"]
        if ev and ev["val"] < self.best_val:
            self.best_val = ev["val"]
            weights = qdist.full_model_state(self.model, self.dist) \
                if self.save or self.dist.fsdp else {}
            if self.save:
                ckpt.save_tensors(weights, self.out / ckpt.BEST_FILE, {"step": str(step)})
        if self.save and ev:
            self.write_metrics()


def open_tensorboard(run_dir: Path, log: Callable[[str], None]) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise QuillError("--tensorboard needs the tensorboard package: "
                         "pip install 'quillgpt[tensorboard]'") from None
    log(f"tensorboard: tensorboard --logdir {run_dir / 'tensorboard'}")
    return SummaryWriter(str(run_dir / "tensorboard"))


def train(cfg: Config, overwrite: bool = False, save: bool = True, progress: bool = True,
          start_time: float | None = None, resume: str | Path | None = None) -> TrainResult:
    """Train a model as `cfg` says; see `Trainer`."""
    return Trainer(cfg, overwrite=overwrite, save=save, progress=progress, start_time=start_time,
                   resume=resume).run()
