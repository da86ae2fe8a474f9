"""Hugging Face GPT-2 interop: import, export, round trip, fine-tuning, and every bad input.

transformers is a test dependency; nothing here touches the network. HF models are random
GPT2LMHeadModels with every parameter perturbed (so LayerNorms and biases are not trivial),
saved to a temporary directory.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import make_run, seed_cache
from safetensors.torch import load_file

from quillgpt import checkpoint as ckpt
from quillgpt.cli import main
from quillgpt.config import DROPOUT_SITES, Config, ModelConfig, TrainConfig, load_config
from quillgpt.data import cache_dir, prepare_training_data
from quillgpt.errors import QuillError
from quillgpt.hf import export_hf, import_hf, init_from, load_hf, tokenizer_to_hf_files
from quillgpt.model import GPT
from quillgpt.tokenizers import CharTokenizer
from quillgpt.tokenizers.bpe import ByteBPETokenizer

transformers = pytest.importorskip("transformers")
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel  # noqa: E402

SHAPES = [  # (n_layer, n_head, n_embd, n_positions)
    (1, 1, 16, 16),
    (2, 2, 32, 64),
    (3, 4, 48, 40),
]
TRICKY = "Hello  world!\n\n  héllo wörld 日本語 🤗 it's 1234<|endoftext|>tabs\tand   spaces \n"


@pytest.fixture(scope="module")
def bpe() -> ByteBPETokenizer:
    """A small byte-level BPE (vocab 320, GPT-2's pattern) trained on verse."""
    text = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n" * 20
    return ByteBPETokenizer.train(text, 320)


@pytest.fixture
def gpt2_ranks() -> Path:
    """GPT-2's ranks copied into this test's $QUILL_CACHE (no download)."""
    return seed_cache("gpt2.tiktoken")


def random_hf_model(n_layer: int, n_head: int, n_embd: int, n_positions: int, vocab_size: int,
                    seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd, n_positions=n_positions,
                     vocab_size=vocab_size, bos_token_id=vocab_size - 1, eos_token_id=vocab_size - 1)
    model = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def save_hf_dir(model: GPT2LMHeadModel, path: Path, tokenizer: ByteBPETokenizer | None) -> Path:
    model.save_pretrained(path)
    if tokenizer is not None:
        for name, text in tokenizer_to_hf_files(tokenizer, model.config.n_positions).items():
            (path / name).write_text(text, encoding="utf-8")
    return path


def same_tokens(a, b) -> bool:
    """Same byte-level BPE: tokens, specials and pre-tokenisation (names may differ)."""
    return (a.ranks, a.special_tokens, a.pattern) == (b.ranks, b.special_tokens, b.pattern)


def cli_error(capsys, argv: list[str]) -> str:
    """Run quill with bad input: exit status 2 and one line on stderr, returned."""
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("quill: error: ") and "\n" not in err and "Traceback" not in err, err
    return err


# --- import -----------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", SHAPES)
def test_import_gives_hf_logits(tmp_path, bpe, shape):
    hf = random_hf_model(*shape, vocab_size=bpe.vocab_size)
    src = save_hf_dir(hf, tmp_path / "hf", bpe)
    run_dir = import_hf(src, tmp_path / "run")
    run = ckpt.load_run(run_dir)
    assert same_tokens(run.tokenizer, bpe)
    m = run.config.model
    assert (m.n_layer, m.n_head, m.n_embd, m.block_size, m.vocab_size) == (*shape, bpe.vocab_size)
    x = torch.randint(0, bpe.vocab_size, (3, shape[3]), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(x).logits
        ours, _ = run.model(x)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)


def test_import_cli_and_pytorch_bin_with_old_key_names(tmp_path, bpe, capsys):
    """The hub's original layout: pytorch_model.bin, no `transformer.` prefix, mask buffers."""
    hf = random_hf_model(2, 2, 32, 32, bpe.vocab_size, seed=3)
    src = save_hf_dir(hf, tmp_path / "hf", bpe)
    (src / "model.safetensors").unlink()
    sd = {k.removeprefix("transformer."): v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    mask = torch.tril(torch.ones(32, 32)).view(1, 1, 32, 32)
    for i in range(2):
        sd[f"h.{i}.attn.bias"] = mask
        sd[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save(sd, src / "pytorch_model.bin")
    assert main(["import-hf", str(src), str(tmp_path / "run")]) == 0
    assert "imported" in capsys.readouterr().err
    run = ckpt.load_run(tmp_path / "run")
    x = torch.randint(0, bpe.vocab_size, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(run.model(x)[0], hf(x).logits, atol=1e-5, rtol=0)
    # the run samples like any other
    assert main(["sample", str(tmp_path / "run"), "--prompt", "To be", "--max-new-tokens", "5",
                 "--seed", "1"]) == 0
    assert capsys.readouterr().out.startswith("To be")


def test_import_without_tokenizer_files_needs_tokenizer_gpt2(tmp_path, gpt2_ranks, capsys):
    """A 50,257-token model need not use GPT-2's vocabulary: without tokenizer files the user says so."""
    hf = random_hf_model(1, 2, 8, 16, vocab_size=50257)
    src = tmp_path / "hf"
    hf.save_pretrained(src)
    err = cli_error(capsys, ["import-hf", str(src), str(tmp_path / "run")])
    assert "has no tokenizer" in err and "--tokenizer gpt2" in err
    assert not (tmp_path / "run").exists()
    assert main(["import-hf", str(src), str(tmp_path / "run"), "--tokenizer", "gpt2"]) == 0
    run = ckpt.load_run(tmp_path / "run")
    assert run.tokenizer.kind == "bpe" and run.tokenizer.vocab_size == 50257
    assert run.tokenizer.encode("Hello world") == [15496, 995]


@pytest.mark.parametrize("pattern_kwargs", [{}, {"within_words": False}])
def test_import_reads_tokenizer_json_as_transformers_saves_it(tmp_path, pattern_kwargs):
    """transformers' save_pretrained writes tokenizer.json and no vocab.json / merges.txt."""
    text = "the cat sat on the mat\nthe dog sat on the log\n" * 30
    tok = ByteBPETokenizer.train(text, 300, **pattern_kwargs)
    hf = random_hf_model(1, 2, 16, 32, tok.vocab_size, seed=5)
    exported = save_hf_dir(hf, tmp_path / "exported", tok)
    src = tmp_path / "saved"
    hf.save_pretrained(src)
    AutoTokenizer.from_pretrained(exported).save_pretrained(src)
    assert (src / "tokenizer.json").is_file() and not (src / "vocab.json").exists()
    run = ckpt.load_run(import_hf(src, tmp_path / "run"))
    assert same_tokens(run.tokenizer, tok)
    for sample in (text[:100], TRICKY):
        assert run.tokenizer.encode(sample) == tok.encode(sample)


def test_import_reads_only_files_inside_the_checkpoint(tmp_path, bpe, capsys):
    """A stranger's index naming ../ or an absolute path must not make import read it."""
    src = save_hf_dir(random_hf_model(1, 1, 16, 16, bpe.vocab_size), tmp_path / "hf", bpe)
    (src / "model.safetensors").rename(tmp_path / "outside.safetensors")
    index = src / "model.safetensors.index.json"
    for target in ("../outside.safetensors", str(tmp_path / "outside.safetensors")):
        index.write_text(json.dumps({"weight_map": {"transformer.wte.weight": target}}))
        err = cli_error(capsys, ["import-hf", str(src), str(tmp_path / "run")])
        assert "outside" in err and "only files inside" in err
    for bad in ("[1, 2]", '{"weight_map": [1]}', '{"weight_map": {"a": 5}}', "[" * 100_000):
        index.write_text(bad)
        err = cli_error(capsys, ["import-hf", str(src), str(tmp_path / "run")])
        assert str(index) in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("change", [
    {"n_embd": "wide"}, {"n_layer": 2.5}, {"n_head": [1]}, {"n_positions": None}, {"vocab_size": True},
    {"resid_pdrop": "x"}, {"n_inner": "x"}, {"layer_norm_epsilon": {}}, {"n_embd": 10**12},
    {"embd_pdrop": float("nan")},
])
def test_import_bad_config_values_are_one_line(tmp_path, bpe, capsys, change):
    src = save_hf_dir(random_hf_model(1, 1, 16, 16, bpe.vocab_size), tmp_path / "hf", bpe)
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(change)
    (src / "config.json").write_text(json.dumps(cfg))
    cli_error(capsys, ["import-hf", str(src), str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()


def test_import_refuses_pickled_code(tmp_path, bpe, capsys):
    src = save_hf_dir(random_hf_model(1, 1, 16, 16, bpe.vocab_size), tmp_path / "hf", bpe)
    (src / "model.safetensors").unlink()
    torch.save({"weights": torch.zeros(1), "payload": print}, src / "pytorch_model.bin")
    err = cli_error(capsys, ["import-hf", str(src), str(tmp_path / "run")])
    assert "weights_only=True" in err
    assert not (tmp_path / "run").exists()


def test_import_lists_missing_and_unexpected_keys(tmp_path, bpe, capsys):
    hf = random_hf_model(2, 2, 32, 32, bpe.vocab_size)
    src = save_hf_dir(hf, tmp_path / "hf", bpe)
    tensors = load_file(src / "model.safetensors")
    del tensors["transformer.h.1.mlp.c_fc.weight"]
    del tensors["transformer.ln_f.bias"]
    tensors["transformer.h.0.attn.q_norm.weight"] = torch.ones(32)
    from safetensors.torch import save_file

    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    err = cli_error(capsys, ["import-hf", str(src), str(tmp_path / "run")])
    assert "missing keys: transformer.h.1.mlp.c_fc.weight, transformer.ln_f.bias" in err
    assert "unexpected keys: transformer.h.0.attn.q_norm.weight" in err
    assert not (tmp_path / "run").exists()


def test_import_rejects_wrong_shapes(tmp_path, bpe, capsys):
    src = save_hf_dir(random_hf_model(2, 2, 32, 32, bpe.vocab_size), tmp_path / "hf", bpe)
    cfg = json.loads((src / "config.json").read_text())
    cfg["n_positions"] = 64
    (src / "config.json").write_text(json.dumps(cfg))
    err = cli_error(capsys, ["import-hf", str(src), str(tmp_path / "run")])
    assert "transformer.wpe.weight has shape (32, 32)" in err


@pytest.mark.parametrize("change, message", [
    ({"model_type": "llama"}, "model_type is 'llama'"),
    ({"activation_function": "relu"}, "activation_function 'relu'"),
    ({"n_inner": 100}, "n_inner 100"),
    ({"layer_norm_epsilon": 1e-6}, "layer_norm_epsilon 1e-06"),
    ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
    ({"tie_word_embeddings": False}, "tie_word_embeddings false"),
])
def test_import_refuses_unsupported_architectures(tmp_path, bpe, capsys, change, message):
    src = save_hf_dir(random_hf_model(1, 1, 16, 16, bpe.vocab_size), tmp_path / "hf", bpe)
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(change)
    (src / "config.json").write_text(json.dumps(cfg))
    err = cli_error(capsys, ["import-hf", str(src), str(tmp_path / "run")])
    assert message in err


def test_import_bad_sources(tmp_path, capsys, monkeypatch):
    # a hub id while offline: say how to pass a local directory
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    err = cli_error(capsys, ["import-hf", "gpt2", str(tmp_path / "run")])
    assert "cannot get 'gpt2' from the Hugging Face hub" in err and "local directory" in err
    assert "`hf download gpt2 --local-dir gpt2`" in err  # huggingface_hub's command today
    # a local path that does not exist, a directory without config.json, a plain file
    err = cli_error(capsys, ["import-hf", str(tmp_path / "nope"), str(tmp_path / "run")])
    assert "not found" in err
    (tmp_path / "empty").mkdir()
    err = cli_error(capsys, ["import-hf", str(tmp_path / "empty"), str(tmp_path / "run")])
    assert "no config.json" in err
    (tmp_path / "empty" / "config.json").write_text("{not json")
    err = cli_error(capsys, ["import-hf", str(tmp_path / "empty"), str(tmp_path / "run")])
    assert "cannot read" in err
    assert not (tmp_path / "run").exists()


def test_import_refuses_to_overwrite(tmp_path, bpe, capsys):
    src = save_hf_dir(random_hf_model(1, 1, 16, 16, bpe.vocab_size), tmp_path / "hf", bpe)
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    err = cli_error(capsys, ["import-hf", str(src), str(out)])
    assert "--overwrite" in err
    assert (out / "notes.txt").read_text() == "mine"
    assert main(["import-hf", str(src), str(out), "--overwrite"]) == 0


# --- export -----------------------------------------------------------------------------------

def test_export_loads_in_transformers_with_equal_logits(tmp_path, bpe, capsys):
    run_dir = make_run(tmp_path / "run", ModelConfig(block_size=48, n_layer=3, n_head=4, n_embd=64), bpe)
    assert main(["export-hf", str(run_dir), str(tmp_path / "hf")]) == 0
    names = {p.name for p in (tmp_path / "hf").iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "vocab.json", "merges.txt",
            "tokenizer_config.json"} <= names
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    run = ckpt.load_run(run_dir)
    x = torch.randint(0, bpe.vocab_size, (3, 48))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, run.model(x)[0], atol=1e-5, rtol=0)
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert hf_tok(TRICKY)["input_ids"] == bpe.encode(TRICKY)
    assert hf_tok.decode(bpe.encode(TRICKY)) == TRICKY
    assert hf_tok.eos_token == "<|endoftext|>"


def test_export_other_pretokenizer_pattern(tmp_path):
    """A BPE that merges across words (one chunk per line) still tokenizes identically in HF."""
    text = "the cat sat on the mat\nthe dog sat on the log\n" * 30
    tok = ByteBPETokenizer.train(text, 300, within_words=False)
    run_dir = make_run(tmp_path / "run", ModelConfig(block_size=16, n_layer=1, n_head=1, n_embd=16), tok)
    export_hf(run_dir, tmp_path / "hf")
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    for sample in (text[:200], TRICKY, "the cat sat on the log\n\nthe  mat"):
        assert hf_tok(sample)["input_ids"] == tok.encode(sample)


def test_export_gpt2_tokenizer_files(tmp_path, gpt2_ranks, shakespeare):
    from quillgpt.tokenizers.gpt2 import gpt2_tokenizer

    tok = gpt2_tokenizer()
    run_dir = make_run(tmp_path / "run", ModelConfig(block_size=16, n_layer=1, n_head=1, n_embd=8), tok)
    export_hf(run_dir, tmp_path / "hf")
    merges = (tmp_path / "hf" / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert merges[:7] == ["#version: 0.2", "Ġ t", "Ġ a", "h e", "i n", "r e", "o n"]
    assert len(merges) == 1 + 50000
    vocab = json.loads((tmp_path / "hf" / "vocab.json").read_text(encoding="utf-8"))
    assert vocab["<|endoftext|>"] == 50256 and vocab["Ġthe"] == 262
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = shakespeare.read_text(encoding="utf-8")[:50_000] + TRICKY
    assert hf_tok(text)["input_ids"] == tok.encode(text)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["eos_token_id"] == 50256 and config["n_positions"] == 16


def test_import_export_import_is_lossless(tmp_path, bpe):
    hf = random_hf_model(2, 2, 32, 32, bpe.vocab_size, seed=7)
    src = save_hf_dir(hf, tmp_path / "hf", bpe)
    first = import_hf(src, tmp_path / "a")
    export_hf(first, tmp_path / "exported")
    second = import_hf(tmp_path / "exported", tmp_path / "b")
    a, b = load_file(first / ckpt.MODEL_FILE), load_file(second / ckpt.MODEL_FILE)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert same_tokens(ckpt.load_run(first).tokenizer, ckpt.load_run(second).tokenizer)
    assert ckpt.read_run_config(first).model == ckpt.read_run_config(second).model
    # and the exported tensors are HF's own, bit for bit
    original, exported = load_file(src / "model.safetensors"), load_file(tmp_path / "exported" / "model.safetensors")
    for k, v in exported.items():
        assert torch.equal(v, original[k]), k


def test_export_without_biases_writes_zeros_with_equal_logits(tmp_path, bpe, capsys):
    """bias: false (the CPU preset's default) is GPT-2 with zero biases: train, then export works."""
    no_bias = make_run(tmp_path / "nobias", ModelConfig(block_size=16, n_layer=2, n_head=2, n_embd=16,
                                                        bias=False), bpe)
    assert main(["export-hf", str(no_bias), str(tmp_path / "out")]) == 0
    tensors = load_file(tmp_path / "out" / "model.safetensors")
    assert not tensors["transformer.h.1.attn.c_attn.bias"].any() and not tensors["transformer.ln_f.bias"].any()
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "out").eval()
    run = ckpt.load_run(no_bias)
    x = torch.randint(0, bpe.vocab_size, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, run.model(x)[0], atol=1e-5, rtol=0)
    # and back: an ordinary GPT-2 run with zero biases, the same logits
    back = ckpt.load_run(import_hf(tmp_path / "out", tmp_path / "back"))
    with torch.no_grad():
        torch.testing.assert_close(back.model(x)[0], run.model(x)[0], atol=1e-5, rtol=0)


def test_export_and_import_refuse_to_replace_their_input(tmp_path, bpe, capsys):
    run_dir = make_run(tmp_path / "run", ModelConfig(block_size=16, n_layer=1, n_head=1, n_embd=16), bpe)
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    for argv in (["export-hf", str(run_dir), str(run_dir), "--overwrite"],
                 ["export-hf", str(run_dir), str(run_dir / "hf"), "--overwrite"],
                 ["import-hf", str(run_dir), str(run_dir), "--overwrite"]):
        err = cli_error(capsys, argv)
        assert "input" in err
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} == before


def test_export_refuses_what_gpt2_cannot_hold(tmp_path, bpe, capsys):
    char = make_run(tmp_path / "char", ModelConfig(block_size=16, n_layer=1, n_head=1, n_embd=16),
                    CharTokenizer.train("hello world"))
    err = cli_error(capsys, ["export-hf", str(char), str(tmp_path / "out")])
    assert "byte-level BPE" in err and "'char'" in err
    cfg = ckpt.read_run_config(char)
    cfg.model.kind = "bigram"
    ckpt.save_config(cfg, char)
    err = cli_error(capsys, ["export-hf", str(char), str(tmp_path / "out")])
    assert "kind 'bigram'" in err
    assert not (tmp_path / "out").exists()
    err = cli_error(capsys, ["export-hf", str(tmp_path / "missing"), str(tmp_path / "out")])
    assert "not found" in err


def test_export_refuses_to_overwrite(tmp_path, bpe, capsys):
    run_dir = make_run(tmp_path / "run", ModelConfig(block_size=16, n_layer=1, n_head=1, n_embd=16), bpe)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    err = cli_error(capsys, ["export-hf", str(run_dir), str(tmp_path / "out")])
    assert "--overwrite" in err
    assert main(["export-hf", str(run_dir), str(tmp_path / "out"), "--overwrite"]) == 0
    assert (tmp_path / "out" / "config.json").is_file()


# --- fine-tuning ------------------------------------------------------------------------------

def test_init_from_adjusts_config(tmp_path, bpe):
    src = save_hf_dir(random_hf_model(2, 2, 32, 64, bpe.vocab_size), tmp_path / "hf", bpe)
    cfg = Config(model=ModelConfig(block_size=256, n_layer=6, dropout=0.1, mlp_dropout=0.3), train=TrainConfig())
    tokenizer, state = init_from(str(src), cfg)
    assert same_tokens(tokenizer, bpe)
    m = cfg.model
    assert (m.n_layer, m.n_head, m.n_embd, m.vocab_size) == (2, 2, 32, bpe.vocab_size)
    assert m.block_size == 64 and m.dropout == 0.1  # cropped to the source; dropout is the user's
    assert m.mlp_dropout == 0.3 and m.embd_dropout is None  # so is every dropout site
    assert cfg.train.learning_rate == 3e-5 and cfg.train.min_lr == 3e-6
    # the hub id / HF directory was imported once into the cache, and is reused
    assert Path(cfg.train.tokenizer).parent.parent == cache_dir() / "hf"
    cfg2 = Config(model=ModelConfig(block_size=32), train=TrainConfig(learning_rate=1e-4))
    _, state2 = init_from(str(src), cfg2)
    assert cfg2.model.block_size == 32 and cfg2.train.learning_rate == 1e-4
    for given in ({"learning_rate": 1e-3}, {"lr": 1e-3, "min_lr": 1e-4}):  # given: kept, even at the default
        cfg_given = load_config(None, given)
        init_from(str(src), cfg_given)
        assert (cfg_given.train.learning_rate, cfg_given.train.min_lr) == (1e-3, 1e-4)
    cfg_min = load_config(None, {"min_lr": 1e-4})  # min_lr given alone: the learning rate still drops
    init_from(str(src), cfg_min)
    assert (cfg_min.train.learning_rate, cfg_min.train.min_lr) == (3e-5, 1e-4)
    assert state2["transformer.wpe.weight"].shape == (32, 32)
    model = GPT(cfg2.model)
    model.load_state_dict(state2)
    torch.testing.assert_close(model.transformer.wpe.weight, state["transformer.wpe.weight"][:32])
    # changed files in the HF directory are imported afresh, not taken from the stale cache
    save_hf_dir(random_hf_model(2, 2, 32, 64, bpe.vocab_size, seed=9), src, bpe)
    _, state3 = init_from(str(src), Config(model=ModelConfig(block_size=32)))
    assert not torch.equal(state3["transformer.wte.weight"], state["transformer.wte.weight"])


def test_finetune_from_imported_run_lowers_loss(tmp_path, bpe):
    """init_from + prepare_training_data (which reuses the source tokenizer) + AdamW steps."""
    src = save_hf_dir(random_hf_model(2, 2, 32, 64, bpe.vocab_size, seed=5), tmp_path / "hf", bpe)
    run_dir = import_hf(src, tmp_path / "run")
    new_text = tmp_path / "new.txt"
    new_text.write_text("Whether 'tis nobler in the mind to suffer the slings and arrows\n" * 100)
    cfg = Config(model=ModelConfig(block_size=32),
                 train=TrainConfig(data=str(new_text), learning_rate=3e-3))
    tokenizer, state = init_from(str(run_dir), cfg)
    assert cfg.train.tokenizer == str(run_dir / ckpt.TOKENIZER_FILE)
    tok2, splits = prepare_training_data(cfg)
    assert tok2 == tokenizer and same_tokens(tokenizer, bpe)
    model = GPT(cfg.model)
    model.load_state_dict(state)
    x = torch.from_numpy(splits.val[: 4 * 33].astype("int64")).view(4, 33)

    def val_loss() -> float:
        model.eval()
        with torch.no_grad():
            return model(x[:, :-1], x[:, 1:])[1].item()

    before = val_loss()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.learning_rate)
    train = torch.from_numpy(splits.train.astype("int64"))
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(30):
        starts = torch.randint(len(train) - 33, (8,), generator=g)
        batch = torch.stack([train[s : s + 33] for s in starts])
        _, loss = model(batch[:, :-1], batch[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = val_loss()
    assert after < before - 0.5, (before, after)


def test_init_from_bad_spec(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    with pytest.raises(QuillError, match="local directory"):
        init_from("gpt2-medium", Config())
    (tmp_path / "junk").mkdir()
    with pytest.raises(QuillError, match="not a run directory"):
        init_from(str(tmp_path / "junk"), Config())


def test_load_hf_for_python_users(tmp_path, bpe):
    hf = random_hf_model(1, 2, 16, 16, bpe.vocab_size)
    loaded = load_hf(save_hf_dir(hf, tmp_path / "hf", bpe))
    assert same_tokens(loaded.tokenizer, bpe) and not loaded.model.training
    assert loaded.model.lm_head.weight is loaded.model.transformer.wte.weight  # still tied


def test_quill_train_init_from(tmp_path, bpe):
    """`quill train --init-from` fine-tunes an HF checkpoint with its own tokenizer and shape."""
    import csv

    src = save_hf_dir(random_hf_model(2, 2, 32, 64, bpe.vocab_size, seed=5), tmp_path / "hf", bpe)
    data = tmp_path / "new.txt"
    data.write_text("Whether 'tis nobler in the mind to suffer the slings and arrows\n" * 100)
    assert main(["train", "--init-from", str(src), "--data", str(data), "--out", str(tmp_path / "ft"),
                 "--max-iters", "30", "--eval-interval", "30", "--eval-iters", "2", "--batch-size", "8",
                 "--block-size", "32", "--learning-rate", "3e-3", "--sample-tokens", "0",
                 "--no-progress", "--device", "cpu"]) == 0
    run = ckpt.load_run(tmp_path / "ft")
    assert same_tokens(run.tokenizer, bpe) and run.config.model.n_embd == 32
    rows = [r for r in csv.DictReader(open(tmp_path / "ft" / "metrics.csv")) if r["val_loss"]]
    assert float(rows[-1]["val_loss"]) < float(rows[0]["val_loss"]) - 0.5


# --- dropout in config.json -------------------------------------------------------------------

def test_export_dropout_fields(tmp_path, bpe, capsys):
    """GPT-2's three dropout fields carry our rates where they can; a layout they cannot express
    is said so on stderr, kept exactly under quill_dropout, and the export still loads."""
    shape = dict(block_size=16, n_layer=1, n_head=1, n_embd=16)
    run_dir = make_run(tmp_path / "run", ModelConfig(**shape, dropout=0.2, attn_dropout=0.05), bpe)
    assert main(["export-hf", str(run_dir), str(tmp_path / "hf")]) == 0
    assert "warning" not in capsys.readouterr().err
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (cfg["embd_pdrop"], cfg["attn_pdrop"], cfg["resid_pdrop"]) == (0.2, 0.05, 0.2)
    assert "quill_dropout" not in cfg
    hf = GPT2Config.from_pretrained(tmp_path / "hf")
    assert (hf.embd_pdrop, hf.attn_pdrop, hf.resid_pdrop) == (0.2, 0.05, 0.2)

    layout = dict(embd_dropout=0.1, attn_dropout=0.0, attn_out_dropout=0.2, mlp_dropout=0.1, resid_dropout=0.1)
    run_dir = make_run(tmp_path / "run2", ModelConfig(**shape, **layout), bpe)
    assert main(["export-hf", str(run_dir), str(tmp_path / "hf2")]) == 0
    err = capsys.readouterr().err
    assert "attn_out_dropout 0.2 and mlp_dropout 0.1 differ" in err and "resid_dropout 0.1" in err
    cfg = json.loads((tmp_path / "hf2" / "config.json").read_text())
    assert (cfg["embd_pdrop"], cfg["attn_pdrop"], cfg["resid_pdrop"]) == (0.1, 0.0, 0.2)
    assert cfg["quill_dropout"] == layout
    hf = GPT2Config.from_pretrained(tmp_path / "hf2")
    assert hf.quill_dropout == layout
    GPT2LMHeadModel.from_pretrained(tmp_path / "hf2")


def test_import_reads_gpt2_dropout_fields(tmp_path, bpe):
    model = random_hf_model(1, 2, 32, 32, bpe.vocab_size)
    model.config.embd_pdrop, model.config.attn_pdrop, model.config.resid_pdrop = 0.05, 0.0, 0.15
    hf = load_hf(save_hf_dir(model, tmp_path / "hf", bpe))
    m = hf.config
    assert [m.dropout_at(s) for s in DROPOUT_SITES] == [0.05, 0.0, 0.15, 0.15, 0.0]
    # an imported run starts without dropout, ready for fine-tuning
    run = ckpt.load_run(import_hf(tmp_path / "hf", tmp_path / "run"))
    assert [run.config.model.dropout_at(s) for s in DROPOUT_SITES] == [0.0] * 5
