"""DDP and FSDP through torchrun, on 2 CPU processes with gloo.

DDP with 2 processes must give the losses of 1 process with gradient accumulation 2 (the ranks
see exactly the micro-batches the single process sees); FSDP must train and leave a run that
loads in one process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from quillgpt import checkpoint as ckpt
from quillgpt import optim
from quillgpt.config import load_config
from quillgpt.generate import generate
from quillgpt.train import Trainer, default_preset

REPO = Path(__file__).resolve().parent.parent

TINY = {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 16, "dropout": 0.0, "batch_size": 4,
        "learning_rate": 3e-3, "min_lr": 3e-4, "warmup_iters": 2, "eval_interval": 5, "eval_iters": 2,
        "log_interval": 1, "sample_tokens": 0, "device": "cpu", "seed": 3, "max_iters": 10}


def torchrun(data: Path, out: Path, *extra: str, launcher: tuple[str, ...] = ("-m", "quillgpt")
             ) -> subprocess.CompletedProcess:
    flags = []
    for k, v in dict(TINY, data=str(data), out=str(out)).items():
        flags += ["--" + k.replace("_", "-"), str(v)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           *launcher, "train", "--no-progress", *flags, *extra]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=out.parent)


def single_process_reference(data: Path, out: Path, **extra):
    values = dict(TINY, data=str(data), out=str(out), gradient_accumulation_steps=2, **extra)
    cfg = load_config(default_preset(values), values)  # as `quill train` without --config
    return Trainer(cfg, progress=False, log=lambda m: None).run()


def initial_weights(data: Path, out: Path, **extra) -> dict[str, torch.Tensor]:
    """The weights every run of these settings starts from (the seeded initial model)."""
    values = dict(TINY, data=str(data), out=str(out), **extra)
    trainer = Trainer(load_config(default_preset(values), values), save=False, progress=False, log=lambda m: None)
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def muon_updated(data: Path, out: Path, **extra) -> set[str]:
    """The names of the weights that Muon (not AdamW) updates in a run of these settings."""
    values = dict(TINY, data=str(data), out=str(out), **extra)
    trainer = Trainer(load_config(default_preset(values), values), save=False, progress=False, log=lambda m: None)
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    return {names[id(p)] for g in trainer.optimizer.param_groups if g.get("muon") for p in g["params"]}


# the speedrun's options and Muon: every rank must take the same orthogonalised step
SPEEDRUN = {"optimizer": "muon", "muon_lr": 0.02, "rope": True, "qk_norm": True, "activation": "relu2",
            "tie_embeddings": False, "logit_softcap": 15.0, "lr_schedule": "wsd"}


@pytest.mark.slow
@pytest.mark.parametrize("extra", [{}, SPEEDRUN], ids=["adamw", "muon"])
def test_ddp_two_processes_equal_one_process_with_accumulation(small_text, tmp_path, monkeypatch, extra):
    if extra:  # Newton-Schulz in float32 on both sides (see quill_fp32_muon.py): the comparison is tight
        monkeypatch.setattr(optim, "native_bfloat16", lambda device: False)
    ref = single_process_reference(small_text, tmp_path / "ref", **extra)
    flags = [a for k, v in extra.items() for a in ("--" + k.replace("_", "-"), str(v))]
    launcher = (str(REPO / "tests" / "quill_fp32_muon.py"),) if extra else ("-m", "quillgpt")
    proc = torchrun(small_text, tmp_path / "ddp", *flags, launcher=launcher)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 processes (DDP)" in proc.stderr
    assert proc.stderr.count("done:") == 1  # only rank 0 reports
    state = ckpt.load_train_state(tmp_path / "ddp")
    assert state.step == TINY["max_iters"]
    torch.testing.assert_close(torch.tensor(state.state["losses"]), torch.tensor(ref.losses),
                               rtol=1e-5, atol=1e-5)
    ddp_w, ref_w = ckpt.read_safetensors(tmp_path / "ddp" / ckpt.MODEL_FILE), \
        ckpt.read_safetensors(tmp_path / "ref" / ckpt.MODEL_FILE)
    assert ddp_w.keys() == ref_w.keys()
    for k in ref_w:
        torch.testing.assert_close(ddp_w[k], ref_w[k], rtol=1e-4, atol=1e-5, msg=k)
    if extra:  # the weights Muon updates moved far, so the equality above is about Muon's steps
        init = initial_weights(small_text, tmp_path / "init", **extra)
        muon = muon_updated(small_text, tmp_path / "init", **extra)
        assert muon and muon < set(ref_w)
        for k in muon:
            assert (ref_w[k] - init[k]).norm() > 0.3 * init[k].norm(), k


@pytest.mark.slow
def test_fsdp_two_processes_train_and_the_run_loads_in_one_process(small_text, tmp_path):
    ref = single_process_reference(small_text, tmp_path / "ref")
    run = tmp_path / "fsdp"
    proc = torchrun(small_text, run, "--fsdp")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 processes (FSDP)" in proc.stderr
    state = ckpt.load_train_state(run)
    assert state.state["optimizer_format"] == "fqn"
    # sharded training computes the same thing as the single process, up to float rounding
    torch.testing.assert_close(torch.tensor(state.state["losses"]), torch.tensor(ref.losses),
                               rtol=1e-4, atol=1e-4)
    loaded = ckpt.load_run(run)  # one process, no process group
    text = generate(loaded.model, loaded.tokenizer, "To be", max_new_tokens=20, seed=0)
    assert len(text) == 20

    # and the FSDP run resumes under FSDP
    proc = torchrun(small_text, run, "--fsdp", "--resume", str(run), "--max-iters", "12",
                    "--allow-config-change")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "from step 10" in proc.stderr
    assert ckpt.load_train_state(run).step == 12


def test_fsdp_without_torchrun_is_a_clear_error(small_text, tmp_path, capsys):
    from quillgpt.cli import main

    assert main(["train", "--data", str(small_text), "--out", str(tmp_path / "r"), "--fsdp"]) == 2
    assert "torchrun" in capsys.readouterr().err
