"""Dropout per site: embd_dropout, attn_dropout, attn_out_dropout, mlp_dropout, resid_dropout.

Each site is checked against a forward pass written out here by hand with F.dropout at each
site (same seed, same draws, so equal bit for bit); the keys left empty behave exactly as the
single `dropout` did, down to the training losses of the shakespeare-char-cpu preset."""

from __future__ import annotations

import pytest
import torch
import yaml
from torch.nn import functional as F

from quillgpt import checkpoint as ckpt
from quillgpt.cli import main
from quillgpt.config import DROPOUT_SITES, Config, ModelConfig, load_config
from quillgpt.errors import QuillError
from quillgpt.model import GPT
from quillgpt.train import Trainer

TINY = dict(vocab_size=17, block_size=16, n_layer=2, n_head=2, n_embd=32, bias=True)


def reference_forward(model: GPT, idx: torch.Tensor, embd: float, attn: float, attn_out: float,
                      mlp: float, resid: float) -> torch.Tensor:
    """GPT-2's forward in training mode with dropout at each site at the given rate; the
    residual-stream dropout is drawn only when its rate is not 0 (as before it existed)."""
    t = model.transformer
    B, T = idx.shape
    C, nh = model.config.n_embd, model.config.n_head
    x = F.dropout(t.wte(idx) + t.wpe(torch.arange(T)), embd, training=True)
    for block in t.h:
        q, k, v = block.attn.c_attn(block.ln_1(x)).split(C, dim=2)
        q, k, v = (z.view(B, T, nh, C // nh).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=attn, is_causal=True)
        y = block.attn.c_proj(y.transpose(1, 2).reshape(B, T, C))
        x = x + F.dropout(y, attn_out, training=True)
        if resid:
            x = F.dropout(x, resid, training=True)
        m = block.mlp
        x = x + F.dropout(m.c_proj(F.gelu(m.c_fc(block.ln_2(x)), approximate="tanh")), mlp, training=True)
        if resid:
            x = F.dropout(x, resid, training=True)
    return model.lm_head(t.ln_f(x))


@pytest.mark.parametrize("keys, rates", [
    ({"dropout": 0.2}, (0.2, 0.2, 0.2, 0.2, 0.0)),  # one rate everywhere, as before the keys
    ({"dropout": 0.0}, (0.0, 0.0, 0.0, 0.0, 0.0)),
    ({"dropout": 0.3, "attn_dropout": 0.0, "resid_dropout": 0.1}, (0.3, 0.0, 0.3, 0.3, 0.1)),
    ({"embd_dropout": 0.1, "attn_dropout": 0.2, "attn_out_dropout": 0.3, "mlp_dropout": 0.4,
      "resid_dropout": 0.15}, (0.1, 0.2, 0.3, 0.4, 0.15)),
])
def test_each_site_matches_a_hand_written_forward(keys, rates):
    torch.manual_seed(0)
    model = GPT(ModelConfig(**TINY, **keys)).train()
    idx = torch.randint(0, 17, (3, 16))
    torch.manual_seed(1)
    got, _ = model(idx)
    torch.manual_seed(1)
    want = reference_forward(model, idx, *rates)
    assert torch.equal(got, want)
    # the draws are really there: another seed gives other logits (unless nothing drops)
    torch.manual_seed(2)
    assert torch.equal(model(idx)[0], want) == (max(rates) == 0.0)


def test_every_key_changes_the_forward():
    torch.manual_seed(0)
    idx = torch.randint(0, 17, (3, 16))
    base = GPT(ModelConfig(**TINY)).train()
    for site in DROPOUT_SITES:
        model = GPT(ModelConfig(**TINY, **{site: 0.5})).train()
        model.load_state_dict(base.state_dict())
        torch.manual_seed(1)
        assert not torch.equal(model(idx)[0], base(idx)[0]), f"{site} changed nothing"
    assert ModelConfig(dropout=0.2, mlp_dropout=0.0).dropout_at("mlp_dropout") == 0.0
    assert ModelConfig(dropout=0.2).dropout_at("attn_out_dropout") == 0.2
    assert ModelConfig(dropout=0.2).dropout_at("resid_dropout") == 0.0  # not inherited


# The CPU preset, shortened: losses of every step, compared bit for bit.
SHORT = {"max_iters": 6, "eval_interval": 100, "eval_iters": 1, "log_interval": 1, "sample_tokens": 0}


def preset_losses(data, **keys) -> list[float]:
    cfg = load_config("shakespeare-char-cpu", {"data": str(data), **SHORT, **keys})
    return Trainer(cfg, save=False, progress=False, log=lambda m: None).run().losses


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_preset_losses_are_unchanged_when_the_sites_are_spelled_out(small_text, one_thread):
    spelled = {site: 0.2 for site in DROPOUT_SITES if site != "resid_dropout"}
    old_style = preset_losses(small_text, dropout=0.2)
    assert preset_losses(small_text, dropout=0.0, **spelled) == old_style
    assert preset_losses(small_text) == preset_losses(small_text, **dict.fromkeys(DROPOUT_SITES, 0.0))
    # and a changed site changes the run
    assert preset_losses(small_text, dropout=0.2, resid_dropout=0.1) != old_style


def test_config_keys_flags_and_run_config(tmp_path, capsys):
    cfg = load_config(None, {"attn_out_dropout": "0.25", "resid_dropout": "0.1"})
    assert (cfg.model.attn_out_dropout, cfg.model.resid_dropout, cfg.model.embd_dropout) == (0.25, 0.1, None)
    # written out as null (= dropout), and an old config.yaml without the keys reads the same
    saved = yaml.safe_load(cfg.to_yaml())["model"]
    assert saved["embd_dropout"] is None and saved["attn_out_dropout"] == 0.25
    old = yaml.safe_load(Config().to_yaml())
    for site in DROPOUT_SITES:
        del old["model"][site]
    old["model"]["dropout"] = 0.2
    from quillgpt.config import config_from_dict

    loaded = config_from_dict(old).model
    assert [loaded.dropout_at(s) for s in DROPOUT_SITES] == [0.2, 0.2, 0.2, 0.2, 0.0]
    for bad in (["--mlp-dropout", "1.0"], ["--resid-dropout", "-0.1"], ["--embd-dropout", "x"]):
        assert main(["train", "--no-save", "--max-iters", "0", *bad]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and bad[0][2:].replace("-", "_") in err
    with pytest.raises(QuillError, match="attn_dropout must be in"):
        ModelConfig(attn_dropout=1.5).validate()


def test_run_directory_round_trips_the_sites(small_text, tmp_path, one_thread):
    out = tmp_path / "run"
    assert main(["train", "--config", "shakespeare-char-cpu", "--data", str(small_text), "--out", str(out),
                 "--max-iters", "2", "--eval-iters", "1", "--sample-tokens", "0", "--no-progress",
                 "--dropout", "0.1", "--mlp-dropout", "0.3", "--resid-dropout", "0.05"]) == 0
    run = ckpt.load_run(out)
    m = run.config.model
    assert [m.dropout_at(s) for s in DROPOUT_SITES] == [0.1, 0.1, 0.1, 0.3, 0.05]
    assert run.model.transformer.h[0].mlp.mlp_dropout.p == 0.3
    assert run.model.transformer.h[0].resid_dropout.p == 0.05
