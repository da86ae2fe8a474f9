"""The learning ladder: every rung is a working language model; `quill ladder` trains them side by side."""

from __future__ import annotations

import csv
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from quillgpt import ladder_run
from quillgpt.checkpoint import load_run
from quillgpt.cli import main
from quillgpt.config import ModelConfig, load_config
from quillgpt.data import TokenData, prepare_training_data
from quillgpt.errors import QuillError
from quillgpt.ladder import LADDER, RUNGS, bigram_entropy
from quillgpt.ladder_run import CSV_COLUMNS, run_ladder, steps_for_time_budget
from quillgpt.model import count_params
from quillgpt.registry import build_model
from quillgpt.train import Trainer

TINY = dict(n_layer=2, n_head=2, n_embd=16, block_size=16, batch_size=8, eval_iters=2, eval_interval=10,
            log_interval=5, warmup_iters=0, sample_tokens=10, seed=0)
TINY_FLAGS = [arg for key, value in TINY.items() for arg in (f"--{key.replace('_', '-')}", str(value))]


def tiny_model_config(kind: str, **kw) -> ModelConfig:
    base = dict(kind=kind, vocab_size=11, block_size=12, n_layer=2, n_head=2, n_embd=16, dropout=0.0)
    base.update(kw)
    return ModelConfig(**base)


# --- the models -------------------------------------------------------------------------------

def test_ladder_names_and_order():
    assert list(LADDER) == ["bigram", "single-head", "multi-head", "block"]
    assert RUNGS == ["bigram", "single-head", "multi-head", "block", "gpt"]
    for kind in RUNGS:
        model = build_model(tiny_model_config(kind))
        assert model.config.kind == kind
    for i, cls in enumerate(LADDER.values(), 1):
        assert cls.__doc__.startswith(f"Rung {i}.")
        assert i == 1 or "Adds over" in cls.__doc__  # what it adds over the rung before


@pytest.mark.parametrize("kind", RUNGS)
def test_shapes_loss_and_causality(kind):
    torch.manual_seed(0)
    model = build_model(tiny_model_config(kind)).eval()
    if kind == "bigram":
        torch.nn.init.normal_(model.logits_table.weight)  # it starts at all zeros
    idx = torch.randint(0, 11, (3, 12))
    logits, loss = model(idx)
    assert logits.shape == (3, 12, 11) and loss is None
    _, loss = model(idx[:, :-1], idx[:, 1:])
    assert loss.ndim == 0 and math.isfinite(loss.item())
    # changing the last token changes nothing before it: no rung sees the future
    changed = idx.clone()
    changed[:, -1] = (changed[:, -1] + 1) % 11
    logits2, _ = model(changed)
    torch.testing.assert_close(logits2[:, :-1], logits[:, :-1])
    assert not torch.allclose(logits2[:, -1], logits[:, -1])
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 13, dtype=torch.long))


def test_bigram_depends_only_on_the_current_token_and_starts_uniform():
    model = build_model(tiny_model_config("bigram"))
    _, loss = model(torch.tensor([[1, 2, 3]]), torch.tensor([[2, 3, 4]]))
    assert loss.item() == pytest.approx(math.log(11))  # the table starts at zero: uniform
    with torch.no_grad():
        model.logits_table.weight.normal_()
    a, _ = model(torch.tensor([[5, 1, 2, 5]]))
    b, _ = model(torch.tensor([[7, 3, 9, 5]]))
    torch.testing.assert_close(a[0, -1], b[0, -1])
    assert count_params(model) == 11 * 11


def test_rungs_grow():
    """Each rung adds parameters over the one before (with bias, as the GPT counts them)."""
    counts = [count_params(build_model(tiny_model_config(k, vocab_size=65, n_embd=32))) for k in RUNGS[:4]]
    assert counts == sorted(counts) and len(set(counts)) == 4


@pytest.mark.parametrize("kind", RUNGS)
def test_every_rung_trains_and_its_loss_falls(kind, small_text):
    cfg = load_config(None, dict(TINY, kind=kind, data=str(small_text), max_iters=40, learning_rate=1e-2,
                                 eval_interval=40, eval_iters=4))
    trainer = Trainer(cfg, save=False, progress=False, log=lambda m: None)
    result = trainer.run()
    first_val = float(trainer.metrics[0]["val_loss"])
    assert result.steps == 40 and len(result.losses) == 40
    assert result.val_loss < first_val - 0.2, (kind, first_val, result.val_loss)
    assert sum(result.losses[-5:]) / 5 < sum(result.losses[:5]) / 5 - 0.2


# --- the bigram converges to the counted bigram entropy ---------------------------------------

def test_bigram_entropy_by_counting():
    assert bigram_entropy([0, 1, 2] * 50, 3) == pytest.approx(0.0)  # each token determines the next
    # 0 -> 0 or 1 with equal counts, 1 -> 0 always: H = (2 * ln 2 + 0) / 3 of the pairs
    tokens = [0, 0, 1] * 1000 + [0]
    assert bigram_entropy(tokens, 2) == pytest.approx(2 / 3 * math.log(2), abs=1e-3)
    rng = random.Random(0)
    assert bigram_entropy([rng.randrange(4) for _ in range(200_000)], 4) == pytest.approx(math.log(4), abs=0.01)


def markov_text(path: Path, n_chars: int = 20_000, seed: int = 0) -> Path:
    """Text drawn from a random first-order Markov chain over 8 letters."""
    rng = random.Random(seed)
    letters = "abcdefgh"
    rows = {a: [rng.random() ** 3 for _ in letters] for a in letters}
    out, current = [], "a"
    for _ in range(n_chars):
        current = rng.choices(letters, weights=rows[current])[0]
        out.append(current)
    path.write_text("".join(out), encoding="utf-8")
    return path


def test_trained_bigram_reaches_the_bigram_entropy(tmp_path):
    data = markov_text(tmp_path / "markov.txt")
    cfg = load_config(None, dict(kind="bigram", data=str(data), out=str(tmp_path / "run"), block_size=64,
                                 batch_size=32, max_iters=300, learning_rate=0.1, min_lr=0.01,
                                 warmup_iters=0, weight_decay=0.0, eval_iters=20, eval_interval=300,
                                 sample_tokens=0))
    result = Trainer(cfg, progress=False, log=lambda m: None).run()
    run = load_run(tmp_path / "run")
    _, splits = prepare_training_data(cfg)
    train_ids = torch.from_numpy(splits.train.astype("int64"))
    entropy = bigram_entropy(train_ids, run.tokenizer.vocab_size)
    assert 0.5 < entropy < math.log(8) - 0.2  # a chain with real structure
    # the exact mean loss of the trained table over every bigram of the train split
    with torch.no_grad():
        table = run.model(torch.arange(run.tokenizer.vocab_size)[None])[0][0]  # (V, V): row a = logits after a
        exact = torch.nn.functional.cross_entropy(table[train_ids[:-1]], train_ids[1:]).item()
    assert exact == pytest.approx(entropy, abs=0.05), (exact, entropy)
    assert result.train_loss == pytest.approx(entropy, abs=0.05)


# --- quill ladder -----------------------------------------------------------------------------

def evaluated_losses(run) -> tuple[float, float]:
    """A run's weights evaluated on its own data: the mean loss over eval_iters batches of each
    split, drawn from the evaluation's fixed seeds (seed + 1, seed + 2)."""
    t = run.config.train
    data = TokenData.from_config(run.config)
    losses = []
    with torch.no_grad():
        for i, split in enumerate(("train", "val")):
            batches = data.batches(split, t.batch_size, t.seed + 1 + i, torch.device("cpu"))
            losses.append(sum(run.model.eval()(*batches.next())[1].item() for _ in range(t.eval_iters)) / t.eval_iters)
    return losses[0], losses[1]


def test_quill_ladder_end_to_end(small_text, tmp_path, capsys):
    out = tmp_path / "ladder"
    rc = main(["ladder", "--data", str(small_text), "--out", str(out), "--budget-steps", "12",
               "--no-progress", *TINY_FLAGS])
    assert rc == 0
    table = capsys.readouterr().out
    with open(out / "ladder.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == CSV_COLUMNS == ["rung", "params", "train_loss", "val_loss", "tokens_per_s"]
    assert [r[0] for r in rows[1:]] == RUNGS
    for rung, params, train_loss, val_loss, tokens_per_s in rows[1:]:
        run = load_run(out / rung)  # every rung is a run directory of its own
        assert run.config.model.kind == rung and run.config.train.max_iters == 12
        assert int(params) == count_params(run.model)
        # the losses of the rung's final weights, evaluated as the loop evaluates
        assert (float(train_loss), float(val_loss)) == pytest.approx(evaluated_losses(run), abs=1e-4)
        assert float(tokens_per_s) > 0
        assert rung in table and f"{float(val_loss):.4f}" in table
    assert (out / "ladder.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "ladder.png").stat().st_size > 20_000
    # each rung samples like any run
    rc = main(["sample", str(out / "single-head"), "--prompt", "To be", "--max-new-tokens", "8", "--seed", "1"])
    assert rc == 0 and capsys.readouterr().out.startswith("To be")


def test_ladder_refuses_to_overwrite_and_bad_budgets(small_text, tmp_path, capsys):
    out = tmp_path / "ladder"
    out.mkdir()
    keep = out / "ladder.csv"
    keep.write_text("mine\n")
    base = ["ladder", "--data", str(small_text), "--no-progress", *TINY_FLAGS]
    for extra, message in [
        (["--out", str(out), "--budget-steps", "3"], "not empty; pass --overwrite"),
        (["--out", str(tmp_path / "b"), "--budget-steps", "0"], "at least 1"),
        (["--out", str(tmp_path / "b"), "--budget-steps", "3", "--time-budget", "1m"], "not both"),
        (["--out", str(tmp_path / "b"), "--time-budget", "0.001s"], "too short"),
        (["--out", str(tmp_path / "b"), "--time-budget", "soon"], "duration"),
        (["--out", str(tmp_path / "b"), "--n-embd", "15"], "divisible"),
        (["--out", str(tmp_path / "b"), "--data", str(tmp_path / "missing.txt")], "not found"),
    ]:
        assert main(base + extra) == 2, extra
        err = capsys.readouterr().err
        assert err.startswith("quill: error: ") and message in err, (extra, err)
        assert len(err.strip().splitlines()) == 1
    assert keep.read_text() == "mine\n" and not (tmp_path / "b").exists()
    # the real entry point, once
    proc = subprocess.run([sys.executable, "-m", "quillgpt", *base, "--out", str(out), "--budget-steps", "3"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.startswith("quill: error: ") and "Traceback" not in proc.stderr
    assert keep.read_text() == "mine\n"


def test_time_budget_becomes_an_equal_step_budget(small_text, tmp_path, monkeypatch):
    # 10 + 20 + 30 + 40 ms per step = 0.1 s; 11 evaluations of 2 x 3 forward passes of a third of that
    seconds = {"a": 0.01, "b": 0.02, "c": 0.03, "d": 0.04}
    assert steps_for_time_budget(seconds, 60.0, eval_iters=3) == int((60 - 11 * 0.2) / 0.1)
    with pytest.raises(QuillError, match="too short"):
        steps_for_time_budget(seconds, 1.0, eval_iters=3)
    # the ladder times one step of every rung, then plans with those times: given the times, the
    # plan is fixed (the timing itself is machine-dependent, so it is checked on its own below)
    timed = {"bigram": 0.001, "single-head": 0.002, "multi-head": 0.003, "block": 0.006, "gpt": 0.008}
    asked = []

    def fake_time_step(cfg):
        asked.append(cfg.model.kind)
        return timed[cfg.model.kind]

    monkeypatch.setattr(ladder_run, "time_step", fake_time_step)
    cfg = load_config(None, dict(TINY, data=str(small_text), eval_iters=1, time_budget="0.5s"))
    logs: list[str] = []
    result = run_ladder(cfg, tmp_path / "ladder", progress=False, log=logs.append, plot=False)
    assert asked == RUNGS
    assert result.steps == steps_for_time_budget(timed, 0.5, eval_iters=1) == 17
    assert any("time budget 0.5 s" in line and "17 steps per rung" in line and "gpt 8.0" in line for line in logs)
    assert [r.rung for r in result.rungs] == RUNGS
    for r in result.rungs:
        assert load_run(tmp_path / "ladder" / r.rung).config.train.max_iters == 17


def test_time_step_times_real_training_steps_after_a_warm_up(monkeypatch):
    """On a clock that moves 0.25 s per forward pass: with gradient accumulation 2, a step is
    0.5 s; the warm-up step is not timed; every step updates the weights."""
    cfg = load_config(None, dict(TINY, vocab_size=11, gradient_accumulation_steps=2))
    cfg.model.vocab_size = 11
    clock, built = [0.0], []

    def build(model_cfg):
        model = build_model(model_cfg)
        model.register_forward_hook(lambda *_: clock.__setitem__(0, clock[0] + 0.25))
        built.append(model)
        return model

    monkeypatch.setattr(ladder_run, "build_model", build)
    monkeypatch.setattr(ladder_run.time, "perf_counter", lambda: clock[0])
    assert ladder_run.time_step(cfg, repeats=3) == 0.5
    assert clock[0] == 0.25 * 2 * (1 + 3)  # the warm-up step ran too, untimed
    torch.manual_seed(cfg.train.seed)
    untrained = build_model(cfg.model)
    assert not torch.equal(built[0].lm_head.weight, untrained.lm_head.weight)  # AdamW stepped


# --- the ladder's lesson on real text ---------------------------------------------------------

@pytest.mark.slow
def test_ladder_orders_the_rungs_on_shakespeare(shakespeare, tmp_path):
    # Measured at this budget (val): bigram 3.94, single-head 2.75, multi-head 2.61-2.63, block 2.42-2.45,
    # gpt 2.40-2.42; gpt ahead of block by 0.021-0.035 over seeds 1337, 1, 2, 3. On the full text and
    # longer budgets the block overtakes the GPT (docs/ladder.md), so keep this budget.
    out = tmp_path / "ladder"
    assert main(["ladder", "--data", str(shakespeare), "--max-megabytes", "0.2", "--budget-steps", "300",
                 "--out", str(out), "--no-progress", "--sample-tokens", "0"]) == 0
    with open(out / "ladder.csv", newline="") as f:
        val = {row["rung"]: float(row["val_loss"]) for row in csv.DictReader(f)}
    assert val["bigram"] > val["single-head"] > val["multi-head"] > val["block"] >= val["gpt"], val
