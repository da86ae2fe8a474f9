"""The training loop: data -> model -> AdamW with warmup + cosine decay -> run directory.

    from quillgpt import load_config
    from quillgpt.train import train
    result = train(load_config("shakespeare-char-cpu", {"data": "input.txt", "out": "runs/x"}))

`Trainer.run()` reads top to bottom as nanoGPT's train.py does: evaluate, then step, log,
evaluate and checkpoint until max_iters, then sample and save. Around it, small collaborators
each own one concern:

- the data (`data.TokenData`, or any `data.TrainingData`: conversations with loss masks plug in
  here) gives the batches;
- `EvalHook`s add their own numbers (benchmark scores, ...) to the evaluation steps;
- `metrics.MetricsLog` / `metrics.ProgressBar` report; `resume.Checkpointer` saves and restores;
- `CompiledModel` falls back to eager when `torch.compile` fails; `StopSignals` turns
  SIGINT/SIGTERM into a checkpoint and a clean stop; `TimeBudget` fits a run into a wall-clock
  budget;
- mixed precision and devices come from `runtime`, DDP/FSDP from `distributed`.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn as nn

from . import checkpoint as ckpt
from . import distributed as qdist
from . import runtime
from .config import Config
from .data import TokenData, TrainingData
from .errors import QuillError
from .generate import generate
from .losses import token_nll
from .metrics import MetricsLog, ProgressBar, RunRecorder, flops_per_token, open_tensorboard, peak_flops  # noqa: F401
from .model import count_params
from .optim import check_optimizer, lr_at, make_optimizer, set_lr
from .plot import plot_or_say
from .registry import build_model
from .resume import Checkpointer, check_resume, resume_config, run_dir_for  # noqa: F401 - resume_config: API
from .resume import resume_data as resume_training_data
from .runtime import autocast_context, resolve_device, resolve_dtype, rng_state, seed_everything
from .train_control import CompiledModel, StopSignals, TimeBudget

__all__ = [  # the loop, and the names its users have imported from here since the first release
    "EvalHook", "TrainResult", "Trainer", "TrainingInterrupted", "autocast_context", "default_preset",
    "lr_at", "peak_flops", "resolve_device", "resolve_dtype", "resume_config", "task_hooks", "train",
]


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT/SIGTERM arrived; a checkpoint was saved first."""


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


class EvalHook(Protocol):
    """Extra evaluation at the loop's evaluation steps: every `interval` steps (a multiple of
    eval_interval is natural), at step 0 and at the end. Returns named numbers; each name becomes
    a metrics.csv column (and a TensorBoard scalar)."""

    interval: int

    def __call__(self, model: nn.Module, step: int) -> dict[str, float]: ...


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


def init_weights(cfg: Config, log: Callable[[str], None]) -> dict[str, torch.Tensor] | None:
    """Fine-tuning (`init_from`): the source's weights. Its architecture (block_size cropped), its
    tokenizer and a learning rate of 3e-5 unless set are written into `cfg`."""
    if not cfg.train.init_from:
        return None
    from .hf import init_from

    _, state = init_from(cfg.train.init_from, cfg)
    log(f"fine-tuning from {cfg.train.init_from}: learning rate {cfg.train.learning_rate:g}, "
        f"context {cfg.model.block_size}")
    return state


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


class EvaluationStopped(Exception):
    """A stop signal arrived during the first evaluation (raised by its `tick`)."""


def training_data(cfg: Config, resume_dir: Path | None, resumed: dict[str, Any] | None,
                  resume_data: str | None) -> TrainingData:
    """The corpus `cfg` names; for a resumed run, the data with the checkpoint's fingerprint
    (never downloaded: see `resume.resume_data`), and `cfg.train.data` says where it is now."""
    if resume_dir is None or resumed is None:
        return TokenData.from_config(cfg)
    found = resume_training_data(resume_dir, cfg, resume_data, resumed["data_sha256"])
    if resume_data is not None:
        cfg.train.data = str(resume_data)
    return found


class LossEvaluator:
    """The loss on each split, averaged over `eval_iters` batches drawn from fixed seeds (the same
    batches every time), then the evaluation hooks that are due."""

    def __init__(self, trainer: Trainer, hooks: Sequence[EvalHook]):
        self.trainer = trainer
        self.hooks = list(hooks)

    @property
    def batches_per_eval(self) -> int:
        return 2 * self.trainer.cfg.train.eval_iters

    @torch.no_grad()
    def losses(self, tick: Callable[[], None] | None = None) -> dict[str, float]:
        """`tick` is called after every batch (a progress bar; it may raise to stop early)."""
        tr, t = self.trainer, self.trainer.cfg.train
        tr.model.eval()
        out = {}
        try:
            for i, name in enumerate(("train", "val")):
                batches = tr.data.batches(name, t.batch_size, t.seed + 1 + i, tr.device)
                total = torch.zeros((), device=tr.device)
                for _ in range(t.eval_iters):
                    x, y = batches.next()[:2]  # the plain mean, whatever token_loss the data has
                    with tr.autocast:
                        _, loss = tr.compiled("eval", x, y, tr.compile_fell_back)
                    total += loss.float()
                    if tick is not None:
                        tick()
                # the mean over ranks, so that every rank takes the same decisions (best weights)
                out[name] = qdist.all_reduce_mean(total, tr.dist).item() / t.eval_iters
        finally:
            tr.model.train()
        return out

    def evaluate(self, step: int, tick: Callable[[], None] | None = None
                 ) -> tuple[dict[str, float], dict[str, float]]:
        """The losses and the due hooks' numbers at `step`; their time goes to the time budget."""
        tr = self.trainer
        t0 = tr.budget.clock()
        ev = self.losses(tick)
        extra = self.hook_results(step, final=step == tr.total_iters)
        tr.budget.eval_seconds = tr.budget.clock() - t0
        return ev, extra

    def record(self, step: int, lr: float, train_loss: float | None, tokens_per_s: float | None,
               ev: dict[str, float], extra: dict[str, float]) -> None:
        if train_loss is None:  # step 0: no training batches yet, the train split stands in
            train_loss = ev["train"]
        self.trainer.recorder.record(step, lr, train_loss, ev, tokens_per_s, extra)

    def evaluate_and_record(self, step: int, lr: float, train_loss: float | None,
                            tokens_per_s: float | None, tick: Callable[[], None] | None = None,
                            data_metrics: dict[str, float] | None = None
                            ) -> tuple[dict[str, float], dict[str, float]]:
        """Evaluate (and run the hooks that are due), then record this step's metrics row (with
        the data's own numbers, `data_metrics`); returns the losses and the hooks' numbers."""
        ev, extra = self.evaluate(step, tick)
        self.record(step, lr, train_loss, tokens_per_s, ev, {**(data_metrics or {}), **extra})
        return ev, extra

    @torch.no_grad()
    def hook_results(self, step: int, final: bool) -> dict[str, float]:
        model = self.trainer.model
        extra: dict[str, float] = {}
        for hook in self.hooks:
            if step % hook.interval == 0 or final:
                model.eval()
                extra.update(hook(model, step))
                model.train()
        return extra


class Trainer:
    """One training run. `Trainer(cfg).run()` does everything `quill train` does.

    `resume=RUN` continues RUN from its newest intact checkpoint (cfg from `resume_config`), on
    the prepared data in the local cache with the checkpoint's fingerprint, or on `resume_data`
    (a local corpus, checked against it): a resume never downloads (see `resume.resume_data`).
    `data` replaces the corpus that `cfg.train.data` names (any `data.TrainingData`), and
    `hooks` add evaluations of their own (`EvalHook`)."""

    command = "quill train"  # how to continue the run (said when it is interrupted)

    def __init__(self, cfg: Config, overwrite: bool = False, save: bool = True,
                 progress: bool = True, log: Callable[[str], None] | None = None,
                 start_time: float | None = None, resume: str | Path | None = None,
                 data: TrainingData | None = None, hooks: Sequence[EvalHook] = (),
                 resume_data: str | None = None):
        self.start_time = start_time if start_time is not None else time.time()
        self.cfg = cfg
        cfg.validate()
        t = cfg.train
        device = resolve_device(t.device)
        check_optimizer(cfg, t.fsdp)
        self.dist, self.device = qdist.init_distributed(device, t.fsdp)
        self.progress = progress and self.dist.is_main
        quiet = (lambda msg: None)
        self.log = (log or (lambda msg: print(msg, file=sys.stderr))) if self.dist.is_main else quiet
        self.resume_dir = Path(resume) if resume is not None else None
        resumed = check_resume(self.resume_dir, cfg) if self.resume_dir is not None else None
        self.out = run_dir_for(cfg, self.resume_dir, overwrite, save and self.dist.is_main)
        if save or self.resume_dir is not None:
            t.out = str(self.out)
        self.save = (save or self.resume_dir is not None) and self.dist.is_main
        self.dtype = resolve_dtype(t.dtype, self.device, cfg.model.n_embd)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True  # TF32 on Ampere and newer
            torch.backends.cudnn.allow_tf32 = True

        init_state = init_weights(cfg, self.log) if self.resume_dir is None else None
        self.data = data if data is not None else training_data(cfg, self.resume_dir, resumed, resume_data)
        self.tokenizer = self.data.tokenizer
        self.token_loss = getattr(self.data, "token_loss", None)
        cfg.model.vocab_size = self.tokenizer.vocab_size
        self.data_sha256 = self.data.fingerprint()
        seed_everything(t.seed)  # the same initial weights on every rank
        self.model = build_model(cfg.model)
        if init_state is not None:
            from .hf import grow_vocabulary

            self.model.load_state_dict(grow_vocabulary(init_state, cfg.model.vocab_size, self.log))
        self.model.to(self.device)
        self.n_params = count_params(self.model)
        self._build_training(hooks)
        resuming = self._restore() if self.resume_dir is not None else None
        # said once everything is checked: a run that cannot start says only why
        for line in setup_lines(cfg, self.n_params, self.data, self.device, self.dtype, self.dist):
            self.log(line)
        if resuming:
            self.log(resuming)

    # --- setup ---------------------------------------------------------------------------------

    def _build_training(self, hooks: Sequence[EvalHook]) -> None:
        """Optimizer, compiled/wrapped model, precision, batches and the loop's collaborators."""
        cfg, t = self.cfg, self.cfg.train
        wrapped = qdist.wrap_model(self.model, self.dist, self.device)
        self.optimizer = make_optimizer(self.model, cfg, self.device)
        self.compiled = CompiledModel(wrapped, self.model, t.compile, self.log)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == "float16")
        self.autocast = autocast_context(self.device, self.dtype)
        self.batches = self.data.batches("train", t.batch_size, t.seed, self.device,
                                         self.dist.rank, self.dist.world_size)
        if self.dist.enabled:
            torch.manual_seed(t.seed + self.dist.rank)  # different dropout masks per rank
        self.evaluator = LossEvaluator(self, hooks)
        metrics = MetricsLog(self.out / ckpt.METRICS_FILE if self.save else None, self.start_time)
        self.recorder = RunRecorder(metrics, self.model, self.dist, self.out, self.save, self.device,
                                    self.dtype, flops_per_token(self.model, self.n_params))
        self.checkpoints = Checkpointer(self.out, self.dist, self.save, t.keep_last)
        self.budget = TimeBudget(t.time_budget, self.start_time)
        self.losses: list[float] = []
        self.tokens_seen = 0  # input tokens of every rank so far (batches may vary in length)
        self.step = 0
        self.total_iters = t.max_iters

    @property
    def metrics(self) -> list[dict[str, Any]]:
        """The metrics.csv rows so far (dicts of formatted values; "flops_per_s" and "mfu" too)."""
        return self.recorder.metrics.rows

    @property
    def splits(self) -> Any:
        """The token splits of the default data (benchmarks read them)."""
        return self.data.splits  # type: ignore[attr-defined]

    # --- checkpoints ---------------------------------------------------------------------------

    def _loop_state(self) -> dict[str, Any]:
        return {
            "rng": rng_state(),
            "sampler": self.batches.state(),
            "metrics": self.metrics,
            "losses": self.losses,
            "best_val_loss": self.recorder.best_val,
            "val_loss": self.recorder.last_val,
            "data_sha256": self.data_sha256,
            "config": self.cfg.to_dict(),
        }

    def save_checkpoint(self) -> Path | None:
        """Write RUN/train_state/step-N (collective under FSDP; rank 0 writes)."""
        path = self.checkpoints.save(self.step, self.model, self.optimizer, self._loop_state)
        self.recorder.metrics.write()
        return path

    def _restore(self) -> str:
        """Load the newest intact checkpoint; returns the line that says so."""
        assert self.resume_dir is not None
        ts = self.checkpoints.load(self.resume_dir, self.model, self.optimizer, self.batches,
                                   self.tokenizer, self.data_sha256, self.cfg.train.seed, self.log)
        st = ts.state
        self.recorder.metrics.rows = st["metrics"]
        self.losses = [float(x) for x in st["losses"]]
        self.recorder.best_val = float(st["best_val_loss"])
        self.recorder.last_val = st.get("val_loss")
        self.step = ts.step
        return f"resuming {self.resume_dir} from step {ts.step} ({ts.path.name})"

    # --- one step ------------------------------------------------------------------------------

    def train_step(self, step: int) -> tuple[torch.Tensor, float]:
        """One optimizer step (with gradient accumulation); returns (loss as a tensor, lr)."""
        t = self.cfg.train
        lr = lr_at(step, self.cfg)
        set_lr(self.optimizer, lr, self.cfg)
        total = torch.zeros((), device=self.device)
        accum = t.gradient_accumulation_steps
        for micro in range(accum):
            batch = self.batches.next()
            self.tokens_seen += batch[0].numel() * self.dist.world_size
            last = micro == accum - 1
            with self.compiled.no_sync(last, self.dist), self.autocast:
                loss = self.micro_loss(batch)
                loss = loss / accum
            with self.compiled.no_sync(last, self.dist):
                self.scaler.scale(loss).backward()
            total += loss.detach().float()
        if t.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return total, lr

    def micro_loss(self, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """The loss of one micro-batch: the model's mean over the scored tokens, or the data's
        `token_loss` of the per-token NLL when it has one (see data.TrainingData)."""
        x, y = batch[0], batch[1]
        if self.token_loss is None:
            return self.compiled("train", x, y, self.compile_fell_back)[1]
        logits, _ = self.compiled("train", x, None, self.compile_fell_back)
        loss = self.token_loss(token_nll(logits, y), batch)
        if loss.dim() != 0:
            raise ValueError(f"token_loss must return a scalar, got shape {tuple(loss.shape)}")
        return loss

    def compile_fell_back(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)  # gradients of a failed compiled step, if any

    def evaluate(self) -> dict[str, float]:
        """Mean loss over `eval_iters` batches of each split (see LossEvaluator)."""
        return self.evaluator.losses()

    # --- the loop ------------------------------------------------------------------------------

    def run(self) -> TrainResult:
        try:
            return self._run()
        except torch.cuda.OutOfMemoryError:
            raise QuillError(out_of_memory_message(self.cfg)) from None
        finally:
            self.recorder.metrics.close()
            qdist.cleanup(self.dist)

    def _run(self) -> TrainResult:
        t = self.cfg.train
        # the bar shows from the start: the first evaluation can take minutes on a CPU
        bar = ProgressBar(self.total_iters, self.step, self.progress, self.log)
        pending: list[torch.Tensor] = []  # losses not yet copied to the host (one sync per log)
        checkpoint_every = t.checkpoint_interval or t.eval_interval
        with StopSignals() as signals:
            first = self._first_evaluation(bar, signals) if self.step == 0 else None
            # nothing is written into the run directory before the first evaluation is done
            self.checkpoints.start(self.cfg, self.tokenizer, fresh=self.resume_dir is None)
            if self.save and t.tensorboard:
                self.recorder.metrics.tensorboard = open_tensorboard(self.out, self.log)
            last_eval = None
            if first is not None:
                first_lr = t.learning_rate if t.warmup_iters == 0 else lr_at(0, self.cfg)
                self.evaluator.record(0, first_lr, None, None, *first)
                last_eval = first[0]
            last_logged, start_step = self.step, self.step
            window_tokens = start_tokens = self.tokens_seen
            window_start = session_start = time.time()
            self.budget.start_session()
            while self.step < self.total_iters:
                loss, lr = self.train_step(self.step)
                pending.append(loss)
                self.step += 1
                bar.step()
                step = self.step
                is_eval = step % t.eval_interval == 0 or step == self.total_iters
                stop = self._any_rank(signals.signum is not None)
                if step % t.log_interval == 0 or is_eval or stop:
                    pending = self._flush_losses(pending)
                    tokens_per_s = (self.tokens_seen - window_tokens) / max(time.time() - window_start, 1e-9)
                    last_eval = self._log_step(step, lr, last_logged, tokens_per_s, is_eval, bar) or last_eval
                    last_logged = step
                    self.total_iters = self.budget.plan(self.cfg, step, self.total_iters, step - start_step)
                    bar.set_total(self.total_iters)
                    window_start, window_tokens = time.time(), self.tokens_seen  # evaluations not counted
                if stop:
                    self._stop(bar, signals.signum)
                if step % checkpoint_every == 0 and step < self.total_iters:
                    pending = self._flush_losses(pending)  # the checkpoint holds every loss so far
                    self.save_checkpoint()
        bar.close()
        train_time = time.time() - session_start
        return self._finish(last_eval, (self.tokens_seen - start_tokens) / max(train_time, 1e-9))

    def _first_evaluation(self, bar: ProgressBar, signals: StopSignals
                          ) -> tuple[dict[str, float], dict[str, float]]:
        """The evaluation at step 0, batch by batch on the bar. A stop signal ends it at the next
        batch; since nothing has been written yet, nothing is left behind."""
        existed = self.out.exists()

        def tick() -> None:
            bar.eval_tick()
            if self._any_rank(signals.signum is not None):
                raise EvaluationStopped

        bar.start_eval(0, self.evaluator.batches_per_eval)
        try:
            return self.evaluator.evaluate(0, tick)
        except EvaluationStopped:
            bar.close()
            where = (f"{self.out} is as it was" if existed else f"{self.out} was not created") if self.save else ""
            self.log(f"stopped by signal {signals.signum} during the first evaluation, before any training: "
                     f"nothing was written{' (' + where + ')' if where else ''}; run the same command to "
                     f"start again")
            raise TrainingInterrupted("stopped during the first evaluation") from None
        finally:
            bar.end_eval()

    @property
    def tokens_per_step(self) -> int:
        """Input tokens per optimizer step with full-length rows (token data always has them)."""
        t = self.cfg.train
        return t.batch_size * t.gradient_accumulation_steps * self.cfg.model.block_size * self.dist.world_size

    def _any_rank(self, flag: bool) -> bool:
        return qdist.any_rank(flag, self.dist, self.device) if self.dist.enabled else flag

    def _log_step(self, step: int, lr: float, last_logged: int, tokens_per_s: float, is_eval: bool,
                  bar: ProgressBar) -> dict[str, float] | None:
        """The metrics row of a logging step (with an evaluation on eval steps) and the bar."""
        window = self.losses[last_logged:step]
        mean_loss = sum(window) / len(window)
        ev = None
        own = self._data_metrics()
        if is_eval:
            bar.start_eval(step, self.evaluator.batches_per_eval)
            ev, extra = self.evaluator.evaluate_and_record(step, lr, mean_loss, tokens_per_s, bar.eval_tick, own)
            bar.end_eval()
            more = "".join(f", {k} {v:.4g}" for k, v in extra.items())
            bar.message(f"step {step}: train loss {ev['train']:.4f}, val loss {ev['val']:.4f}{more}")
        else:
            self.recorder.record(step, lr, mean_loss, None, tokens_per_s, own)
        rec = self.recorder
        bar.show(window[-1], tokens_per_s, rec.flops_per_s(tokens_per_s), rec.mfu(tokens_per_s),
                 ev["val"] if ev else None, own)
        return ev

    def _data_metrics(self) -> dict[str, float]:
        """The data's own numbers since the last logged step (`metrics()`, e.g. RL's mean
        reward), averaged over ranks: metrics.csv columns and the progress bar's."""
        metrics = getattr(self.data, "metrics", None)
        found = metrics() if callable(metrics) else {}
        if not found or not self.dist.enabled:
            return found
        keys = sorted(found)
        means = qdist.all_reduce_mean(torch.tensor([found[k] for k in keys], device=self.device), self.dist)
        return dict(zip(keys, means.tolist()))

    def _flush_losses(self, pending: list[torch.Tensor]) -> list[torch.Tensor]:
        """Copy the losses of the steps since the last flush to the host (one sync), averaged
        over ranks, into self.losses; returns the emptied list."""
        if pending:
            self.losses.extend(qdist.all_reduce_mean(torch.stack(pending), self.dist).tolist())
        return []

    def _stop(self, bar: ProgressBar, signum: int | None) -> None:
        bar.close()
        self.save_checkpoint()
        if self.save:
            plot_or_say(self.out, self.log)
        self.log(f"stopped by signal {signum} at step {self.step}; checkpoint saved. "
                 f"Continue with: {self.command} --resume {self.out}")
        raise TrainingInterrupted(f"stopped at step {self.step}")

    def _finish(self, last_eval: dict[str, float] | None, tokens_per_s: float) -> TrainResult:
        """The end of the run: a sample, the final checkpoint and weights, loss.png."""
        t = self.cfg.train
        if last_eval is None:  # resumed at the very end: nothing trained in this session
            last_eval = self.evaluate()
        sample = ""
        if t.sample_tokens > 0:
            sample = generate(self.model, self.tokenizer, "", max_new_tokens=t.sample_tokens,
                              temperature=0.8, top_k=200, seed=t.seed)
        if self.budget.seconds is not None and self.save:
            ckpt.save_config(self.cfg, self.out)  # max_iters as actually trained
        self.save_checkpoint()
        if self.save:
            plot_or_say(self.out, self.log)
        return TrainResult(
            run_dir=self.out if self.save else None,
            steps=self.step,
            train_loss=last_eval["train"],
            val_loss=last_eval["val"],
            best_val_loss=self.recorder.best_val,
            elapsed_s=time.time() - self.start_time,
            tokens_per_s=tokens_per_s,
            sample=sample,
            losses=list(self.losses),
        )


def task_hooks(cfg: Config, log: Callable[[str], None] | None = None) -> list[Any]:
    """The evaluation hook that `eval_tasks` asks for (lm-evaluation-harness tasks), or none.
    Call each hook's `bind(trainer.tokenizer)` once the Trainer exists (see `train`)."""
    if not cfg.train.eval_tasks:
        return []
    if cfg.train.fsdp:
        raise QuillError("eval_tasks runs the tasks on the whole model; it does not work with fsdp")
    from .lm_eval_adapter import TaskEvalHook

    return [TaskEvalHook.from_config(cfg, log or (lambda msg: print(msg, file=sys.stderr)))]


def train(cfg: Config, overwrite: bool = False, save: bool = True, progress: bool = True,
          start_time: float | None = None, resume: str | Path | None = None,
          resume_data: str | None = None) -> TrainResult:
    """Train a model as `cfg` says; see `Trainer`."""
    hooks = task_hooks(cfg)
    trainer = Trainer(cfg, overwrite=overwrite, save=save, progress=progress, start_time=start_time,
                      resume=resume, resume_data=resume_data, hooks=hooks)
    for hook in hooks:
        hook.bind(trainer.tokenizer)
    return trainer.run()
