"""The loop's plug points: other training data (a `TrainingData` with loss masks) and evaluation
hooks, used without editing or copying the loop."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import torch

from quillgpt.config import load_config
from quillgpt.data import TokenData
from quillgpt.train import Trainer

quiet = lambda msg: None  # noqa: E731


def tiny_cfg(data: Path, out: Path | None, **kw):
    overrides = dict(data=str(data), out=str(out) if out else None, n_layer=1, n_head=2, n_embd=16,
                     block_size=16, batch_size=4, max_iters=12, eval_iters=2, eval_interval=4,
                     log_interval=2, warmup_iters=2, sample_tokens=0)
    overrides.update(kw)
    return load_config(None, overrides)


@dataclass
class CountingHook:
    interval: int
    calls: list[int]

    def __call__(self, model: torch.nn.Module, step: int) -> dict[str, float]:
        assert not model.training  # hooks see the model in eval mode
        self.calls.append(step)
        return {"probe": float(step) / 100, "probe_params": float(sum(p.numel() for p in model.parameters()))}


def test_eval_hooks_run_at_their_interval_and_land_in_metrics_csv(small_text, tmp_path):
    hook = CountingHook(interval=8, calls=[])
    out = tmp_path / "run"
    trainer = Trainer(tiny_cfg(small_text, out), progress=False, log=quiet, hooks=[hook])
    trainer.run()
    assert hook.calls == [0, 8, 12]  # step 0, every 8 steps (on evaluation steps), and the last
    with open(out / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0])[:6] == ["step", "elapsed_s", "lr", "train_loss", "val_loss", "tokens_per_s"]
    probed = {int(r["step"]): float(r["probe"]) for r in rows if r["probe"]}
    assert probed == {0: 0.0, 8: 0.08, 12: 0.12}


class MaskedData:
    """Token data whose targets are -1 (not scored) everywhere but at one position per row."""

    def __init__(self, inner: TokenData, keep: int):
        self.inner, self.keep = inner, keep
        self.tokenizer = inner.tokenizer

    def describe(self) -> str:
        return "masked " + self.inner.describe()

    def fingerprint(self) -> str:
        return "masked-" + self.inner.fingerprint()

    def batches(self, split, batch_size, seed, device, rank=0, world_size=1):
        source = self.inner.batches(split, batch_size, seed, device, rank, world_size)
        keep = self.keep

        class Masked:
            def next(self):
                x, y = source.next()
                masked = torch.full_like(y, -1)
                masked[:, keep] = y[:, keep]
                return x, masked

            def state(self):
                return source.state()

            def set_state(self, state):
                source.set_state(state)

        return Masked()


def test_other_training_data_plugs_in_and_masked_targets_are_not_scored(small_text, tmp_path):
    cfg = tiny_cfg(small_text, None, max_iters=0)
    inner = TokenData.from_config(cfg)
    trainer = Trainer(cfg, save=False, progress=False, log=quiet, data=MaskedData(inner, keep=5))
    x, y = trainer.batches.next()
    assert (y[:, 5] >= 0).all() and (y[:, :5] == -1).all() and (y[:, 6:] == -1).all()
    logits, loss = trainer.model(x, y)
    expected = torch.nn.functional.cross_entropy(logits[:, 5], y[:, 5])
    torch.testing.assert_close(loss, expected)
    result = Trainer(tiny_cfg(small_text, None, max_iters=6), save=False, progress=False, log=quiet,
                     data=MaskedData(inner, keep=5)).run()
    assert result.steps == 6 and all(torch.isfinite(torch.tensor(result.losses)))
