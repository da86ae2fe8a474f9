"""Inference precision: bfloat16 and int8 weights against float32, from Python and the CLI.

Tolerances (stated here, measured on small random and trained models):
- int8 quantisation: every weight within half a step (scale / 2) of the original;
- logits of a random model, relative to its largest fp32 logit: bf16 within 2%, int8 within 3%;
- perplexity of a trained model: bf16 within 0.5% of fp32, int8 within 2% (the issue's targets).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import make_run
from torch.nn import functional as F

from quillgpt import inference
from quillgpt.checkpoint import load_run
from quillgpt.cli import main
from quillgpt.config import ModelConfig
from quillgpt.engine import Engine, Request
from quillgpt.errors import QuillError
from quillgpt.evaluate import evaluate_text
from quillgpt.generate import generate, generate_ids
from quillgpt.inference import (
    Int8Embedding,
    Int8Linear,
    activation_dtype,
    dequantize_int8,
    quantize_int8,
    resolve_inference_dtype,
    set_inference_dtype,
)
from quillgpt.model import GPT, count_params
from quillgpt.optim import native_bfloat16
from quillgpt.tokenizers.char import CharTokenizer

CHARS = "\n !',.:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
LOGIT_TOL = {"bfloat16": 0.02, "int8": 0.03}  # of the largest |fp32 logit|
NATIVE = native_bfloat16(torch.device("cpu"))


def random_model(seed: int = 0, **kw) -> GPT:
    torch.manual_seed(seed)
    values = dict(vocab_size=len(CHARS), block_size=32, n_layer=2, n_head=4, n_embd=64, **kw)
    model = GPT(ModelConfig(**values)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def converted(model: GPT, dtype: str) -> GPT:
    other = copy.deepcopy(model)
    assert set_inference_dtype(other, dtype) == dtype
    return other


# --- int8 quantisation --------------------------------------------------------------------------

def test_quantize_int8_error_is_at_most_half_a_step():
    torch.manual_seed(0)
    w = torch.randn(48, 96) * torch.logspace(-3, 1, 48)[:, None]  # rows of very different sizes
    w[5] = 0.0  # an all-zero row
    w[7, 3] = 50.0  # an outlier sets its row's scale
    q, s = quantize_int8(w)
    assert q.dtype == torch.int8 and s.shape == (48,) and q.abs().max() <= 127
    err = (dequantize_int8(q, s) - w).abs()
    assert (err <= s[:, None] / 2 + 1e-7 * w.abs()).all()
    assert err[5].max() == 0 and (q.abs().amax(dim=1)[torch.arange(48) != 5] == 127).all()


@pytest.mark.parametrize("act", [torch.float32, torch.bfloat16])
def test_int8_linear_and_embedding_equal_their_dequantised_weights(act):
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48)
    q, s = quantize_int8(lin.weight)
    layer = Int8Linear(torch.nn.Parameter(q, False), s.to(act), torch.nn.Parameter(lin.bias.detach().to(act), False))
    tol = 2e-2 if act == torch.bfloat16 else 1e-4
    for rows in (5, inference.INT8_FUSED_MAX_ROWS):  # the fused kernel, then dequantise + GEMM
        x = torch.randn(3, rows, 64, dtype=act)
        want = F.linear(x.float(), dequantize_int8(q, s), lin.bias.detach())
        got = layer(x)
        assert got.dtype == act and got.shape == (3, rows, 48)
        torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol)
    emb = Int8Embedding(torch.nn.Parameter(q, False), s.to(act))
    idx = torch.tensor([[0, 47, 3], [5, 5, 1]])
    torch.testing.assert_close(emb(idx).float(), dequantize_int8(q, s)[idx], rtol=tol, atol=tol)


# --- whole models -------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["bfloat16", "int8"])
@pytest.mark.parametrize("options", [{}, {"rope": True, "qk_norm": True, "norm": "rmsnorm", "bias": False,
                                          "tie_embeddings": False, "logit_softcap": 30.0}])
def test_logits_close_to_float32(dtype, options):
    model = random_model(**options)
    idx = torch.randint(0, len(CHARS), (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(idx)[0]
        got = converted(model, dtype)(idx)[0].float()
    err = (got - want).abs().max() / want.abs().max()
    assert err < LOGIT_TOL[dtype], f"{dtype}: {err:.4f} of the largest logit"
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.9


def test_int8_model_layout():
    """Every matrix is int8; the tied LM head and the token embedding share one table; the
    parameter count is unchanged; activations (and so the KV cache) are bf16 where it is native."""
    model = random_model()
    before = count_params(model)
    q = converted(model, "int8")
    assert isinstance(q.lm_head, Int8Linear) and isinstance(q.transformer.wte, Int8Embedding)
    assert q.lm_head.weight is q.transformer.wte.weight and q.lm_head.weight.dtype == torch.int8
    assert all(isinstance(m, (Int8Linear, Int8Embedding)) for m in q.modules()
               if isinstance(m, (torch.nn.Linear, torch.nn.Embedding)) or hasattr(m, "scales"))
    assert count_params(q) == before
    act = torch.bfloat16 if NATIVE else torch.float32
    assert activation_dtype(q) == act and q.transformer.ln_f.weight.dtype == act


def test_bfloat16_model_layout():
    """bf16 everywhere; on CPUs with native bf16 every Linear is oneDNN-packed, the tied head as a
    packed copy (a buffer), so the parameter count is unchanged."""
    model = random_model()
    before = count_params(model)
    b = converted(model, "bfloat16")
    assert activation_dtype(b) == torch.bfloat16 and b.transformer.wte.weight.dtype == torch.bfloat16
    assert count_params(b) == before
    linears = [m for m in b.modules() if isinstance(m, (torch.nn.Linear, inference.PackedLinear))]
    assert len(linears) == 2 * 4 + 1
    if inference.can_pack(torch.device("cpu")):
        assert all(isinstance(m, inference.PackedLinear) for m in linears)
        assert "weight" in dict(b.lm_head.named_buffers())
    else:
        assert all(isinstance(m, torch.nn.Linear) for m in linears)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8"])
def test_kv_cache_in_the_activation_dtype_equals_recompute(dtype):
    model = converted(random_model(), dtype) if dtype != "float32" else random_model()
    engine = Engine(model, CharTokenizer(list(CHARS)))
    for prompt in ([1, 2, 3], [4, 5, 6, 7, 8]):
        engine.add(Request(prompt))
    engine.step()
    assert engine.cache.k.dtype == activation_dtype(model)
    want = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(dtype, engine.cache.k.dtype)
    assert activation_dtype(model) == want
    prompt = torch.tensor([[3, 1, 4, 1, 5]])
    cached = generate_ids(model, prompt, 40, temperature=0)
    recomputed = generate_ids(model, prompt, 40, temperature=0, use_cache=False)
    assert cached.tolist() == recomputed.tolist()


def test_auto_and_bad_dtypes(monkeypatch):
    assert resolve_inference_dtype("auto", "cpu") == ("bfloat16" if NATIVE else "float32")
    for name in ("float32", "bfloat16", "int8"):
        assert resolve_inference_dtype(name, "cpu") == name
    with pytest.raises(QuillError, match="dtype must be one of float32, bfloat16, int8, auto"):
        resolve_inference_dtype("fp8", "cpu")
    model = random_model()
    assert set_inference_dtype(model, "float32") == "float32" and activation_dtype(model) == torch.float32


def test_without_native_bf16_the_conversion_says_so(monkeypatch):
    monkeypatch.setattr(inference, "native_bfloat16", lambda device: False)
    assert resolve_inference_dtype("auto", "cpu") == "float32"
    said: list[str] = []
    set_inference_dtype(random_model(), "bfloat16", said.append)
    assert len(said) == 1 and "emulated and slower than float32" in said[0]
    said.clear()
    q = random_model()
    set_inference_dtype(q, "int8", said.append)
    assert activation_dtype(q) == torch.float32 and "float32 activations" in said[0]
    idx = torch.randint(0, len(CHARS), (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(q(idx)[0], random_model()(idx)[0], rtol=0.05, atol=0.05)


# --- runs: Python and the CLI -------------------------------------------------------------------

@pytest.fixture(scope="module")
def tok() -> CharTokenizer:
    return CharTokenizer(list(CHARS))


@pytest.fixture
def run_dir(tmp_path, tok):
    return make_run(tmp_path / "run", ModelConfig(block_size=32, n_layer=2, n_head=2, n_embd=32), tok)


@pytest.mark.parametrize("dtype", ["bfloat16", "int8", "auto"])
def test_load_run_with_dtype_generates(run_dir, dtype):
    run = load_run(run_dir, dtype=dtype)
    want = {"bfloat16": torch.bfloat16, "auto": torch.bfloat16 if NATIVE else torch.float32,
            "int8": torch.bfloat16 if NATIVE else torch.float32}[dtype]
    assert activation_dtype(run.model) == want
    text = generate(run.model, run.tokenizer, "ROMEO:", max_new_tokens=40, temperature=0.8, seed=1)
    assert len(text) == 40 and set(text) <= set(CHARS)
    assert text == generate(run.model, run.tokenizer, "ROMEO:", max_new_tokens=40, temperature=0.8, seed=1)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8", "auto"])
def test_cli_sample_with_dtype(run_dir, capsys, dtype):
    assert main(["sample", str(run_dir), "--prompt", "ROMEO:", "--max-new-tokens", "30", "--seed", "3",
                 "--dtype", dtype, "--num-samples", "2"]) == 0
    out = capsys.readouterr().out
    assert out.count("ROMEO:") == 2 and len(out) > 60


@pytest.mark.parametrize("argv", [["sample", "RUN"], ["eval", "RUN", "--data", "TEXT"], ["serve", "RUN"]])
def test_cli_bad_dtype_is_exit_2(run_dir, tmp_path, capsys, argv):
    text = tmp_path / "t.txt"
    text.write_text("ROMEO: hello\n" * 20)
    argv = [str(run_dir) if a == "RUN" else str(text) if a == "TEXT" else a for a in argv]
    assert main([*argv, "--dtype", "float8"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("quill: error: dtype must be one of") and err.count("\n") == 1


def test_serve_app_with_dtype(run_dir):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from quillgpt.serve import create_app

    with TestClient(create_app(run_dir, dtype="int8"), base_url="http://localhost:8000") as client:
        r = client.post("/v1/completions", json={"prompt": "ROMEO:", "max_tokens": 12, "temperature": 0})
        assert r.status_code == 200
        assert len(r.json()["choices"][0]["text"]) == 12
    want = generate(load_run(run_dir, dtype="int8").model, load_run(run_dir).tokenizer, "ROMEO:", 12, temperature=0)
    assert r.json()["choices"][0]["text"] == want


# --- accuracy on a trained model ----------------------------------------------------------------

@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A small char model trained for 200 steps on the first 0.3 MB of tiny-shakespeare."""
    from conftest import data_file

    data = data_file("tinyshakespeare.txt")
    out = tmp_path_factory.mktemp("trained") / "run"
    assert main(["train", "--config", "shakespeare-char-cpu", "--data", str(data), "--out", str(out),
                 "--max-iters", "200", "--n-layer", "2", "--n-embd", "64", "--learning-rate", "3e-3",
                 "--warmup-iters", "10", "--eval-iters", "1", "--eval-interval", "200", "--sample-tokens", "0",
                 "--no-progress", "--max-megabytes", "0.3"]) == 0
    return out, data


@pytest.mark.slow
def test_eval_perplexity_within_the_targets(trained_run, capsys):
    run_dir, data = trained_run
    text = data.read_text(encoding="utf-8")[-30_000:]
    fp32 = evaluate_text(load_run(run_dir).model, load_run(run_dir).tokenizer, text, progress=False)
    assert fp32.perplexity < 15  # trained: far below the uniform 62 (its vocabulary)
    for dtype, tol in (("bfloat16", 0.005), ("int8", 0.02)):
        run = load_run(run_dir, dtype=dtype)
        got = evaluate_text(run.model, run.tokenizer, text, progress=False)
        assert abs(got.perplexity / fp32.perplexity - 1) < tol, (dtype, got.perplexity, fp32.perplexity)
    # and through the CLI
    (run_dir.parent / "val.txt").write_text(text, encoding="utf-8")
    assert main(["eval", str(run_dir), "--data", str(run_dir.parent / "val.txt"), "--dtype", "int8",
                 "--json", "--no-progress"]) == 0
    cli = json.loads(capsys.readouterr().out)
    assert abs(cli["perplexity"] / fp32.perplexity - 1) < 0.02
