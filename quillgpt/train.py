"""The training loop: data -> model -> AdamW with warmup + cosine decay -> run directory.

    from quillgpt import load_config
    from quillgpt.train import train
    result = train(load_config("shakespeare-char-cpu", {"data": "input.txt", "out": "runs/x"}))

`Trainer.run()` reads top to bottom as nanoGPT's train.py does: evaluate, then step, log,
evaluate and checkpoint until max_iters, then sample and save. Around it, small collaborators
each own one concern:

- `train_setup`: the process (config checks, the process group, device, TF32), the run
  directory, the seeded initial model; `settle_inputs` (here): the data and the config edits
  that come with it;
- the data (`data.TokenData`, or any `data.TrainingData`: conversations with loss masks, or a
  loss of its own through `token_loss`) gives the batches;
- `train_eval.LossEvaluator` evaluates, with the `EvalHook`s that add their own numbers
  (benchmark scores, ...) to the evaluation steps;
- `metrics.MetricsLog` / `metrics.ProgressBar` report; `resume.Checkpointer` saves and restores;
- `train_control`: `CompiledModel` falls back to eager when `torch.compile` fails;
  `StopSignals` turns SIGINT/SIGTERM into a checkpoint and a clean stop; `TimeBudget` fits a
  run into a wall-clock budget;
- mixed precision and devices come from `runtime`, DDP/FSDP from `distributed`.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import checkpoint as ckpt
from . import distributed as qdist
from .config import Config
from .data import TokenData, TrainingData
from .errors import QuillError
from .fileio import RunLock
from .generate import generate
from .losses import batch_loss
from .metrics import MetricsLog, ProgressBar, RunRecorder, Throughput, flops_per_token, open_tensorboard, peak_flops  # noqa: F401
from .model import count_params
from .optim import apply_gradients, lr_at, make_optimizer, set_lr
from .plot import plot_or_say
from .resume import Checkpointer, check_resume, resume_config, run_dir_for  # noqa: F401 - resume_config: API
from .resume import resume_data as resume_training_data
from .runtime import autocast_context, resolve_device, resolve_dtype, rng_state
from .train_control import CompiledModel, StopSignals, TimeBudget
from .train_eval import EvalHook, EvaluationStopped, LossEvaluator, data_metrics
from .train_setup import initial_model, out_of_memory_message, setup_lines, start_process

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
    defaults (nanoGPT's GPU recipe in shape: 10.7M parameters, context 256, evaluation over 200 batches)
    take hours there. On a GPU, and when fine-tuning (`init_from` brings its own model): None,
    the defaults."""
    overrides = overrides or {}
    if overrides.get("init_from"):
        return None
    return CPU_PRESET if resolve_device(overrides.get("device") or "auto").type == "cpu" else None


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


def settle_inputs(cfg: Config, place: RunPlace, data: TrainingData | None, resume_data: str | None,
                  log: Callable[[str], None]) -> tuple[TrainingData, dict[str, torch.Tensor] | None]:
    """The run's data and, when fine-tuning, the weights it starts from, with the edits they
    make to `cfg`, all here: fine-tuning (`init_from`) brings its architecture (block_size
    cropped), tokenizer and a learning rate of 3e-5 unless set; a resumed run's data says where
    it is now (`cfg.train.data`); the vocabulary size is the tokenizer's. A tokenizer that gained
    tokens grows the fine-tuning weights' embedding (`hf.grow_vocabulary`)."""
    state = None
    if place.resume_dir is None and cfg.train.init_from:
        from .hf import init_from

        _, state = init_from(cfg.train.init_from, cfg, warn=lambda m: log(f"warning: {m}"))
        log(f"fine-tuning from {cfg.train.init_from}: learning rate {cfg.train.learning_rate:g}, "
            f"context {cfg.model.block_size}")
    if data is None:
        data = training_data(cfg, place, resume_data)
    cfg.model.vocab_size = data.tokenizer.vocab_size
    if state is not None:
        from .hf import grow_vocabulary

        state = grow_vocabulary(state, cfg.model.vocab_size, log)
    return data, state


def stopped_before_training(signum: int | None, out: Path, existed: bool, save: bool) -> str:
    """What a run stopped during its first evaluation says: nothing was written."""
    where = (f"{out} is as it was" if existed else f"{out} was not created") if save else ""
    return (f"stopped by signal {signum} during the first evaluation, before any training: nothing was "
            f"written{' (' + where + ')' if where else ''}; run the same command to start again")


class Trainer:
    """One training run. `Trainer(cfg).run()` does everything `quill train` does.

    `resume=RUN` continues RUN from its newest intact checkpoint (cfg from `resume_config`), on
    the prepared data in the local cache with the checkpoint's fingerprint, or on `resume_data`
    (a local corpus, checked against it): a resume never downloads (see `resume.resume_data`).
    `data` replaces the corpus that `cfg.train.data` names (any `data.TrainingData`; one with
    `token_loss` defines its own loss), and `hooks` add evaluations of their own (`EvalHook`)."""

    command = "quill train"  # how to continue the run (said when it is interrupted)

    def __init__(self, cfg: Config, overwrite: bool = False, save: bool = True,
                 progress: bool = True, log: Callable[[str], None] | None = None,
                 start_time: float | None = None, resume: str | Path | None = None,
                 data: TrainingData | None = None, hooks: Sequence[EvalHook] = (),
                 resume_data: str | None = None):
        self.start_time = start_time if start_time is not None else time.time()
        self.cfg = cfg
        # set-up, in order; each step is the only place that does what it does (see train_setup)
        process = start_process(cfg, progress, log)  # checks cfg, joins the process group, TF32
        self.dist, self.device, self.log, self.progress = process.dist, process.device, process.log, process.progress
        place = run_place(cfg, resume, overwrite, save, self.dist)  # sets cfg.train.out
        self.out, self.save, self.resume_dir = place.out, place.save, place.resume_dir
        self.data, init_state = settle_inputs(cfg, place, data, resume_data, self.log)  # the other cfg edits
        self.tokenizer = self.data.tokenizer
        self.token_loss = getattr(self.data, "token_loss", None)
        self.data_sha256 = self.data.fingerprint()
        self.dtype = resolve_dtype(cfg.train.dtype, self.device, cfg.model.n_embd)
        self.model = initial_model(cfg, init_state, process)  # seeds the global generators
        self.n_params = count_params(self.model)
        self._build_training(hooks)
        resuming = self._restore() if self.resume_dir is not None else None
        self.lock = RunLock(self.out, enabled=self.save)  # one writer per run directory, to the end of run()
        if self.out.is_dir():
            self.lock.acquire()
        # said once everything is checked: a run that cannot start says only why
        for line in setup_lines(cfg, self.n_params, self.data, self.device, self.dtype, self.dist):
            self.log(line)
        if resuming:
            self.log(resuming)

    def _build_training(self, hooks: Sequence[EvalHook]) -> None:
        """Optimizer, compiled/wrapped model, precision, batches and the loop's collaborators."""
        cfg, t = self.cfg, self.cfg.train
        wrapped = qdist.wrap_model(self.model, self.dist, self.device)
        self.optimizer = make_optimizer(self.model, cfg, self.device)
        # a failed compiled step may have left gradients: drop them before the eager retry
        self.compiled = CompiledModel(wrapped, self.model, t.compile, self.log,
                                      on_fallback=lambda: self.optimizer.zero_grad(set_to_none=True))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == "float16")
        self.autocast = autocast_context(self.device, self.dtype)
        self.batches = self.data.batches("train", t.batch_size, t.seed, self.device,
                                         self.dist.rank, self.dist.world_size)
        self.evaluator = LossEvaluator(self.model, self.compiled.eval_forward, self.data, self.device,
                                       self.dist, self.autocast, batch_size=t.batch_size,
                                       iters=t.eval_iters, seed=t.seed, hooks=hooks)
        metrics = MetricsLog(self.out / ckpt.METRICS_FILE if self.save else None, self.start_time)
        self.recorder = RunRecorder(metrics, self.model, self.dist, self.out, self.save, self.device,
                                    self.dtype, flops_per_token(self.model, self.n_params), self.log)
        self.checkpoints = Checkpointer(self.out, self.dist, self.save, t.keep_last)
        self.budget = TimeBudget(t.time_budget, self.start_time)
        self.tokens_seen = 0  # input tokens of every rank so far (batches may vary in length)
        self.step = 0
        self.total_iters = t.max_iters

    @property
    def metrics(self) -> list[dict[str, Any]]:
        """The metrics.csv rows so far (dicts of formatted values; "flops_per_s" and "mfu" too)."""
        return self.recorder.metrics.rows

    # --- checkpoints ---------------------------------------------------------------------------

    def _loop_state(self) -> dict[str, Any]:
        return {"rng": rng_state(), "sampler": self.batches.state(), "data_sha256": self.data_sha256,
                "config": self.cfg.to_dict(), **self.recorder.state()}

    def save_checkpoint(self) -> Path | None:
        """Write RUN/train_state/step-N (collective under FSDP; rank 0 writes), with every loss so far."""
        self.recorder.flush_losses()
        path = self.checkpoints.save(self.step, self.model, self.optimizer, self._loop_state)
        self.recorder.metrics.write()
        return path

    def _restore(self) -> str:
        """Load the newest intact checkpoint; returns the line that says so."""
        assert self.resume_dir is not None
        ts = self.checkpoints.load(self.resume_dir, self.model, self.optimizer, self.batches,
                                   self.tokenizer, self.data_sha256, self.cfg.train.seed, self.log)
        self.recorder.load_state(ts.state)
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
                loss = batch_loss(self.compiled.train_forward, batch, self.token_loss) / accum
            with self.compiled.no_sync(last, self.dist):
                self.scaler.scale(loss).backward()
            total += loss.detach().float()
        apply_gradients(self.optimizer, self.scaler, self.model, t.grad_clip)
        return total, lr

    def evaluate(self) -> dict[str, float]:
        """Mean loss over `eval_iters` batches of each split (see LossEvaluator)."""
        return self.evaluator.losses()

    # --- the loop ------------------------------------------------------------------------------

    def run(self) -> TrainResult:
        try:
            return self._run()
        except torch.OutOfMemoryError:
            raise QuillError(out_of_memory_message(self.cfg)) from None
        finally:
            self.recorder.metrics.close()
            qdist.cleanup(self.dist)
            self.lock.release()

    def _run(self) -> TrainResult:
        """nanoGPT's loop: evaluate at step 0; then step, and every `log_interval` steps record a
        metrics row (evaluating every `eval_interval`), checkpoint every `checkpoint_interval`;
        at the end sample, save and plot. A stop signal saves a checkpoint and stops."""
        t = self.cfg.train
        checkpoint_every = t.checkpoint_interval or t.eval_interval
        # the bar shows from the start: the first evaluation can take minutes on a CPU
        bar = ProgressBar(self.total_iters, self.step, self.progress, self.log)
        with StopSignals() as signals:
            last_eval = self._start(bar, signals)
            speed = Throughput(self.tokens_seen)
            self.budget.start_session(self.step)
            last_logged = self.step
            while self.step < self.total_iters:
                loss, lr = self.train_step(self.step)
                self.recorder.add_loss(loss)
                self.step += 1
                bar.step()
                step = self.step
                is_eval = step % t.eval_interval == 0 or step == self.total_iters
                stop = qdist.any_rank(signals.signum is not None, self.dist, self.device)
                if step % t.log_interval == 0 or is_eval or stop:
                    self.recorder.flush_losses()  # one sync per log: the device's time is in the rate
                    tokens_per_s = speed.rate(self.tokens_seen)
                    last_eval = self._log_step(step, lr, last_logged, tokens_per_s, is_eval, bar) or last_eval
                    last_logged = step
                    self.total_iters = self.budget.plan(self.cfg, step, self.total_iters)
                    bar.set_total(self.total_iters)
                    speed.restart(self.tokens_seen)  # evaluations are not counted
                if stop:
                    self._stop(bar, signals.signum)
                if step % checkpoint_every == 0 and step < self.total_iters:
                    self.save_checkpoint()
        bar.close()
        return self._finish(last_eval, speed.session_rate(self.tokens_seen))

    def _start(self, bar: ProgressBar, signals: StopSignals) -> dict[str, float] | None:
        """Before the first step: the evaluation at step 0 (not on resume), then the run directory
        and TensorBoard. Returns the evaluation's losses."""
        t = self.cfg.train
        first = self._first_evaluation(bar, signals) if self.step == 0 else None
        # nothing is written into the run directory before the first evaluation is done
        self.lock.acquire(create=True)  # (a new run directory: now that it is made)
        self.checkpoints.start(self.cfg, self.tokenizer, fresh=self.resume_dir is None)
        if self.save and t.tensorboard:
            self.recorder.metrics.tensorboard = open_tensorboard(self.out, self.log)
        if first is None:
            return None
        ev, extra = first
        lr = t.learning_rate if t.warmup_iters == 0 else lr_at(0, self.cfg)
        self.recorder.record(0, lr, ev["train"], ev, None, extra)  # no training yet: train split's loss
        return ev

    def _evaluate(self, step: int, bar: ProgressBar, tick: Callable[[], None] | None = None
                  ) -> tuple[dict[str, float], dict[str, float]]:
        """Losses and due hooks at `step`, batch by batch on the bar, timed for the time budget."""
        bar.start_eval(step, self.evaluator.batches_per_eval)
        try:
            with self.budget.evaluation():
                return self.evaluator.evaluate(step, step == self.total_iters, tick or bar.eval_tick)
        finally:
            bar.end_eval()

    def _first_evaluation(self, bar: ProgressBar, signals: StopSignals
                          ) -> tuple[dict[str, float], dict[str, float]]:
        """The evaluation at step 0. A stop signal ends it at the next batch; since nothing has
        been written yet, nothing is left behind."""
        existed = self.out.exists()

        def tick() -> None:
            bar.eval_tick()
            if qdist.any_rank(signals.signum is not None, self.dist, self.device):
                raise EvaluationStopped

        try:
            return self._evaluate(0, bar, tick)
        except EvaluationStopped:
            bar.close()
            self.log(stopped_before_training(signals.signum, self.out, existed, self.save))
            raise TrainingInterrupted("stopped during the first evaluation") from None

    def _log_step(self, step: int, lr: float, last_logged: int, tokens_per_s: float, is_eval: bool,
                  bar: ProgressBar) -> dict[str, float] | None:
        """The metrics row of a logging step (with an evaluation on eval steps) and the bar."""
        mean_loss, last_loss = self.recorder.mean_loss(last_logged, step)
        ev, extra = self._evaluate(step, bar) if is_eval else (None, {})
        own = data_metrics(self.data, self.dist, self.device)  # e.g. RL's mean reward
        self.recorder.record(step, lr, mean_loss, ev, tokens_per_s, {**own, **extra})
        if ev is not None:
            more = "".join(f", {k} {v:.4g}" for k, v in extra.items())
            bar.message(f"step {step}: train loss {ev['train']:.4f}, val loss {ev['val']:.4f}{more}")
        self.recorder.show(bar, last_loss, tokens_per_s, ev, own)
        return ev

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
        sample = generate(self.model, self.tokenizer, "", max_new_tokens=t.sample_tokens, temperature=0.8,
                          top_k=200, seed=t.seed) if t.sample_tokens > 0 else ""
        if self.budget.seconds is not None and self.save:
            ckpt.save_config(self.cfg, self.out)  # max_iters as actually trained
        self.save_checkpoint()
        if self.save:
            plot_or_say(self.out, self.log)
        return TrainResult(run_dir=self.out if self.save else None, steps=self.step,
                           train_loss=last_eval["train"], val_loss=last_eval["val"],
                           best_val_loss=self.recorder.best_val, elapsed_s=time.time() - self.start_time,
                           tokens_per_s=tokens_per_s, sample=sample, losses=list(self.recorder.losses))


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
