"""Per-token losses of a language model's predictions, for losses other than the plain mean.

    nll = token_nll(logits, targets)   # (B, T): -log p(target), 0 where the target is -1

The training loop scores a batch with the model's own mean cross-entropy unless its
`data.TrainingData` defines `token_loss(nll, batch)`: then it computes `token_nll` of the
model's logits and uses the scalar that `token_loss` returns (weights per token, masks,
policy-gradient losses: see docs/architecture.md, "Losses other than the mean").
"""

from __future__ import annotations

import torch
from torch.nn import functional as F


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The negative log-likelihood of every target under `logits` (..., vocab), in float32, with
    the shape of `targets`; 0 where a target is -1 (not scored)."""
    nll = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1),
                          ignore_index=-1, reduction="none")
    return nll.view(targets.shape)
