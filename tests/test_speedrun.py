"""Speedrun options: RoPE, QK-norm, RMSNorm, ReLU squared, untied and zero-initialised heads, logit
soft-capping, the Muon optimizer and the WSD schedule. Each piece alone first, then a model with all
of them trained, resumed bit for bit, sampled, and refused by HF export."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from conftest import make_run
from torch.nn import functional as F

from quillgpt import checkpoint as ckpt
from quillgpt.cli import main
from quillgpt.config import Config, ModelConfig, load_config
from quillgpt.errors import QuillError
from quillgpt.generate import generate_batch, generate_ids
from quillgpt.hf import check_exportable
from quillgpt.model import GPT, KVCache, ReLU2, apply_rope, rope_tables
from quillgpt.optim import Muon, check_optimizer, lr_at, make_optimizer, orthogonalize, set_lr
from quillgpt.tokenizers.bpe import ByteBPETokenizer
from quillgpt.tokenizers.char import CharTokenizer
from quillgpt.train import Trainer, resume_config

REPO = Path(__file__).resolve().parent.parent

# every non-GPT-2 model option at once
ALL_OPTIONS = dict(rope=True, qk_norm=True, norm="rmsnorm", activation="relu2", tie_embeddings=False,
                   zero_init=True, logit_softcap=15.0)
# a tiny run with every option, Muon and the WSD schedule
SPEEDRUN = dict(ALL_OPTIONS, n_layer=2, n_head=4, n_embd=32, block_size=16, bias=False, dropout=0.0,
                batch_size=8, learning_rate=3e-3, min_lr=0.0, warmup_iters=2, lr_schedule="wsd",
                cooldown_frac=0.5, optimizer="muon", muon_lr=0.05, muon_weight_decay=0.01,
                eval_interval=10, eval_iters=2, log_interval=5, sample_tokens=0, device="cpu", seed=7)
HIDDEN = re.compile(r"transformer\.h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight")
CHARS = "\n !',.:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
VERSE = [
    "To be, or not to be, that is the question:",
    "Whether 'tis nobler in the mind to suffer",
    "The slings and arrows of outrageous fortune,",
    "Or to take arms against a sea of troubles",
    "And by opposing end them. To die: to sleep;",
]


@pytest.fixture(autouse=True)
def one_thread():
    """One thread: tiny models run faster and steadier on a shared machine, and bitwise resume
    needs the same split of the work in both runs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def quiet(msg: str) -> None:
    pass


def tiny_model(seed: int = 0, vocab_size: int = 50, **kw) -> GPT:
    torch.manual_seed(seed)
    values = dict(vocab_size=vocab_size, block_size=16, n_layer=2, n_head=4, n_embd=32, dropout=0.0)
    values.update(kw)
    return GPT(ModelConfig(**values))


def speedrun_cfg(data: Path, out: Path | None, **extra) -> Config:
    values = dict(SPEEDRUN, data=str(data), out=str(out) if out else None)
    values.update(extra)
    return load_config(None, values)


def one_line_error(capsys, argv: list[str]) -> str:
    """Run quill in-process: exit status 2 and exactly one line on stderr, returned."""
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("quill: error: ") and "Traceback" not in err, err
    return lines[0]


# --- RoPE -------------------------------------------------------------------------------------

def test_rope_scores_depend_only_on_relative_position():
    hs, base = 16, 10000.0
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(5, hs, generator=g), torch.randn(5, hs, generator=g)

    def score(m: int, n: int) -> torch.Tensor:
        cos, sin = rope_tables(torch.tensor([m, n]), hs, base)  # (2, hs/2)
        return (apply_rope(q, cos[0], sin[0]) * apply_rope(k, cos[1], sin[1])).sum(-1)  # (5,)

    for m, n in [(0, 0), (3, 1), (2, 9), (7, 7), (11, 4)]:
        ref = score(m, n)
        for shift in (1, 5, 37, 200):
            torch.testing.assert_close(score(m + shift, n + shift), ref, rtol=0, atol=1e-4)
    # ...and they do depend on it: the rotation is not the identity
    assert (score(0, 1) - score(0, 0)).abs().max() > 1e-2
    assert (score(3, 1) - score(1, 3)).abs().max() > 1e-2
    # a rotation keeps lengths, and position 0 is not rotated
    cos, sin = rope_tables(torch.arange(6), hs, base)
    rotated = apply_rope(q[:, None, :].expand(5, 6, hs), cos, sin)  # (5, 6, hs)
    torch.testing.assert_close(rotated.norm(dim=-1), q.norm(dim=-1, keepdim=True).expand(5, 6))
    torch.testing.assert_close(rotated[:, 0], q)
    assert cos.shape == sin.shape == (6, hs // 2)


def test_rope_model_has_no_position_embedding_and_is_causal():
    model = tiny_model(rope=True).eval()
    assert "wpe" not in model.transformer
    assert not [n for n in model.state_dict() if "wpe" in n]
    assert "wpe" in tiny_model().transformer  # GPT-2 has one
    with torch.no_grad():
        for p in model.parameters():  # weights of a real size, so that every position matters
            p.normal_(0.0, 0.5)
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 50, (2, 16), generator=g)
    with torch.no_grad():
        base, _ = model(idx)
        for t in (0, 5, 14):
            other = idx.clone()
            other[:, t + 1:] = torch.randint(0, 50, (2, 15 - t), generator=g)
            logits, _ = model(other)
            torch.testing.assert_close(logits[:, : t + 1], base[:, : t + 1], rtol=0, atol=1e-5)
            assert (logits[:, t + 1:] - base[:, t + 1:]).abs().max() > 1e-3


def test_order_reaches_a_one_layer_model_only_through_the_rotation():
    """One causal layer without position information sees its context as a set: swapping the first
    two tokens leaves the last position's logits alone. With RoPE the order matters."""
    a, b = torch.tensor([[4, 9, 17, 23]]), torch.tensor([[9, 4, 17, 23]])
    for rope in (False, True):
        model = tiny_model(3, n_layer=1, rope=rope).eval()
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() > 1:
                    p.normal_(0.0, 0.5)
            if not rope:
                model.transformer.wpe.weight.zero_()  # GPT-2 without its position embedding
            la, lb = model(a)[0][0, -1], model(b)[0][0, -1]
        if rope:
            assert (la - lb).abs().max() > 1e-3
        else:
            torch.testing.assert_close(la, lb, rtol=0, atol=1e-5)


# --- QK-norm ----------------------------------------------------------------------------------

@pytest.mark.parametrize("rope", [False, True])
def test_qk_norm_gives_queries_and_keys_of_unit_rms(rope):
    hs = 32 // 4
    x = torch.randn(2, 10, 32, generator=torch.Generator().manual_seed(2)) * 3
    tables = None
    if rope:
        cos, sin = rope_tables(torch.arange(10), hs, 10000.0)
        tables = (cos[:, None, None, :], sin[:, None, None, :])
    with torch.no_grad():
        q, k, v = tiny_model(qk_norm=True, rope=rope).transformer.h[0].attn.qkv(x, tables)
        assert q.shape == k.shape == v.shape == (2, 4, 10, hs)
        for t in (q, k):
            torch.testing.assert_close(t.norm(dim=-1), torch.full((2, 4, 10), math.sqrt(hs)), rtol=0, atol=2e-3)
        assert (v.pow(2).mean(-1).sqrt() - 1).abs().max() > 0.5  # values are not normalised
        q, k, _ = tiny_model(qk_norm=False, rope=rope).transformer.h[0].attn.qkv(x, tables)
        for t in (q, k):
            assert (t.pow(2).mean(-1).sqrt() - 1).abs().max() > 0.1


# --- zero_init and the (un)tied head ------------------------------------------------------------

def test_zero_init_zeroes_the_output_projections_and_an_untied_head():
    model = tiny_model(zero_init=True, tie_embeddings=False)
    proj = [n for n, _ in model.named_parameters() if n.endswith("c_proj.weight")]
    assert len(proj) == 4  # attention and MLP, two blocks
    params = dict(model.named_parameters())
    for name in [*proj, "lm_head.weight"]:
        assert torch.count_nonzero(params[name]) == 0, name
    # everything else is initialised as usual
    for name in ("transformer.wte.weight", "transformer.h.0.attn.c_attn.weight", "transformer.h.1.mlp.c_fc.weight"):
        assert params[name].std() > 0.01, name
    # a zero head predicts the uniform distribution: loss ln(vocab) exactly at the start
    idx = torch.randint(0, 50, (3, 16))
    logits, loss = model(idx, idx)
    assert torch.count_nonzero(logits) == 0
    assert loss.item() == pytest.approx(math.log(50), rel=1e-6)
    # with softcap and every other option too
    logits, loss = tiny_model(**ALL_OPTIONS)(idx, idx)
    assert loss.item() == pytest.approx(math.log(50), rel=1e-6)

    # without zero_init: GPT-2's initialisation (scaled-down projections, a random untied head)
    plain = dict(tiny_model(tie_embeddings=False).named_parameters())
    for name in [*proj, "lm_head.weight"]:
        assert plain[name].abs().max() > 0, name
    assert plain["transformer.h.0.mlp.c_proj.weight"].std() < plain["transformer.h.0.mlp.c_fc.weight"].std()


def test_tied_head_is_the_embedding_and_untied_is_not():
    tied = tiny_model(tie_embeddings=True, zero_init=True)
    assert tied.lm_head.weight is tied.transformer.wte.weight
    assert tied.lm_head.weight.abs().max() > 0  # zero_init leaves a tied head (the embedding) alone
    untied = tiny_model(tie_embeddings=False)
    assert untied.lm_head.weight is not untied.transformer.wte.weight
    assert untied.lm_head.weight.data_ptr() != untied.transformer.wte.weight.data_ptr()
    assert untied.num_params() == tied.num_params() + 50 * 32  # the head's own matrix
    with torch.no_grad():
        untied.lm_head.weight.add_(1.0)
    assert not torch.equal(untied.lm_head.weight, untied.transformer.wte.weight)


# --- relu2, rmsnorm, softcap ------------------------------------------------------------------

def test_relu2_is_relu_squared_in_the_mlp():
    x = torch.randn(4, 7, 32, generator=torch.Generator().manual_seed(3))
    mlp = tiny_model(activation="relu2").transformer.h[0].mlp
    assert isinstance(mlp.gelu, ReLU2)
    torch.testing.assert_close(mlp.gelu(x), F.relu(x) ** 2, rtol=0, atol=0)
    with torch.no_grad():
        expected = mlp.c_proj(F.relu(mlp.c_fc(x)).pow(2))
        torch.testing.assert_close(mlp(x), expected)
        gelu = tiny_model(activation="gelu").transformer.h[0].mlp
        assert not isinstance(gelu.gelu, ReLU2)
        torch.testing.assert_close(gelu(x), gelu.c_proj(F.gelu(gelu.c_fc(x), approximate="tanh")))


def test_rmsnorm_modules_replace_layernorm():
    model = tiny_model(norm="rmsnorm")
    norms = [m for m in model.modules() if isinstance(m, (nn.LayerNorm, nn.RMSNorm))]
    assert len(norms) == 5 and all(isinstance(m, nn.RMSNorm) for m in norms)  # 2 per block + ln_f
    assert not any(n.endswith(".bias") for n, _ in model.named_parameters() if ".ln_" in n)
    x = torch.randn(3, 32) * 4 + 2
    torch.testing.assert_close(model.transformer.ln_f(x), x / x.pow(2).mean(-1, keepdim=True).sqrt(),
                               rtol=1e-5, atol=1e-5)
    plain = tiny_model()
    assert all(isinstance(m, nn.LayerNorm) for m in (plain.transformer.ln_f, plain.transformer.h[0].ln_1))


def test_logit_softcap_bounds_the_logits():
    cap = 5.0
    model = tiny_model(logit_softcap=cap).eval()
    uncapped = tiny_model().eval()  # the same seed: the same weights
    with torch.no_grad():
        for a, b in zip(model.parameters(), uncapped.parameters()):
            p = torch.randn_like(a) * 2
            a.copy_(p)
            b.copy_(p)
        idx = torch.randint(0, 50, (2, 16))
        logits, _ = model(idx)
        raw, _ = uncapped(idx)
    assert raw.abs().max() > 3 * cap  # the cap really bites
    assert logits.abs().max() <= cap  # float32 tanh reaches exactly 1 far out (|x| > ~9)
    assert logits[raw.abs() < 4 * cap].abs().max() < cap
    torch.testing.assert_close(logits, cap * torch.tanh(raw / cap))


# --- Muon ---------------------------------------------------------------------------------------

def conditioned(shape: tuple[int, ...], cond: float, g: torch.Generator) -> torch.Tensor:
    """Random square matrices with singular values spread evenly (log scale) over [1/cond, 1]."""
    n = shape[-1]
    Q1 = torch.linalg.qr(torch.randn(*shape, generator=g))[0]
    Q2 = torch.linalg.qr(torch.randn(*shape, generator=g))[0]
    return Q1 @ torch.diag(torch.logspace(0, -math.log10(cond), n)) @ Q2


@pytest.mark.parametrize("shape", [(64, 256), (256, 64), (3, 32, 32)])
def test_orthogonalize_is_close_to_u_v_transpose(shape):
    g = torch.Generator().manual_seed(4)
    if shape[-1] == shape[-2]:
        # a square Gaussian matrix has singular values near 0, which five Newton-Schulz steps leave
        # below the band by design (sigma / |G|_F < ~1e-3); use a condition number of 100
        G = conditioned(shape, 100.0, g)
    else:
        G = torch.randn(*shape, generator=g)
    O = orthogonalize(G)  # noqa: E741 - the usual name
    assert O.shape == G.shape and O.dtype == G.dtype
    sv = torch.linalg.svdvals(O.double())
    assert sv.min() > 0.5 and sv.max() < 1.5, (sv.min(), sv.max())
    U, _, Vh = torch.linalg.svd(G.double(), full_matrices=False)
    polar = U @ Vh
    cos = F.cosine_similarity(O.double().flatten(-2), polar.flatten(-2), dim=-1)
    assert cos.min() > 0.9, cos
    # the scale of G does not matter (up to bfloat16 rounding, a few percent)
    for scale in (1e3, 1e-3):
        assert (orthogonalize(G * scale) - O).norm() < 0.1 * O.norm()


@pytest.mark.parametrize("native", [True, False])
def test_orthogonalize_runs_in_bf16_only_where_the_device_has_it(native, monkeypatch):
    """Emulated bf16 matmuls are ~60x slower than fp32 on an AVX2-only CPU: without native bf16
    the iteration runs in fp32 and matches a float64 reference closely; with it, bf16 rounding shows."""
    import quillgpt.optim as optim

    monkeypatch.setattr(optim, "native_bfloat16", lambda device: native)
    G = torch.randn(32, 96, generator=torch.Generator().manual_seed(6))
    a, b, c = optim.NS_COEFFS
    X = G.double().mT / G.double().norm()
    for _ in range(5):
        A = X @ X.mT
        X = a * X + (b * A + c * A @ A) @ X
    reference = X.mT
    error = ((orthogonalize(G).double() - reference).norm() / reference.norm()).item()
    if native:
        assert 1e-4 < error < 0.05, error
    else:
        assert error < 1e-5, error


@pytest.mark.parametrize("shape", [(64, 16), (16, 64), (24, 24)])
def test_muon_step_is_the_scaled_orthogonalized_gradient(shape):
    g = torch.Generator().manual_seed(5)
    w = nn.Parameter(torch.randn(*shape, generator=g))
    w0 = w.detach().clone()
    w.grad = torch.randn(*shape, generator=g)
    opt = Muon([{"params": [w], "muon": True, "lr": 1.0, "momentum": 0.0, "nesterov": False,
                 "weight_decay": 0.0}])
    opt.step()
    scale = math.sqrt(max(1.0, shape[0] / shape[1]))
    expected = w0.add(orthogonalize(w.grad), alpha=-scale)
    assert torch.equal(w.detach(), expected)
    # the step moves every direction by about the same: singular values of the step near `scale`
    sv = torch.linalg.svdvals((w0 - w.detach()).double())
    assert sv.min() > 0.5 * scale and sv.max() < 1.5 * scale


def test_muon_momentum_nesterov_weight_decay_and_split():
    g = torch.Generator().manual_seed(6)
    w = nn.Parameter(torch.randn(24, 8, generator=g))  # three stacked 8x8 blocks
    lr, mom, wd = 0.1, 0.9, 0.5
    opt = Muon([{"params": [w], "muon": True, "lr": lr, "momentum": mom, "weight_decay": wd, "split": 3}])
    ref, buf = w.detach().clone(), torch.zeros(24, 8)
    for _ in range(3):
        w.grad = torch.randn(24, 8, generator=g)
        opt.step()
        buf = mom * buf + (1 - mom) * w.grad
        update = (1 - mom) * w.grad + mom * buf  # nesterov (the default)
        blocks = torch.cat([orthogonalize(b) for b in update.split(8)])  # each block alone, scale 1
        ref = ref * (1 - lr * wd) - lr * blocks
        torch.testing.assert_close(w.detach(), ref, rtol=0, atol=1e-5)
    # the whole matrix orthogonalised at once would be a different step
    whole = orthogonalize(update)
    assert (whole - blocks).abs().max() > 0.05


def param_names(model: nn.Module, params) -> set[str]:
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)] for p in params}


@pytest.mark.parametrize("tie", [False, True])
def test_make_optimizer_puts_hidden_matrices_in_muon_and_the_rest_in_adamw(tie):
    model = tiny_model(**dict(ALL_OPTIONS, tie_embeddings=tie), bias=True)
    cfg = load_config(None, dict(optimizer="muon", muon_lr=0.05, muon_momentum=0.9, muon_weight_decay=0.01,
                                 learning_rate=2e-3, weight_decay=0.1, beta1=0.8, beta2=0.95))
    opt = make_optimizer(model, cfg, torch.device("cpu"))
    assert isinstance(opt, Muon)
    muon = [g for g in opt.param_groups if g["muon"]]
    adamw = [g for g in opt.param_groups if not g["muon"]]
    all_names = {n for n, _ in model.named_parameters()}
    hidden = {n for n in all_names if HIDDEN.fullmatch(n)}
    assert len(hidden) == 8
    assert set().union(*(param_names(model, g["params"]) for g in muon)) == hidden
    for g in muon:
        names = param_names(model, g["params"])
        qkv = {n for n in names if n.endswith("c_attn.weight")}
        assert not qkv or qkv == names, "c_attn shares a group with other matrices"
        assert g["split"] == (3 if qkv else 1)
        assert (g["lr"], g["momentum"], g["weight_decay"]) == (0.05, 0.9, 0.01)
    assert sum(g["split"] == 3 for g in muon) == 1
    rest = set().union(*(param_names(model, g["params"]) for g in adamw))
    assert rest == all_names - hidden
    assert "transformer.wte.weight" in rest and ("lm_head.weight" in rest) == (not tie)
    assert {n for n in rest if ".ln_" in n}
    assert all(".ln_" in n or n.endswith(".bias") or n in ("transformer.wte.weight", "lm_head.weight") for n in rest)
    for g in adamw:
        matrices = all(p.dim() >= 2 for p in g["params"])
        assert g["weight_decay"] == (0.1 if matrices else 0.0)
        assert tuple(g["betas"]) == (0.8, 0.95) and g["lr"] == 2e-3
    counted = sum(len(g["params"]) for g in opt.param_groups)
    assert counted == len(list(model.parameters()))  # each parameter in exactly one group

    # set_lr: AdamW groups take the scheduled lr, Muon groups muon_lr scaled by the same schedule
    set_lr(opt, 1e-3, cfg)
    assert all(g["lr"] == pytest.approx(0.025) for g in muon) and all(g["lr"] == 1e-3 for g in adamw)
    # optimizer adamw: plain torch AdamW over everything
    plain = make_optimizer(model, load_config(None, {}), torch.device("cpu"))
    assert type(plain) is torch.optim.AdamW


def test_adamw_groups_of_muon_match_torch_adamw():
    g = torch.Generator().manual_seed(8)
    shapes = [(6, 5), (5,), (3, 4)]
    a = [nn.Parameter(torch.randn(*s, generator=g)) for s in shapes]
    b = [nn.Parameter(p.detach().clone()) for p in a]
    kw = dict(lr=3e-2, betas=(0.85, 0.97), eps=1e-6)
    ours = Muon([{"params": [a[0], a[2]], "weight_decay": 0.1}, {"params": [a[1]], "weight_decay": 0.0}], **kw)
    ref = torch.optim.AdamW([{"params": [b[0], b[2]], "weight_decay": 0.1},
                             {"params": [b[1]], "weight_decay": 0.0}], foreach=False, **kw)
    for step in range(5):
        for pa, pb in zip(a, b):
            grad = torch.randn(pa.shape, generator=g)
            pa.grad, pb.grad = grad.clone(), grad.clone()
        if step == 3:  # a schedule changes lr between steps
            for opt in (ours, ref):
                for group in opt.param_groups:
                    group["lr"] = 1e-2
        ours.step()
        ref.step()
        for pa, pb in zip(a, b):
            torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-7)
    for pa, pb in zip(a, b):
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(ours.state[pa][key], ref.state[pb][key], rtol=1e-6, atol=1e-9)


# --- training, resume, sampling -----------------------------------------------------------------

@pytest.fixture(scope="module")
def verse(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "verse.txt"
    path.write_text("\n".join(VERSE * 30) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def speedrun_run(verse, tmp_path_factory):
    """A saved run with every option, Muon and WSD: (run directory, TrainResult, final weights)."""
    out = tmp_path_factory.mktemp("runs") / "speedrun"
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QUILL_CACHE", str(tmp_path_factory.mktemp("cache")))
        torch.set_num_threads(1)
        try:
            trainer = Trainer(speedrun_cfg(verse, out, max_iters=40), progress=False, log=quiet)
            result = trainer.run()
        finally:
            torch.set_num_threads(threads)
    return out, result, {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def test_training_with_every_option_and_muon_lowers_the_loss(speedrun_run):
    out, result, weights = speedrun_run
    cfg = ckpt.read_run_config(out)
    assert cfg.model.non_gpt2_options() and cfg.train.optimizer == "muon" and cfg.train.lr_schedule == "wsd"
    first_val = float(ckpt.load_train_state(out).state["metrics"][0]["val_loss"])
    assert first_val == pytest.approx(math.log(cfg.model.vocab_size), rel=1e-4)  # zero-init head
    assert result.val_loss < first_val - 1.0, (first_val, result.val_loss)
    assert sum(result.losses[-5:]) / 5 < sum(result.losses[:5]) / 5 - 1.0
    assert all(math.isfinite(x) for x in result.losses)
    # every hidden matrix moved away from its initialisation, zeroed ones included
    init = tiny_model(7, vocab_size=cfg.model.vocab_size, **ALL_OPTIONS, bias=False).state_dict()  # seed 7
    assert init.keys() == weights.keys()
    for name in init:
        if HIDDEN.fullmatch(name):
            assert weights[name].abs().max() > 0 and not torch.equal(weights[name], init[name]), name
    # the saved run loads with its untied head intact
    run = ckpt.load_run(out)
    assert run.model.lm_head.weight is not run.model.transformer.wte.weight
    for k, v in run.model.state_dict().items():
        assert torch.equal(v, weights[k]), k


def weights_of(run_dir: Path) -> dict[str, torch.Tensor]:
    return ckpt.read_safetensors(run_dir / ckpt.MODEL_FILE)


def test_resume_with_every_option_and_muon_is_bitwise_identical(verse, tmp_path):
    extra = dict(dropout=0.1, lr_decay_iters=12)  # dropout: the RNG state matters too
    full = Trainer(speedrun_cfg(verse, tmp_path / "full", max_iters=12, **extra), progress=False, log=quiet).run()
    part = tmp_path / "part"
    Trainer(speedrun_cfg(verse, part, max_iters=6, checkpoint_interval=3, **extra), progress=False, log=quiet).run()
    assert [p.name for p in ckpt.list_checkpoints(part)] == ["step-00000003", "step-00000006"]
    state = ckpt.load_train_state(part).state["optimizer"]["state"]
    assert any("momentum_buffer" in s for s in state.values()) and any("exp_avg" in s for s in state.values())
    cfg = resume_config(part, overrides={"max_iters": 12}, allow_config_change=True)
    assert cfg.train.optimizer == "muon" and cfg.model.rope
    resumed = Trainer(cfg, progress=False, log=quiet, resume=part).run()

    assert resumed.losses == full.losses  # exactly, every step
    a, b = weights_of(part), weights_of(tmp_path / "full")
    assert a.keys() == b.keys() and "lm_head.weight" in a
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"
    assert resumed.val_loss == full.val_loss


def quill(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "quillgpt", *args], capture_output=True, text=True,
                          env=env)


def test_cli_sample_from_a_run_with_every_option(speedrun_run):
    out = speedrun_run[0]
    args = ["sample", str(out), "--prompt", "To be", "--max-new-tokens", "40"]
    r1 = quill(*args, "--seed", "0")
    r2 = quill(*args, "--seed", "0")
    assert r1.returncode == 0, r1.stderr
    assert r1.stdout == r2.stdout
    assert r1.stdout.startswith("To be") and len(r1.stdout.rstrip("\n")) == len("To be") + 40
    r3 = quill(*args, "--seed", "1")
    assert r3.returncode == 0 and r3.stdout != r1.stdout


def sampling_model(seed: int = 0, block_size: int = 24, std: float = 0.5, **kw) -> GPT:
    """A speedrun model with large random weights, so greedy decoding wanders."""
    model = tiny_model(seed, vocab_size=len(CHARS), block_size=block_size, n_head=2,
                       **dict(ALL_OPTIONS, logit_softcap=30.0, **kw)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, std)
    return model


def test_cached_logits_equal_uncached_for_a_rope_model():
    model = sampling_model(block_size=48, std=0.3)
    seq = torch.randint(0, len(CHARS), (2, 40), generator=torch.Generator().manual_seed(9))
    cache = KVCache(model.config, 2, "cpu")
    with torch.no_grad():
        logits, _ = model(seq[:, :7], cache=cache)  # prefill
        full, _ = model(seq[:, :7])
        torch.testing.assert_close(logits[:, -1], full[:, -1], rtol=0, atol=1e-4)
        for t in range(7, 40):
            logits, _ = model(seq[:, t : t + 1], cache=cache)
            full, _ = model(seq[:, : t + 1])
            torch.testing.assert_close(logits[:, -1], full[:, -1], rtol=0, atol=1e-4)
    assert full.abs().max() > 1.0


@pytest.mark.parametrize("overflow", ["shift", "slide"])
def test_cached_generation_equals_recompute_for_a_rope_model(overflow):
    model = sampling_model(seed=1)
    prompt = torch.randint(0, len(CHARS), (1, 5), generator=torch.Generator().manual_seed(10))
    cached = generate_ids(model, prompt, 60, temperature=0, overflow=overflow)  # past block_size 24
    plain = generate_ids(model, prompt, 60, temperature=0, overflow=overflow, use_cache=False)
    assert cached.tolist() == plain.tolist()
    assert len(set(cached[0, 5:].tolist())) > 5  # it wanders: the comparison means something
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    sampled = generate_ids(model, prompt, 40, temperature=1.0, generator=g1)
    assert sampled.tolist() == generate_ids(model, prompt, 40, temperature=1.0, generator=g2,
                                            use_cache=False).tolist()


def test_left_padded_batch_equals_each_alone_for_a_rope_model():
    """Left-padded rows (padding masked, positions per row: (B, T) rotary tables) decode as each
    prompt alone."""
    model = sampling_model(seed=2)
    tok = CharTokenizer(list(CHARS))
    prompts = ["To be", "Or not to be, that is", "A"]
    batch = generate_batch(model, tok, prompts, max_new_tokens=30, temperature=0)
    alone = [generate_batch(model, tok, [p], max_new_tokens=30, temperature=0)[0] for p in prompts]
    assert batch == alone


# --- HF export ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bpe() -> ByteBPETokenizer:
    return ByteBPETokenizer.train("\n".join(VERSE * 10), 300)


def exportable_run(path: Path, bpe: ByteBPETokenizer, **model) -> Path:
    """A run directory as quill train writes it, GPT-2 exportable but for `model`'s options."""
    return make_run(path, ModelConfig(block_size=16, n_layer=1, n_head=2, n_embd=16, bias=True, **model), bpe)


@pytest.mark.parametrize(
    ("option", "named"),
    [
        ({"rope": True}, "rope"),
        ({"qk_norm": True}, "qk_norm"),
        ({"norm": "rmsnorm"}, "norm rmsnorm"),
        ({"activation": "relu2"}, "activation relu2"),
        ({"tie_embeddings": False}, "tie_embeddings false"),
        ({"logit_softcap": 15.0}, "logit_softcap 15"),
        (ALL_OPTIONS, "rope, qk_norm, norm rmsnorm, activation relu2, tie_embeddings false, logit_softcap 15"),
    ],
)
def test_export_refuses_each_non_gpt2_option(tmp_path, bpe, capsys, option, named):
    run = exportable_run(tmp_path / "run", bpe, **option)
    out = tmp_path / "out"
    err = one_line_error(capsys, ["export-hf", str(run), str(out)])
    assert named in err and "GPT-2" in err, err
    assert not out.exists()
    with pytest.raises(QuillError, match=re.escape(named)):
        check_exportable(ckpt.read_run_config(run).model)


def test_zero_init_alone_exports_and_loads_in_transformers(tmp_path, bpe, capsys):
    transformers = pytest.importorskip("transformers")
    assert ModelConfig(zero_init=True).non_gpt2_options() == []
    run = exportable_run(tmp_path / "run", bpe, zero_init=True)
    out = tmp_path / "hf"
    assert main(["export-hf", str(run), str(out)]) == 0
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    hf = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    model = ckpt.load_run(run).model
    x = torch.randint(0, bpe.vocab_size, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x)[0], atol=1e-5, rtol=0)


# --- config and schedule --------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("norm", "batchnorm", "norm must be layernorm or rmsnorm"),
        ("activation", "swish", "activation must be gelu or relu2"),
        ("optimizer", "sgd", "optimizer must be adamw or muon"),
        ("lr_schedule", "linear", "lr_schedule must be cosine or wsd"),
        ("cooldown_frac", "1.5", "cooldown_frac must be in [0, 1]"),
        ("logit_softcap", "-1", "logit_softcap >= 0"),
    ],
)
def test_bad_speedrun_values_are_one_line_errors(verse, capsys, flag, value, message):
    with pytest.raises(QuillError, match=re.escape(message)):
        load_config(None, {flag: value})
    err = one_line_error(capsys, ["train", "--data", str(verse), "--no-save", "--no-progress",
                                  "--" + flag.replace("_", "-"), value])
    assert message in err, err


def test_every_option_is_a_command_line_flag(verse, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--data", str(verse), "--out", str(out), "--no-progress", "--n-layer", "1", "--n-head", "2",
                 "--n-embd", "16", "--block-size", "16", "--batch-size", "4", "--max-iters", "3", "--eval-iters", "1",
                 "--sample-tokens", "0", "--bias", "false", "--rope", "--rope-base", "500", "--qk-norm", "true",
                 "--norm", "rmsnorm", "--activation", "relu2", "--tie-embeddings", "false", "--zero-init",
                 "--logit-softcap", "15", "--optimizer", "muon", "--muon-lr", "0.03", "--muon-momentum", "0.9",
                 "--muon-weight-decay", "0.01", "--lr-schedule", "wsd", "--cooldown-frac", "0.3"]) == 0
    cfg = ckpt.read_run_config(out)
    m, t = cfg.model, cfg.train
    assert (m.rope, m.rope_base, m.qk_norm, m.norm, m.activation) == (True, 500.0, True, "rmsnorm", "relu2")
    assert (m.tie_embeddings, m.zero_init, m.logit_softcap) == (False, True, 15.0)
    assert (t.optimizer, t.muon_lr, t.muon_momentum, t.muon_weight_decay) == ("muon", 0.03, 0.9, 0.01)
    assert (t.lr_schedule, t.cooldown_frac) == ("wsd", 0.3)
    run = ckpt.load_run(out)
    assert "wpe" not in run.model.transformer and isinstance(run.model.transformer.ln_f, nn.RMSNorm)


def test_muon_with_fsdp_is_refused(verse, tmp_path, capsys):
    cfg = load_config(None, {"optimizer": "muon"})
    with pytest.raises(QuillError, match="muon.*fsdp"):
        check_optimizer(cfg, fsdp=True)
    check_optimizer(cfg, fsdp=False)
    check_optimizer(load_config(None, {}), fsdp=True)  # AdamW shards fine
    out = tmp_path / "run"
    err = one_line_error(capsys, ["train", "--data", str(verse), "--out", str(out), "--no-progress",
                                  "--optimizer", "muon", "--fsdp", "--max-iters", "2"])
    assert "muon" in err and "--fsdp" in err
    assert not out.exists()


def test_wsd_holds_the_learning_rate_then_cools_down_to_min_lr():
    cfg = load_config(None, dict(learning_rate=1.0, min_lr=0.1, warmup_iters=10, max_iters=110,
                                 lr_schedule="wsd", cooldown_frac=0.4))
    assert lr_at(0, cfg) == pytest.approx(1 / 11)  # warmup as with cosine
    for step in (10, 30, 69, 70):  # held until the last 40% of the 100 post-warmup steps
        assert lr_at(step, cfg) == pytest.approx(1.0)
    assert lr_at(80, cfg) == pytest.approx(0.775)  # linear cooldown: a quarter of the way
    assert lr_at(90, cfg) == pytest.approx(0.55)
    assert lr_at(110, cfg) == pytest.approx(0.1)
    assert lr_at(500, cfg) == pytest.approx(0.1)
    lrs = [lr_at(s, cfg) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    cosine = load_config(None, dict(learning_rate=1.0, min_lr=0.1, warmup_iters=10, max_iters=110))
    assert lr_at(30, cosine) < 0.99  # cosine decays right after warmup; wsd does not
    # lr_decay_iters moves the end of the cooldown
    short = load_config(None, dict(learning_rate=1.0, min_lr=0.0, warmup_iters=0, max_iters=100,
                                   lr_decay_iters=50, lr_schedule="wsd", cooldown_frac=0.5))
    assert lr_at(25, short) == pytest.approx(1.0) and lr_at(50, short) == pytest.approx(0.0)
    assert lr_at(75, short) == pytest.approx(0.0)


def test_speedrun_preset_builds_a_muon_run():
    cfg = load_config("speedrun-cpu")
    cfg.model.vocab_size = 65
    model = GPT(cfg.model)
    opt = make_optimizer(model, cfg, torch.device("cpu"))
    assert type(opt) is (Muon if cfg.train.optimizer == "muon" else torch.optim.AdamW)
    idx = torch.randint(0, 65, (1, 8))
    _, loss = model(idx, idx)
    assert math.isfinite(loss.item())

