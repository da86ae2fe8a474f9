"""Per-token losses of a language model's predictions, and the loss of a training micro-batch.

    nll = token_nll(logits, targets)   # (B, T): -log p(target), 0 where the target is -1
    loss = batch_loss(forward, batch, data_token_loss)   # what the loop trains on

The training loop scores a batch with the model's own mean cross-entropy unless its
`data.TrainingData` defines `token_loss(nll, batch)`: then it computes `token_nll` of the
model's logits and uses the scalar that `token_loss` returns (weights per token, masks,
policy-gradient losses: see docs/architecture.md, "Losses other than the mean").
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.nn import functional as F


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The negative log-likelihood of every target under `logits` (..., vocab), in float32, with
    the shape of `targets`; 0 where a target is -1 (not scored)."""
    nll = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1),
                          ignore_index=-1, reduction="none")
    return nll.view(targets.shape)


def batch_loss(forward: Callable[[torch.Tensor, torch.Tensor | None], tuple[torch.Tensor, torch.Tensor | None]],
               batch: tuple[torch.Tensor, ...],
               token_loss: Callable[[torch.Tensor, tuple[torch.Tensor, ...]], torch.Tensor] | None = None
               ) -> torch.Tensor:
    """The loss of one micro-batch `(x, y, ...)`: the model's own mean over the scored targets
    (`forward(x, y)`), or, given the data's `token_loss`, its scalar of `token_nll` of the
    logits (`forward(x, None)`) and the whole batch."""
    x, y = batch[0], batch[1]
    if token_loss is None:
        loss = forward(x, y)[1]
        assert loss is not None
        return loss
    logits, _ = forward(x, None)
    loss = token_loss(token_nll(logits, y), batch)
    if loss.dim() != 0:
        raise ValueError(f"token_loss must return a scalar, got shape {tuple(loss.shape)}")
    return loss
