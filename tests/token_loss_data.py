"""Training data whose batches carry a weight per target, and whose loss is the weighted mean of
the per-token NLL: the `token_loss` plug point of `data.TrainingData`. Imported by
tests/test_train_plugins.py; run under torchrun by its DDP test (`python token_loss_data.py`)."""

from __future__ import annotations

import json
import sys

import torch


class WeightedData:
    """`inner`'s batches as (x, y, w): the first `masked` targets of every row are -1 (not
    scored), and later positions weigh more (w from 0.1 to 2.0 along the row)."""

    def __init__(self, inner, masked: int = 3):
        self.inner, self.masked = inner, masked
        self.tokenizer = inner.tokenizer
        self.seen: list[torch.Tensor] = []  # the nll of every call, as token_loss got it

    def describe(self) -> str:
        return "weighted " + self.inner.describe()

    def fingerprint(self) -> str:
        return "weighted-" + self.inner.fingerprint()

    def batches(self, split, batch_size, seed, device, rank=0, world_size=1):
        source = self.inner.batches(split, batch_size, seed, device, rank, world_size)
        masked = self.masked

        class Weighted:
            def next(self):
                x, y = source.next()
                y = y.clone()
                y[:, :masked] = -1
                w = torch.linspace(0.1, 2.0, y.size(1), device=y.device).expand_as(y)
                return x, y, w

            def state(self):
                return source.state()

            def set_state(self, state):
                source.set_state(state)

        return Weighted()

    def token_loss(self, nll: torch.Tensor, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        _, y, w = batch
        self.seen.append(nll.detach().clone())
        w = w * (y != -1)
        return (nll * w).sum() / w.sum()


def main(data: str, out: str, accumulation: int, fsdp: bool = False) -> None:
    """Train the weighted data (under torchrun: one rank each; `fsdp`: sharded) and print the
    losses as JSON."""
    from quillgpt.config import load_config
    from quillgpt.data import TokenData
    from quillgpt.train import Trainer

    cfg = load_config(None, dict(data=data, out=out, n_layer=2, n_head=2, n_embd=32, block_size=16,
                                 batch_size=4, max_iters=6, eval_iters=2, eval_interval=3, log_interval=1,
                                 warmup_iters=2, learning_rate=3e-3, sample_tokens=0, device="cpu",
                                 gradient_accumulation_steps=accumulation, fsdp=fsdp))
    trainer = Trainer(cfg, progress=False, log=lambda m: None, data=WeightedData(TokenData.from_config(cfg)))
    result = trainer.run()
    if trainer.dist.is_main:
        print(json.dumps({"losses": result.losses, "val": result.val_loss}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), fsdp=sys.argv[4:] == ["fsdp"])
