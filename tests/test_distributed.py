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
from quillgpt.config import load_config
from quillgpt.generate import generate
from quillgpt.train import Trainer, default_preset

REPO = Path(__file__).resolve().parent.parent

TINY = {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 16, "dropout": 0.0, "batch_size": 4,
        "learning_rate": 3e-3, "min_lr": 3e-4, "warmup_iters": 2, "eval_interval": 5, "eval_iters": 2,
        "log_interval": 1, "sample_tokens": 0, "device": "cpu", "seed": 3, "max_iters": 10}


def torchrun(data: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    flags = []
    for k, v in dict(TINY, data=str(data), out=str(out)).items():
        flags += ["--" + k.replace("_", "-"), str(v)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "quillgpt", "train", "--no-progress", *flags, *extra]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=out.parent)


def single_process_reference(data: Path, out: Path, **extra):
    values = dict(TINY, data=str(data), out=str(out), gradient_accumulation_steps=2, **extra)
    cfg = load_config(default_preset(values), values)  # as `quill train` without --config
    return Trainer(cfg, progress=False, log=lambda m: None).run()


# the speedrun's options and Muon: every rank must take the same orthogonalised step
SPEEDRUN = {"optimizer": "muon", "muon_lr": 0.02, "rope": True, "qk_norm": True, "activation": "relu2",
            "tie_embeddings": False, "logit_softcap": 15.0, "lr_schedule": "wsd"}


@pytest.mark.slow
@pytest.mark.parametrize("extra", [{}, SPEEDRUN], ids=["adamw", "muon"])
def test_ddp_two_processes_equal_one_process_with_accumulation(small_text, tmp_path, extra):
    ref = single_process_reference(small_text, tmp_path / "ref", **extra)
    flags = [a for k, v in extra.items() for a in ("--" + k.replace("_", "-"), str(v))]
    proc = torchrun(small_text, tmp_path / "ddp", *flags)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 processes (DDP)" in proc.stderr
    assert proc.stderr.count("done:") == 1  # only rank 0 reports
    state = ckpt.load_train_state(tmp_path / "ddp")
    assert state.step == TINY["max_iters"]
    # Newton-Schulz runs in bfloat16 where the CPU has it natively: the ranks' different summation
    # order of the gradient flips single bf16 roundings. (Elsewhere it runs in float32.)
    tol = 1e-3 if extra else 1e-5
    torch.testing.assert_close(torch.tensor(state.state["losses"]), torch.tensor(ref.losses),
                               rtol=tol, atol=tol)
    ddp_w, ref_w = ckpt.read_safetensors(tmp_path / "ddp" / ckpt.MODEL_FILE), \
        ckpt.read_safetensors(tmp_path / "ref" / ckpt.MODEL_FILE)
    assert ddp_w.keys() == ref_w.keys()
    for k in ref_w:
        if extra:  # a rank that stepped differently would be off by the whole update, not 3%
            assert (ddp_w[k] - ref_w[k]).norm() <= 3e-2 * ref_w[k].norm() + 1e-6, k
        else:
            torch.testing.assert_close(ddp_w[k], ref_w[k], rtol=1e-4, atol=1e-5)


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
