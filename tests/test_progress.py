"""No silent minutes, no stranded runs: the progress bars show from the start of training (every
evaluation included, with an ETA), and a stop during the first evaluation leaves nothing behind."""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from quillgpt.cli import main
from quillgpt.config import load_config
from quillgpt.data import TokenData
from quillgpt.metrics import ProgressBar
from quillgpt.train import Trainer, TrainingInterrupted

REPO = Path(__file__).resolve().parent.parent
TINY = dict(n_layer=1, n_head=2, n_embd=16, block_size=16, batch_size=4, max_iters=6, eval_iters=3,
            eval_interval=3, log_interval=3, warmup_iters=0, sample_tokens=0, device="cpu")
TINY_FLAGS = [arg for key, value in TINY.items() for arg in (f"--{key.replace('_', '-')}", str(value))]


def tiny_cfg(data: Path, out: Path, **kw):
    return load_config(None, dict(TINY, data=str(data), out=str(out), **kw))


class WatchedData:
    """The corpus, with a `watch(split, step)` call before every batch is drawn (step: the
    trainer's step at that moment)."""

    def __init__(self, inner: TokenData, watch):
        self.inner, self.watch = inner, watch
        self.tokenizer = inner.tokenizer
        self.trainer: Trainer | None = None

    def describe(self) -> str:
        return self.inner.describe()

    def fingerprint(self) -> str:
        return self.inner.fingerprint()

    def batches(self, split, batch_size, seed, device, rank=0, world_size=1):
        inner = self.inner.batches(split, batch_size, seed, device, rank, world_size)
        outer = self

        class Watched:
            def next(self) -> tuple[torch.Tensor, torch.Tensor]:
                outer.watch(split, outer.trainer.step if outer.trainer else None, seed)
                return inner.next()

            def state(self):
                return inner.state()

            def set_state(self, state) -> None:
                inner.set_state(state)

        return Watched()


def watched_trainer(cfg, watch, **kw) -> Trainer:
    data = WatchedData(TokenData.from_config(cfg), watch)
    trainer = Trainer(cfg, data=data, **kw)
    data.trainer = trainer
    return trainer


def test_the_bars_show_before_the_first_evaluation_batch(small_text, tmp_path, monkeypatch):
    stderr = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stderr)
    ticks = []
    real_tick = ProgressBar.eval_tick
    monkeypatch.setattr(ProgressBar, "eval_tick", lambda self: ticks.append(self.eval_bar.desc) or real_tick(self))
    seen: list[tuple[str, int, int, str]] = []
    cfg = tiny_cfg(small_text, tmp_path / "r")
    trainer = watched_trainer(cfg, lambda split, step, seed: seen.append((split, step, seed, stderr.getvalue())),
                              log=lambda m: None)
    trainer.run()
    eval_seeds = {cfg.train.seed + 1, cfg.train.seed + 2}
    first_eval = [s for s in seen if s[1] == 0 and s[2] in eval_seeds]
    assert len(first_eval) == 2 * cfg.train.eval_iters
    # before the first batch of the first evaluation is drawn, both bars are on the screen: the
    # run's (0 of 6 steps) and the evaluation's (0 of 2 x 3 batches, time left still unknown)
    shown = first_eval[0][3]
    assert "| 0/6 [00:00<?, ?step/s]" in shown
    assert "evaluating step 0:   0%|" in shown and "| 0/6 [00:00<?, ?batch/s]" in shown
    # every evaluation has its bar, moved once per batch
    out = stderr.getvalue()
    assert "evaluating step 3" in out and "evaluating step 6" in out
    assert ticks == ["evaluating step 0"] * 6 + ["evaluating step 3"] * 6 + ["evaluating step 6"] * 6
    assert "step 3: train loss" in out and "step 6: train loss" in out


def test_the_evaluation_bar_has_an_eta_once_it_moves(monkeypatch):
    stderr = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stderr)
    bar = ProgressBar(10, 0, True, log=lambda m: None)
    bar.start_eval(250, 400)
    bar.eval_tick()
    bar.eval_tick()
    bar.eval_bar.refresh()
    last = stderr.getvalue().split("\r")[-1]
    assert last.startswith("evaluating step 250:   0%|") and "| 2/400 [" in last
    assert re.search(r"\[\d\d:\d\d<\d\d:\d\d, ", last), last  # elapsed<remaining
    bar.close()
    assert bar.eval_bar is None


def test_no_progress_means_no_bars(small_text, tmp_path, monkeypatch):
    stderr = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stderr)
    lines: list[str] = []
    Trainer(tiny_cfg(small_text, tmp_path / "r"), progress=False, log=lines.append).run()
    assert stderr.getvalue() == ""
    assert any(line.startswith("step 6: train loss") for line in lines)


def interrupt_on_third_val_batch(calls: list[int]):
    def watch(split: str, step: int | None, seed: int) -> None:
        if split == "val":
            calls.append(step)
            if len(calls) == 3:
                os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C, mid-evaluation
    return watch


def test_ctrl_c_in_the_first_evaluation_writes_nothing(small_text, tmp_path):
    out = tmp_path / "r"
    calls: list[int] = []
    lines: list[str] = []
    trainer = watched_trainer(tiny_cfg(small_text, out, eval_iters=50), interrupt_on_third_val_batch(calls),
                              progress=False, log=lines.append)
    with pytest.raises(TrainingInterrupted):
        trainer.run()
    assert calls == [0, 0, 0]  # it stopped at the next batch, not at the end of the evaluation
    assert not out.exists()
    assert f"nothing was written ({out} was not created); run the same command to start again" in lines[-1]


def test_ctrl_c_in_the_first_evaluation_leaves_a_replaced_run_as_it_was(small_text, tmp_path):
    out = tmp_path / "r"
    Trainer(tiny_cfg(small_text, out), progress=False, log=lambda m: None).run()
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    calls: list[int] = []
    lines: list[str] = []
    trainer = watched_trainer(tiny_cfg(small_text, out, eval_iters=50, seed=5), interrupt_on_third_val_batch(calls),
                              overwrite=True, progress=False, log=lines.append)
    with pytest.raises(TrainingInterrupted):
        trainer.run()
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert f"nothing was written ({out} is as it was)" in lines[-1]
    assert main(["train", "--resume", str(out), "--no-progress"]) == 0  # the old run still resumes


def test_real_sigint_in_the_first_evaluation_then_the_same_command_runs(small_text, tmp_path):
    """`quill train` in a subprocess; SIGINT (Ctrl-C) once its first evaluation shows on the bar.
    The evaluation is 2 x 10**6 batches long, so the signal always arrives during it."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "quillgpt", "train", "--data", str(small_text), "--out", str(out), *TINY_FLAGS]
    proc = subprocess.Popen([*cmd, "--eval-iters", "1000000"], stderr=subprocess.PIPE, cwd=tmp_path,
                            env=dict(os.environ, PYTHONPATH=str(REPO)))
    seen = b""
    while b"evaluating step 0" not in seen:
        chunk = proc.stderr.read1(4096)
        assert chunk, seen.decode(errors="replace")  # it must not end before its evaluation shows
        seen += chunk
    proc.send_signal(signal.SIGINT)
    rest = proc.stderr.read().decode()
    assert proc.wait() == 130, seen.decode(errors="replace") + rest
    lines = [line for line in rest.replace("\r", "\n").splitlines() if line.strip()]
    assert "during the first evaluation" in lines[-2] and f"({out} was not created)" in lines[-2]
    assert lines[-1] == "quill: interrupted"
    assert "Traceback" not in rest
    assert not out.exists()
    # the next command needs no --overwrite and no --resume: nothing is in its way
    done = subprocess.run([*cmd, "--no-progress"], capture_output=True, text=True, cwd=tmp_path,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert done.returncode == 0, done.stderr
    assert (out / "model.safetensors").is_file()
