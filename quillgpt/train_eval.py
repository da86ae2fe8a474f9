"""A training run's evaluations: the loss on each split, and the evaluation hooks.

    evaluator = LossEvaluator(model, forward, data, device, dist, autocast,
                              batch_size=8, iters=200, seed=1337, hooks=[...])
    losses, extra = evaluator.evaluate(step, final=False)   # {"train": .., "val": ..}, {hook's: ..}

It is handed everything it uses; the loop decides when to evaluate, records the numbers and
times the evaluations for the time budget.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Protocol

import torch
import torch.nn as nn

from . import distributed as qdist
from .data import TrainingData

# the model's forward for evaluation: (inputs, targets) -> (logits, mean loss over scored targets)
Forward = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class EvalHook(Protocol):
    """Extra evaluation at the loop's evaluation steps: every `interval` steps (a multiple of
    eval_interval is natural), at step 0 and at the end. Returns named numbers; each name becomes
    a metrics.csv column (and a TensorBoard scalar)."""

    interval: int

    def __call__(self, model: nn.Module, step: int) -> dict[str, float]: ...


class EvaluationStopped(Exception):
    """A stop signal arrived during an evaluation (raised by its `tick`)."""


def data_metrics(data: TrainingData, dist: qdist.DistInfo, device: torch.device) -> dict[str, float]:
    """The data's own numbers since the last logged step, for a `TrainingData` with a `metrics()`
    method (RL's mean reward, ...), averaged over ranks: they join each logged metrics row and
    the progress bar. Every rank calls it at the same steps."""
    metrics = getattr(data, "metrics", None)
    found = metrics() if callable(metrics) else {}
    if not found or not dist.enabled:
        return found
    keys = sorted(found)
    means = qdist.all_reduce_mean(torch.tensor([float(found[k]) for k in keys], device=device), dist)
    return dict(zip(keys, means.tolist()))


class LossEvaluator:
    """The loss on each split, averaged over `iters` batches drawn from fixed seeds (`seed + 1`
    for train, `seed + 2` for val: the same batches every time), then the evaluation hooks that
    are due. The loss is the plain mean NLL over the scored targets, whatever `token_loss` the
    data defines, so that it means the same for every kind of data.

    `model` is the bare model (put in eval mode, handed to the hooks); `forward` runs it (compiled,
    never DDP-wrapped); `autocast` is the run's mixed-precision context."""

    def __init__(self, model: nn.Module, forward: Forward, data: TrainingData, device: torch.device,
                 dist: qdist.DistInfo, autocast: AbstractContextManager, *, batch_size: int, iters: int,
                 seed: int, hooks: Sequence[EvalHook] = ()):
        self.model, self.forward, self.data = model, forward, data
        self.device, self.dist, self.autocast = device, dist, autocast
        self.batch_size, self.iters, self.seed = batch_size, iters, seed
        self.hooks = list(hooks)

    @property
    def batches_per_eval(self) -> int:
        return 2 * self.iters

    @torch.no_grad()
    def losses(self, tick: Callable[[], None] | None = None) -> dict[str, float]:
        """`tick` is called after every batch (a progress bar; it may raise to stop early)."""
        self.model.eval()
        out = {}
        try:
            for i, name in enumerate(("train", "val")):
                batches = self.data.batches(name, self.batch_size, self.seed + 1 + i, self.device)
                total = torch.zeros((), device=self.device)
                for _ in range(self.iters):
                    x, y = batches.next()[:2]  # the plain mean, whatever token_loss the data has
                    with self.autocast:
                        _, loss = self.forward(x, y)
                    total += loss.float()
                    if tick is not None:
                        tick()
                # the mean over ranks, so that every rank takes the same decisions (best weights)
                out[name] = qdist.all_reduce_mean(total, self.dist).item() / self.iters
        finally:
            self.model.train()
        return out

    @torch.no_grad()
    def hook_results(self, step: int, final: bool) -> dict[str, float]:
        """The numbers of the hooks due at `step` (all of them at the end: `final`)."""
        extra: dict[str, float] = {}
        for hook in self.hooks:
            if step % hook.interval == 0 or final:
                self.model.eval()
                extra.update(hook(self.model, step))
                self.model.train()
        return extra

    def evaluate(self, step: int, final: bool, tick: Callable[[], None] | None = None
                 ) -> tuple[dict[str, float], dict[str, float]]:
        """The losses, and the numbers of the hooks that are due."""
        return self.losses(tick), self.hook_results(step, final)
