"""The loop's plug points: other training data (a `TrainingData` with loss masks) and evaluation
hooks, used without editing or copying the loop."""

from __future__ import annotations

import copy
import csv
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from token_loss_data import WeightedData

from quillgpt.config import load_config
from quillgpt.data import TokenData
from quillgpt.runtime import autocast_context
from quillgpt.train import Trainer, resume_config

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


# --- losses other than the mean: TrainingData.token_loss ----------------------------------------

def hand_weighted_loss(model, batch, dtype: str = "float32") -> tuple[torch.Tensor, torch.Tensor]:
    """The weighted mean NLL of `WeightedData` written out from the logits, and the plain mean."""
    x, y, w = batch
    with autocast_context(torch.device("cpu"), dtype):
        logits, _ = model(x)
    logp = torch.log_softmax(logits.float(), dim=-1)
    scored = y != -1
    nll = -logp.gather(-1, y.clamp(min=0)[..., None])[..., 0] * scored
    return (nll * w * scored).sum() / (w * scored).sum(), nll.sum() / scored.sum()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_token_loss_is_the_loss_the_trainer_optimises(small_text, dtype):
    """With gradient accumulation 2: the trainer's step loss and its gradients are those of the
    hand-computed weighted loss (each micro-batch divided by 2), not of the plain mean."""
    cfg = tiny_cfg(small_text, None, max_iters=1, gradient_accumulation_steps=2, grad_clip=0.0, dtype=dtype)
    data = WeightedData(TokenData.from_config(cfg))
    trainer = Trainer(cfg, save=False, progress=False, log=quiet, data=data)
    ref = copy.deepcopy(trainer.model)
    grads: dict[str, torch.Tensor] = {}
    real_step = trainer.optimizer.step

    def step(*args, **kwargs):  # the gradients the optimizer is about to apply
        grads.update({n: p.grad.clone() for n, p in trainer.model.named_parameters()})
        return real_step(*args, **kwargs)

    trainer.optimizer.step = step
    total, _ = trainer.train_step(0)

    same_batches = data.batches("train", cfg.train.batch_size, cfg.train.seed, trainer.device)
    hand = plain = torch.zeros(())
    for _ in range(2):
        batch = same_batches.next()
        weighted, mean = hand_weighted_loss(ref, batch, dtype)
        (weighted / 2).backward()
        hand, plain = hand + weighted.detach() / 2, plain + mean.detach() / 2
        nll = data.seen[len(data.seen) - 2 + _]
        assert nll.shape == batch[1].shape and nll.dtype == torch.float32
        assert (nll[:, :3] == 0).all() and (nll[:, 3:] > 0).all()  # 0 where the target is -1
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == "float32" else dict(rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(total, hand, **tol)
    assert abs(float(hand - plain)) > 1e-3  # the weights change the loss: this check can fail
    for name, p in ref.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, **tol, msg=name)


def test_without_token_loss_the_step_is_the_models_own_mean_bitwise(small_text):
    cfg = tiny_cfg(small_text, None, max_iters=1, grad_clip=0.0)
    data = TokenData.from_config(cfg)
    trainer = Trainer(cfg, save=False, progress=False, log=quiet, data=data)
    ref = copy.deepcopy(trainer.model)
    x, y = data.batches("train", cfg.train.batch_size, cfg.train.seed, trainer.device).next()
    total, _ = trainer.train_step(0)
    assert torch.equal(total, ref(x, y)[1].detach())


def test_evaluation_reports_the_plain_mean_and_a_run_with_token_loss_resumes(small_text, tmp_path):
    cfg = tiny_cfg(small_text, tmp_path / "run", max_iters=6)
    inner = TokenData.from_config(cfg)
    trainer = Trainer(cfg, progress=False, log=quiet, data=WeightedData(inner))
    ev = trainer.evaluate()
    t = cfg.train
    trainer.model.eval()
    with torch.no_grad():
        for i, split in enumerate(("train", "val")):
            source = trainer.data.batches(split, t.batch_size, t.seed + 1 + i, trainer.device)
            mean = sum(trainer.model(*source.next()[:2])[1] for _ in range(t.eval_iters)) / t.eval_iters
            assert ev[split] == pytest.approx(float(mean), rel=1e-6)
    trainer.model.train()
    full = trainer.run()
    # the same run stopped at step 4 and resumed to 6 (the same schedule): the same losses
    half = tiny_cfg(small_text, tmp_path / "half", max_iters=4, lr_decay_iters=6)
    Trainer(half, progress=False, log=quiet, data=WeightedData(inner)).run()
    cfg = resume_config(tmp_path / "half", overrides={"max_iters": 6}, allow_config_change=True)
    resumed = Trainer(cfg, progress=False, log=quiet, data=WeightedData(inner), resume=tmp_path / "half").run()
    assert resumed.losses == full.losses


def test_token_loss_must_return_a_scalar(small_text):
    class PerToken(WeightedData):
        def token_loss(self, nll, batch):
            return nll

    cfg = tiny_cfg(small_text, None, max_iters=1)
    trainer = Trainer(cfg, save=False, progress=False, log=quiet, data=PerToken(TokenData.from_config(cfg)))
    with pytest.raises(ValueError, match=r"token_loss must return a scalar, got shape \(4, 16\)"):
        trainer.train_step(0)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["ddp", "fsdp"])
def test_token_loss_under_ddp_and_fsdp_equals_one_process_with_accumulation(small_text, tmp_path, layout):
    script = Path(__file__).resolve().parent / "token_loss_data.py"
    env = dict(os.environ, PYTHONPATH=str(script.parent.parent), OMP_NUM_THREADS="1")
    one = subprocess.run([sys.executable, str(script), str(small_text), str(tmp_path / "one"), "2"],
                         env=env, capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-3000:]
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(script), str(small_text), str(tmp_path / "ddp"), "1", layout],
                         env=env, capture_output=True, text=True)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    ref, got = json.loads(one.stdout), json.loads(ddp.stdout)
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(ref["losses"]), rtol=1e-5, atol=1e-5)
    assert got["val"] == pytest.approx(ref["val"], rel=1e-5)


@pytest.mark.slow
def test_token_loss_trains_through_torch_compile(small_text, monkeypatch):
    """The compiled model gives the logits (dynamo traces and differentiates the graph; the
    `aot_eager` backend skips only the C++ code generation, minutes on a CPU) and the losses are
    eager's."""
    def run(compile: bool) -> tuple[list[float], list[str]]:
        cfg = tiny_cfg(small_text, None, max_iters=3, eval_interval=3, compile=compile)
        logs: list[str] = []
        result = Trainer(cfg, save=False, progress=False, log=logs.append,
                         data=WeightedData(TokenData.from_config(cfg))).run()
        return result.losses, logs

    eager, _ = run(False)
    compiled_calls = []
    real_compile = torch.compile

    def aot_eager(model, **kwargs):
        compiled_calls.append(model)
        return real_compile(model, backend="aot_eager", **kwargs)

    monkeypatch.setattr(torch, "compile", aot_eager)
    torch._dynamo.reset()
    compiled, logs = run(True)
    assert len(compiled_calls) == 1 and not any("torch.compile" in line for line in logs), logs
    torch.testing.assert_close(torch.tensor(compiled), torch.tensor(eager), rtol=1e-5, atol=1e-6)
