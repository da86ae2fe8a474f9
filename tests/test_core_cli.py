"""Core end to end: config, training, run directories, sampling, and every bad input."""

from __future__ import annotations

import csv
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from quillgpt.checkpoint import load_run
from quillgpt.cli import main
from quillgpt.config import load_config
from quillgpt.errors import QuillError
from quillgpt.generate import generate
from quillgpt.train import Trainer, lr_at

TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "16", "--batch-size", "4",
        "--eval-iters", "2", "--eval-interval", "10", "--log-interval", "5", "--warmup-iters", "2",
        "--no-progress"]


def quill(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run the real `quill` entry point in a subprocess."""
    return subprocess.run([sys.executable, "-m", "quillgpt", *args], capture_output=True, text=True,
                          cwd=cwd)


def tiny_cfg(data: Path, out: Path | None, **kw):
    overrides = dict(data=str(data), out=str(out) if out else None, n_layer=1, n_head=2, n_embd=16,
                     block_size=16, batch_size=4, max_iters=20, eval_iters=2, eval_interval=10,
                     log_interval=5, warmup_iters=2, sample_tokens=20)
    overrides.update(kw)
    return load_config(None, overrides)


# --- config -------------------------------------------------------------------------------------

def test_presets_load_with_expected_values():
    cpu = load_config("shakespeare-char-cpu")
    assert (cpu.model.n_layer, cpu.model.n_head, cpu.model.n_embd, cpu.model.block_size) == (4, 4, 128, 64)
    assert (cpu.train.batch_size, cpu.train.max_iters, cpu.train.eval_iters) == (12, 2000, 20)
    assert cpu.model.dropout == 0.0 and cpu.train.learning_rate == 1e-3 and cpu.train.min_lr == 1e-4
    gpu = load_config("shakespeare-char")
    assert (gpu.model.n_layer, gpu.model.n_embd, gpu.model.block_size, gpu.train.batch_size) == (6, 384, 256, 64)
    assert gpu.model.dropout == 0.2 and gpu.train.max_iters == 5000 and gpu.train.beta2 == 0.99
    tshark = load_config("tshark")
    assert (tshark.model.n_layer, tshark.model.n_head, tshark.model.n_embd) == (2, 4, 64)
    assert tshark.train.learning_rate == 3e-4 and tshark.train.max_iters == 1000
    big = load_config("gpt2-124m")
    assert (big.model.n_layer, big.model.n_embd, big.model.block_size) == (12, 768, 1024)


def test_overrides_aliases_and_flat_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("steps: 7\nn_ctxt: 32\nmodel:\n  n_layer: 3\n")
    cfg = load_config(path, {"learning_rate": "3e-4", "bias": "false"})
    assert cfg.train.max_iters == 7 and cfg.model.block_size == 32 and cfg.model.n_layer == 3
    assert cfg.train.learning_rate == 3e-4 and cfg.model.bias is False


def test_schedule_warmup_then_cosine():
    cfg = load_config(None, {"learning_rate": 1.0, "min_lr": 0.1, "warmup_iters": 10, "max_iters": 110})
    assert lr_at(0, cfg) == pytest.approx(1 / 11)
    assert lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.55)
    assert lr_at(110, cfg) == pytest.approx(0.1)
    assert lr_at(500, cfg) == pytest.approx(0.1)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"n_embd": 30, "n_head": 4}, "n_embd (30) must be divisible by n_head (4)"),
        ({"n_layr": 2}, "did you mean n_layer"),
        ({"block_size": "big"}, "block_size must be an integer"),
        ({"dropout": 1.5}, "dropout must be in"),
        ({"dtype": "float8"}, "dtype must be"),
    ],
)
def test_bad_config_values(overrides, message):
    with pytest.raises(QuillError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(None, overrides)


def test_unknown_preset_and_bad_yaml(tmp_path):
    with pytest.raises(QuillError, match="unknown preset 'shakespeare-chr'.*did you mean"):
        load_config("shakespeare-chr")
    bad = tmp_path / "bad.yaml"
    bad.write_text("n_layer: [1,\n")
    with pytest.raises(QuillError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(QuillError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


# --- training and sampling from Python ------------------------------------------------------------

def test_train_writes_a_complete_run(small_text, tmp_path):
    out = tmp_path / "run"
    result = Trainer(tiny_cfg(small_text, out), progress=False, log=lambda m: None).run()
    assert result.run_dir == out
    for name in ("config.yaml", "tokenizer.json", "model.safetensors", "best.safetensors", "metrics.csv"):
        assert (out / name).is_file(), name
    assert not list(out.glob(".*.tmp"))
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["model"]["vocab_size"] == len(set(small_text.read_text()))
    assert saved["train"]["max_iters"] == 20 and "weight_decay" in saved["train"]
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert list(rows[0]) == ["step", "elapsed_s", "lr", "train_loss", "val_loss", "tokens_per_s"]
    steps = [int(r["step"]) for r in rows]
    assert steps == [0, 5, 10, 15, 20]
    assert [r["step"] for r in rows if r["val_loss"]] == ["0", "10", "20"]
    assert float(rows[-1]["val_loss"]) == pytest.approx(result.val_loss, abs=1e-5)
    assert result.losses[-1] < result.losses[0]
    assert len(result.sample) > 0

    run = load_run(out)
    idx = torch.randint(0, run.config.model.vocab_size, (1, 16))
    torch.manual_seed(0)
    a = generate(run.model, run.tokenizer, "To be", max_new_tokens=30, seed=3)
    b = generate(load_run(out).model, run.tokenizer, "To be", max_new_tokens=30, seed=3)
    assert a == b and len(a) == 30
    assert run.model(idx)[0].shape == (1, 16, run.config.model.vocab_size)


def test_same_seed_same_losses_and_sample(small_text):
    a = Trainer(tiny_cfg(small_text, None), save=False, progress=False, log=lambda m: None).run()
    b = Trainer(tiny_cfg(small_text, None), save=False, progress=False, log=lambda m: None).run()
    c = Trainer(tiny_cfg(small_text, None, seed=7), save=False, progress=False, log=lambda m: None).run()
    assert a.losses == b.losses
    assert a.sample == b.sample
    assert a.losses != c.losses


def test_loss_falls_with_training(small_text):
    result = Trainer(tiny_cfg(small_text, None, max_iters=150, learning_rate=3e-3, n_embd=32),
                     save=False, progress=False, log=lambda m: None).run()
    assert result.val_loss < 2.4  # from ~ln(30) = 3.4


def test_max_megabytes_and_cached_shakespeare(tmp_path, monkeypatch, shakespeare):
    """No --data reads tiny-shakespeare from the cache without touching the network."""
    import shutil

    import quillgpt.data as data

    cache = tmp_path / "cache"
    cache.mkdir()
    shutil.copy(shakespeare, cache / "tinyshakespeare.txt")
    monkeypatch.setenv("QUILL_CACHE", str(cache))
    monkeypatch.setattr(data.urllib.request, "urlopen", lambda *a, **k: pytest.fail("network used"))
    cfg = load_config(None, dict(max_megabytes=0.05, max_iters=0, block_size=16, n_layer=1, n_head=1,
                                 n_embd=8, eval_iters=1, sample_tokens=0))
    tokenizer, splits = data.prepare_training_data(cfg)
    assert len(splits.train) + len(splits.val) == 50_000
    assert tokenizer.decode(splits.train[:9].tolist()) == "First Cit"


def test_offline_download_says_how_to_pass_a_file(monkeypatch):
    import urllib.error

    import quillgpt.data as data

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(data.urllib.request, "urlopen", offline)
    with pytest.raises(QuillError, match="--data FILE"):
        data.shakespeare_path()


# --- the command line -------------------------------------------------------------------------

def test_cli_train_then_sample(small_text, tmp_path):
    out = tmp_path / "mine"
    r = quill("train", "--data", str(small_text), "--out", str(out), "--max-iters", "30", *TINY)
    assert r.returncode == 0, r.stderr
    assert "number of parameters" in r.stderr and "val loss" in r.stderr
    assert r.stdout.strip()  # the sample
    r1 = quill("sample", str(out), "--prompt", "To be", "--max-new-tokens", "40", "--seed", "0")
    r2 = quill("sample", str(out), "--prompt", "To be", "--max-new-tokens", "40", "--seed", "0")
    assert r1.returncode == 0, r1.stderr
    assert r1.stdout == r2.stdout
    assert r1.stdout.startswith("To be") and len(r1.stdout.rstrip("\n")) == len("To be") + 40


def test_cli_train_with_the_seeds_names(small_text, tmp_path, capsys):
    """The names the seed projects use, as the README lists them, train with their meanings."""
    out = tmp_path / "seeds"
    assert main(["train", "--data", str(small_text), "--out", str(out), "--steps", "20", "--lr", "3e-4",
                 "--n-ctxt", "64", "--d-model", "64", "--num-layers", "2", "--num-heads", "2", "--batch-size", "4",
                 "--eval-iters", "1", "--eval-interval", "10", "--sample-tokens", "0", "--no-progress",
                 "--device", "cpu"]) == 0
    assert "done: 20 steps" in capsys.readouterr().err
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert (saved["train"]["max_iters"], saved["train"]["learning_rate"]) == (20, 3e-4)
    m = saved["model"]
    assert (m["block_size"], m["n_embd"], m["n_layer"], m["n_head"]) == (64, 64, 2, 2)
    code, err = run_main(["train", "--data", str(small_text), "--lr-dec", "5", "--no-save"], capsys)
    assert_one_line_error(code, err, "unknown config key 'lr_dec'")


def test_cli_train_without_config_on_a_cpu_uses_the_cpu_recipe(small_text, tmp_path, capsys):
    """The defaults are nanoGPT's GPU recipe in shape (10.7M parameters, 200-batch evaluations: hours on
    2 cores); `quill train --data FILE` on a CPU starts from shakespeare-char-cpu instead."""
    from quillgpt.config import load_config
    from quillgpt.train import default_preset

    short = ["--max-iters", "2", "--eval-interval", "2", "--eval-iters", "1", "--sample-tokens", "0",
             "--no-progress", "--device", "cpu"]
    assert main(["train", "--data", str(small_text), "--out", str(tmp_path / "a"), *short]) == 0
    err = capsys.readouterr().err
    assert "no --config on a CPU: the shakespeare-char-cpu preset" in err
    cpu = load_config("shakespeare-char-cpu")
    saved = yaml.safe_load((tmp_path / "a" / "config.yaml").read_text())
    for key in ("n_layer", "n_head", "n_embd", "block_size", "bias"):
        assert saved["model"][key] == getattr(cpu.model, key), key
    assert saved["train"]["batch_size"] == cpu.train.batch_size
    # a preset or a file given, or fine-tuning (its own model), and nothing is chosen
    assert main(["train", "--config", "tshark", "--data", str(small_text), "--out", str(tmp_path / "b"),
                 *short]) == 0
    assert "no --config" not in capsys.readouterr().err
    assert yaml.safe_load((tmp_path / "b" / "config.yaml").read_text())["model"]["n_embd"] == 64
    assert default_preset({"device": "cpu", "init_from": "gpt2"}) is None
    assert default_preset({"device": "cpu"}) == "shakespeare-char-cpu"


def run_main(args: list[str], capsys) -> tuple[int, str]:
    code = main(args)
    err = capsys.readouterr().err
    return code, err


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("quill: error:")
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def test_bad_data_files(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    binary = tmp_path / "blob.bin"
    binary.write_bytes(b"abc\x00\x01\x02")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes(b"hello caf\xe9 world")
    short = tmp_path / "short.txt"
    short.write_text("tiny text")
    empty_dir = tmp_path / "nothing"
    empty_dir.mkdir()
    cases = [
        (tmp_path / "missing.txt", ["data file not found"]),
        (empty, ["is empty"]),
        (binary, ["looks binary", "offset 3"]),
        (latin1, ["not UTF-8", "0xe9", "offset 9"]),
        (short, ["too short", "block_size"]),
        (empty_dir, ["has no files"]),
    ]
    for path, fragments in cases:
        code, err = run_main(["train", "--data", str(path), "--no-save", *TINY], capsys)
        assert_one_line_error(code, err, *fragments)


def test_bad_config_on_the_command_line(small_text, capsys):
    code, err = run_main(["train", "--data", str(small_text), "--n-embd", "30", "--n-head", "4",
                          "--no-save"], capsys)
    assert_one_line_error(code, err, "divisible")
    code, err = run_main(["train", "--data", str(small_text), "--n-layers", "2"], capsys)
    assert_one_line_error(code, err, "unknown config key 'n_layers'", "n_layer")
    code, err = run_main(["train", "--config", "no-such-preset"], capsys)
    assert_one_line_error(code, err, "unknown preset")
    code, err = run_main(["train", "--max-iters", "many"], capsys)
    assert_one_line_error(code, err, "max_iters must be an integer")


def test_existing_run_is_not_overwritten(small_text, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--data", str(small_text), "--out", str(out), "--max-iters", "5", *TINY]) == 0
    before = {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()
    code, err = run_main(["train", "--data", str(small_text), "--out", str(out), "--max-iters", "5",
                          "--seed", "9", *TINY], capsys)
    assert_one_line_error(code, err, "--overwrite")
    assert {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert main(["train", "--data", str(small_text), "--out", str(out), "--max-iters", "5", "--seed",
                 "9", "--overwrite", *TINY]) == 0
    assert (out / "model.safetensors").read_bytes() != before["model.safetensors"]


def test_bad_sample_inputs(small_text, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--data", str(small_text), "--out", str(out), "--max-iters", "3", *TINY]) == 0
    capsys.readouterr()
    code, err = run_main(["sample", str(tmp_path / "nope")], capsys)
    assert_one_line_error(code, err, "run directory not found")
    code, err = run_main(["sample", str(tmp_path)], capsys)
    assert_one_line_error(code, err, "not a run directory")
    code, err = run_main(["sample", str(out), "--prompt", "To bé"], capsys)
    assert_one_line_error(code, err, "'é'", "position 4")
    code, err = run_main(["sample", str(out), "--prompt", "To be " * 10], capsys)
    assert_one_line_error(code, err, "longer than the model's context of 16")
    (out / "model.safetensors").write_bytes(b"garbage" * 10)
    code, err = run_main(["sample", str(out)], capsys)
    assert_one_line_error(code, err, "corrupt")


@pytest.mark.parametrize("change,fragment", [
    (lambda t: t.double().fill_(1e300), "once converted from float64 to float32"),
    (lambda t: t.to(torch.int32), "int32; weights must be float16"),
    (lambda t: t.bool(), "bool; weights must be"),
    (lambda t: t.to(torch.complex64), "complex64; weights must be"),
])
def test_weights_of_another_dtype_are_checked_after_conversion(small_text, tmp_path, capsys, change, fragment):
    """A weights file's dtype cannot hide an overflow (float64's 1e300 is infinite as float32),
    and int, bool or complex tensors are refused: one line from sample, eval, resume."""
    from safetensors.torch import load_file, save_file

    out = tmp_path / "run"
    assert main(["train", "--data", str(small_text), "--out", str(out), "--max-iters", "2", *TINY]) == 0
    capsys.readouterr()
    weights = sorted((out / "train_state").glob("step-*"))[-1] / "model.safetensors"
    for path in (out / "model.safetensors", weights):
        tensors = load_file(path)
        name = next(k for k, t in tensors.items() if t.dim() == 2)
        tensors[name] = change(tensors[name]).contiguous()
        save_file(tensors, path)
    manifest = weights.parent / "manifest.json"  # as a careful forger would: the checksum matches
    sums = json.loads(manifest.read_text())
    sums["sha256"]["model.safetensors"] = hashlib.sha256(weights.read_bytes()).hexdigest()
    manifest.write_text(json.dumps(sums))
    for argv in (["sample", str(out)], ["eval", str(out), "--data", str(small_text)]):
        code, err = run_main(argv, capsys)
        assert_one_line_error(code, err, fragment)
    code, err = run_main(["train", "--resume", str(out), "--max-iters", "3", "--allow-config-change"], capsys)
    assert code == 2 and fragment in err and "Traceback" not in err, err


def test_subprocess_error_has_no_traceback(tmp_path):
    r = quill("train", "--data", str(tmp_path / "missing.txt"))
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"quill: error: data file not found: {tmp_path / 'missing.txt'}"]


def test_python_dash_m_and_help():
    r = quill("--help")
    assert r.returncode == 0 and "train" in r.stdout and "sample" in r.stdout
    r = quill("train", "--help")
    assert "--n-layer" in r.stdout and "--learning-rate" in r.stdout


def test_python_api_as_the_readme_shows(small_text, tmp_path):
    import quillgpt
    from quillgpt import load_config as lc
    from quillgpt import load_run as lr
    from quillgpt.generate import generate as gen
    from quillgpt.train import train

    assert callable(train) and callable(gen) and lr is quillgpt.load_run
    assert quillgpt.Trainer is Trainer and quillgpt.GPT.__name__ == "GPT"
    cfg = lc(None, dict(data=str(small_text), out=str(tmp_path / "x"), n_layer=1, n_head=2, n_embd=16,
                        block_size=16, batch_size=4, max_iters=5, eval_iters=1, sample_tokens=0))
    result = train(cfg, progress=False)
    run = lr(result.run_dir)
    assert len(gen(run.model, run.tokenizer, "To be", max_new_tokens=10, top_k=5, seed=0)) == 10


def test_the_gpt2_preset_trains_on_gpt2_tokens(small_text, gpt2_cache, tmp_path):
    """`--config gpt2-124m` tokenizes with GPT-2's tokenizer (the ranks from $QUILL_CACHE), not by
    characters: the run's tokenizer, its vocabulary, and the very tokens it trains on."""
    from quillgpt.data import TokenData
    from quillgpt.tokenizers.gpt2 import gpt2_tokenizer
    from quillgpt.train import Trainer

    tiny = dict(n_layer=1, n_head=2, n_embd=16, block_size=16, batch_size=2, gradient_accumulation_steps=1,
                max_iters=1, eval_iters=1, compile=False, dtype="float32", device="cpu", sample_tokens=0,
                data=str(small_text), out=str(tmp_path / "run"))
    cfg = load_config("gpt2-124m", tiny)
    assert cfg.train.tokenizer == "gpt2"
    trainer = Trainer(cfg, progress=False, log=lambda m: None)
    assert trainer.tokenizer == gpt2_tokenizer() and cfg.model.vocab_size == 50257
    assert trainer.model.transformer.wte.weight.shape[0] == 50257
    ids = gpt2_tokenizer().encode(small_text.read_text(encoding="utf-8"))
    assert isinstance(trainer.data, TokenData)
    splits = trainer.data.splits
    assert [int(i) for i in (*splits.train, *splits.val)] == ids + [50256]  # the text, then <|endoftext|>
    x, y = trainer.batches.next()
    assert int(x.max()) > 255  # merged tokens: no character or byte vocabulary has these ids
    assert trainer.run().steps == 1
