"""The GPT itself: shapes, causality, learning, initialisation, save/load."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from quillgpt.checkpoint import load_weights, save_weights
from quillgpt.config import ModelConfig
from quillgpt.model import GPT
from quillgpt.registry import build_model


def tiny_config(**kw) -> ModelConfig:
    base = dict(vocab_size=17, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.0, bias=True)
    base.update(kw)
    return ModelConfig(**base)


def test_shapes_and_loss():
    torch.manual_seed(0)
    model = GPT(tiny_config())
    idx = torch.randint(0, 17, (3, 16))
    logits, loss = model(idx)
    assert logits.shape == (3, 16, 17)
    assert loss is None
    logits, loss = model(idx[:, :-1], idx[:, 1:])
    assert logits.shape == (3, 15, 17)
    # an untrained model is close to uniform: loss near ln(vocab)
    assert abs(loss.item() - math.log(17)) < 0.3


def test_longer_than_block_size_is_refused():
    model = GPT(tiny_config())
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 17, dtype=torch.long))


@pytest.mark.parametrize("bias", [True, False])
def test_causality(bias):
    """Changing tokens after position t never changes the logits at positions <= t."""
    torch.manual_seed(0)
    model = GPT(tiny_config(bias=bias)).eval()
    idx = torch.randint(0, 17, (2, 16))
    base, _ = model(idx)
    for t in (0, 5, 14):
        changed = idx.clone()
        changed[:, t + 1 :] = torch.randint(0, 17, changed[:, t + 1 :].shape)
        out, _ = model(changed)
        torch.testing.assert_close(out[:, : t + 1], base[:, : t + 1], rtol=0, atol=1e-6)
        assert not torch.allclose(out[:, t + 1 :], base[:, t + 1 :])


def test_overfits_one_batch():
    torch.manual_seed(0)
    model = GPT(tiny_config())
    x = torch.randint(0, 17, (4, 16))
    y = torch.randint(0, 17, (4, 16))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(300):
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1


def test_gpt2_initialisation_and_tying():
    torch.manual_seed(0)
    cfg = tiny_config(n_layer=4, n_embd=64, vocab_size=500)
    model = GPT(cfg)
    assert model.lm_head.weight is model.transformer.wte.weight
    assert abs(model.transformer.wte.weight.std().item() - 0.02) < 0.002
    assert abs(model.transformer.h[0].attn.c_attn.weight.std().item() - 0.02) < 0.002
    scaled = 0.02 / math.sqrt(2 * cfg.n_layer)
    assert abs(model.transformer.h[0].attn.c_proj.weight.std().item() - scaled) < 0.002
    assert abs(model.transformer.h[0].mlp.c_proj.weight.std().item() - scaled) < 0.002
    assert torch.all(model.transformer.h[0].attn.c_attn.bias == 0)


def test_parameter_count_excludes_position_embedding():
    model = GPT(tiny_config(bias=False))
    total = sum(p.numel() for p in model.parameters())  # tied weights counted once
    assert model.num_params() == total - 16 * 32
    # per block: qkv 32*96, proj 32*32, fc 32*128, proj 128*32, 2 LayerNorm weights of 32
    per_block = 32 * 96 + 32 * 32 + 32 * 128 + 128 * 32 + 2 * 32
    assert model.num_params() == 17 * 32 + 2 * per_block + 32


def test_dropout_is_active_only_in_training():
    torch.manual_seed(0)
    model = GPT(tiny_config(dropout=0.5))
    idx = torch.randint(0, 17, (2, 16))
    model.train()
    a, _ = model(idx)
    b, _ = model(idx)
    assert not torch.allclose(a, b)
    model.eval()
    c, _ = model(idx)
    d, _ = model(idx)
    torch.testing.assert_close(c, d, rtol=0, atol=0)


def test_save_load_identical_logits(tmp_path):
    torch.manual_seed(0)
    model = GPT(tiny_config()).eval()
    path = tmp_path / "m.safetensors"
    save_weights(model, path)
    torch.manual_seed(1)
    other = GPT(tiny_config()).eval()
    idx = torch.randint(0, 17, (2, 16))
    assert not torch.equal(model(idx)[0], other(idx)[0])
    load_weights(other, path)
    assert torch.equal(model(idx)[0], other(idx)[0])
    # the tie survives loading
    assert other.lm_head.weight is other.transformer.wte.weight


def test_build_model_rejects_unknown_kind():
    from quillgpt.errors import QuillError

    with pytest.raises(QuillError, match="unknown model kind"):
        build_model(tiny_config(kind="lstm"))


OUT_OF_MEMORY = """
import resource, sys
import torch
from quillgpt.config import ModelConfig
from quillgpt.errors import QuillError
from quillgpt.registry import build_model, weight_bytes

cfg = ModelConfig(vocab_size=65, block_size=64, n_layer=16, n_head=16, n_embd=2048)  # 3.2 GB of weights
weight_bytes(ModelConfig(vocab_size=65, block_size=8, n_layer=1, n_head=1, n_embd=8))  # the meta device's imports
with open("/proc/self/statm") as f:
    used = int(f.read().split()[0]) * resource.getpagesize()
resource.setrlimit(resource.RLIMIT_AS, (used + (1 << 30), resource.RLIM_INFINITY))  # 1 GiB more
try:
    build_model(cfg)
except QuillError as e:
    print(e)
"""


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads Linux's /proc to set the limit")
def test_weights_past_the_memory_limit_are_one_clear_error():
    """PyTorch's CPU allocator fails with a plain RuntimeError: the registry tells it apart by the
    size of the weights against the memory the process may take (here `ulimit -v`), not by its
    text."""
    proc = subprocess.run([sys.executable, "-c", OUT_OF_MEMORY], capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == ("not enough memory for a model of 16 layers, 2048 wide, context 64, "
                                   "vocabulary 65")


def test_other_runtime_errors_of_a_model_pass_through(monkeypatch):
    """An error of the model's own code is raised as it is, even one that speaks of allocating."""
    from quillgpt import registry

    class Broken(GPT):
        def __init__(self, cfg):
            raise RuntimeError("cannot allocate a head for 3 heads of width 5")

    monkeypatch.setitem(registry.MODEL_KINDS, "gpt", Broken)
    with pytest.raises(RuntimeError, match="cannot allocate a head") as raised:
        build_model(tiny_config())
    assert raised.value.__context__ is None  # the model's own error, not one raised while handling it
