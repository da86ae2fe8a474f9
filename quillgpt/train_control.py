"""How a training run is steered, apart from the step itself: falling back to eager when
`torch.compile` fails, stopping cleanly on SIGINT/SIGTERM, fitting a wall-clock time budget.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

from . import distributed as qdist
from .config import Config, parse_duration


class CompiledModel:
    """The model as the loop calls it: DDP-wrapped and `torch.compile`d as configured. Compiler
    errors surface on the first call; then it logs one line and goes on with the eager model."""

    def __init__(self, wrapped: nn.Module, model: nn.Module, compile: bool, log: Callable[[str], None]):
        self.model = model  # the bare model (its state dict, evaluation under DDP)
        self.log = log
        self.checked = not compile
        self.train_model = wrapped
        if compile:
            try:
                self.train_model = torch.compile(wrapped)
            except Exception as e:  # noqa: BLE001 - any compiler failure falls back to eager
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

    def __call__(self, which: str, x: torch.Tensor, y: torch.Tensor, on_fallback: Callable[[], None]
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """`which` is "train" or "eval"."""
        call = lambda: (self.train_model if which == "train" else self.forward_model)(x, y)
        if self.checked:
            return call()
        try:
            out = call()
        except Exception as e:  # noqa: BLE001 - any compiler failure falls back to eager
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            self.log(f"torch.compile failed ({type(e).__name__}: {first[:200]}); training without it")
            self.train_model = getattr(self.train_model, "_orig_mod", self.train_model)  # un-compiled
            self.checked = True
            on_fallback()
            out = call()
        if which == "train":
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

    `clock` (default `time.time`) is where the time comes from: every figure the plan uses is
    read from it, so a given clock gives a given plan."""

    def __init__(self, budget: str | None, start_time: float, clock: Callable[[], float] = time.time):
        self.seconds = parse_duration(budget) if budget else None
        self.start_time = start_time
        self.clock = clock
        self.session_start = start_time
        self.eval_seconds = 0.0

    def start_session(self) -> None:
        """The first step of this process is about to run (after the first evaluation)."""
        self.session_start = self.clock()

    def plan(self, cfg: Config, step: int, total_iters: int, steps_this_session: int) -> int:
        """The new total of steps (unchanged without a budget or before 5 steps of evidence)."""
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
