"""How a training run is steered, apart from the step itself: falling back to eager when
`torch.compile` fails, stopping cleanly on SIGINT/SIGTERM, fitting a wall-clock time budget.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn as nn

from . import distributed as qdist
from .config import Config, parse_duration


def out_of_memory_in(e: BaseException) -> BaseException | None:
    """The out-of-memory error in `e`'s chain of causes (a compiler wraps what it met), if any."""
    seen: set[int] = set()
    chain: BaseException | None = e
    while chain is not None and id(chain) not in seen:
        seen.add(id(chain))
        if isinstance(chain, (torch.OutOfMemoryError, MemoryError)):
            return chain
        chain = getattr(chain, "inner_exception", None) or chain.__cause__ or chain.__context__
    return None


def compiler_error(e: BaseException) -> bool:
    """Is `e` torch.compile's own failure (TorchDynamo, a backend, Inductor's code generation, a
    missing C++ compiler or Triton), after which the eager model may well run? Not when the model
    itself is wrong (an error its ops raise while traced: shapes, dtypes) nor when memory ran
    out: those would fail eagerly too, or mislead."""
    from torch._dynamo import exc as dynamo_exc
    from torch._inductor import exc as inductor_exc

    if out_of_memory_in(e) is not None or isinstance(e, dynamo_exc.TorchRuntimeError):
        return False
    return isinstance(e, (dynamo_exc.TorchDynamoException, inductor_exc.CppCompileError,
                          inductor_exc.InvalidCxxCompiler, inductor_exc.OperatorIssue,
                          inductor_exc.CppWrapperCodegenError, inductor_exc.SubgraphLoweringException))


class CompiledModel:
    """The model as the loop calls it: DDP-wrapped and `torch.compile`d as configured. Compiler
    errors (`compiler_error`) surface on the first call; then it logs one line, calls
    `on_fallback` (to drop a failed step's gradients) and goes on with the eager model. Any
    other error is raised as it is."""

    def __init__(self, wrapped: nn.Module, model: nn.Module, compile: bool, log: Callable[[str], None],
                 on_fallback: Callable[[], None] = lambda: None):
        self.model = model  # the bare model (its state dict, evaluation under DDP)
        self.log = log
        self.on_fallback = on_fallback
        self.checked = not compile
        self.train_model = wrapped
        if compile:
            try:
                self.train_model = torch.compile(wrapped)
            except RuntimeError as e:  # torch.compile itself is unavailable here (e.g. this Python)
                self.log(f"torch.compile unavailable ({type(e).__name__}: {e}); training without it")
                self.checked = True

    @property
    def forward_model(self) -> nn.Module:
        """What evaluation calls: the compiled model, but never DDP (no gradient sync there)."""
        ddp = isinstance(self.train_model, nn.parallel.DistributedDataParallel)
        return self.model if ddp else self.train_model

    def no_sync(self, last: bool, dist: qdist.DistInfo) -> contextlib.AbstractContextManager:
        """Gradient accumulation under DDP/FSDP: communicate only on the last micro-step."""
        if last or not dist.enabled:
            if dist.fsdp:
                self.model.set_requires_gradient_sync(True)
            return contextlib.nullcontext()
        if dist.fsdp:
            self.model.set_requires_gradient_sync(False)
            return contextlib.nullcontext()
        return self.train_model.no_sync()

    def train_forward(self, x: torch.Tensor, y: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The training forward (DDP-wrapped): logits, and the mean loss when `y` is given."""
        return self._call(lambda: self.train_model(x, y), training=True)

    def eval_forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._call(lambda: self.forward_model(x, y), training=False)

    def _call(self, call: Callable[[], Any], training: bool) -> Any:
        if self.checked:
            return call()
        try:
            out = call()
        except Exception as e:
            oom = out_of_memory_in(e)
            if oom is not None and oom is not e:
                raise oom from None  # met while compiling: reported as any out-of-memory is
            if not compiler_error(e):
                raise
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            self.log(f"torch.compile failed ({type(e).__name__}: {first[:200]}); training without it")
            self.train_model = getattr(self.train_model, "_orig_mod", self.train_model)  # un-compiled
            self.checked = True
            self.on_fallback()
            out = call()
        if training:
            self.checked = True
        return out


class StopSignals:
    """While active, SIGINT and SIGTERM only set `signum`: the loop saves and stops cleanly."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = signum

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


class TimeBudget:
    """`time_budget`: fit max_iters (and the LR decay) to the time left, from the average time
    per step so far (evaluations included), keeping a reserve for the final eval, sample and save.

    The loop starts it (`start_session`), times every evaluation through it (`evaluation()`) and
    asks it for the plan at each logging step (`plan`); nothing else changes it. `clock`
    (default `time.time`) is where the time comes from: every figure the plan uses is read from
    it, so a given clock gives a given plan."""

    def __init__(self, budget: str | None, start_time: float, clock: Callable[[], float] = time.time):
        self.seconds = parse_duration(budget) if budget else None
        self.start_time = start_time
        self.clock = clock
        self.session_start = start_time
        self.session_step = 0
        self.eval_seconds = 0.0  # the last evaluation's

    @contextlib.contextmanager
    def evaluation(self) -> Iterator[None]:
        """Time an evaluation (the plan keeps two of them in reserve for the end)."""
        t0 = self.clock()
        yield
        self.eval_seconds = self.clock() - t0

    def start_session(self, step: int) -> None:
        """This process's first step, `step`, is about to run (after the first evaluation)."""
        self.session_start = self.clock()
        self.session_step = step

    def plan(self, cfg: Config, step: int, total_iters: int) -> int:
        """The new total of steps (unchanged without a budget or before 5 steps of evidence).
        A new total is written into `cfg` (max_iters, lr_decay_iters, warmup_iters at most a
        tenth), so that the learning-rate schedule and the saved config.yaml follow it: the
        only edit of `cfg` after set-up."""
        steps_this_session = step - self.session_step
        if self.seconds is None or steps_this_session < 5:
            return total_iters
        t = cfg.train
        now = self.clock()
        per_step = max(now - self.session_start, 1e-9) / steps_this_session
        reserve = 0.03 * self.seconds + 2 * self.eval_seconds
        left = self.seconds - (now - self.start_time) - reserve
        planned = step + max(0, int(left / per_step))  # 0 more: out of time, stop here
        if planned != total_iters:
            t.max_iters = planned
            t.lr_decay_iters = planned
            t.warmup_iters = min(t.warmup_iters, max(0, planned // 10))
        return planned
