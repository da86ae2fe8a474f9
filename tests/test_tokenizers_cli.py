"""`quill tokenize`, `quill tokenizer train`, and `quill train --tokenizer ...` end to end."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from quillgpt.cli import main
from quillgpt.tokenizers import ByteBPETokenizer, SyllableTokenizer, load_tokenizer

EXAMPLE = "Albert Einstein war ein schweizerisch-US-amerikanischer Physiker."
TINY_MODEL = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "16",
              "--batch-size", "4", "--max-iters", "3", "--eval-interval", "3", "--eval-iters", "1",
              "--sample-tokens", "5", "--no-progress", "--device", "cpu"]


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_tokenize_shows_syllables(capsys):
    code, out, _ = run_cli(capsys, "tokenize", EXAMPLE, "--tokenizer", "syllable")
    assert code == 0
    lines = out.splitlines()
    tokens = json.loads(lines[0].removeprefix("Tokens: "))
    values = json.loads(lines[1].removeprefix("Values: "))
    assert tokens[:6] == ["Albert", " ", "Einst", "ein", " ", "war"]
    assert len(values) == len(tokens) == 23 and values[1] == 0  # " " is the most frequent chunk
    assert "65 characters, 23 tokens, 2.83 characters per token" in lines[2]


def test_tokenize_gpt2_and_ids_for_scripts(capsys, gpt2_cache, tmp_path):
    code, out, _ = run_cli(capsys, "tokenize", "Hello world", "--tokenizer", "gpt2")
    assert code == 0 and 'Tokens: ["Hello", " world"]' in out and "Values: [15496, 995]" in out
    path = tmp_path / "in.txt"
    path.write_text("Hello world<|endoftext|>", encoding="utf-8")
    code, out, _ = run_cli(capsys, "tokenize", "--tokenizer", "gpt2", "--file", str(path), "--ids")
    assert code == 0 and json.loads(out) == [15496, 995, 50256]


def test_tokenizer_train_then_tokenize(capsys, small_text, tmp_path):
    out_path = tmp_path / "tok.json"
    code, _, err = run_cli(capsys, "tokenizer", "train", "--kind", "bpe", "--vocab-size", "300",
                           "--data", str(small_text), "--out", str(out_path), "--no-progress")
    assert code == 0 and "300 tokens" in err
    tok = load_tokenizer(out_path)
    assert isinstance(tok, ByteBPETokenizer) and tok.vocab_size == 300
    code, out, _ = run_cli(capsys, "tokenize", "To be, or not", "--tokenizer", str(out_path), "--ids")
    assert json.loads(out) == tok.encode("To be, or not")
    # refuses to overwrite; --overwrite replaces
    before = out_path.read_bytes()
    code, _, err = run_cli(capsys, "tokenizer", "train", "--data", str(small_text), "--out", str(out_path))
    assert code == 2 and "exists" in err and out_path.read_bytes() == before
    code, _, err = run_cli(capsys, "tokenizer", "train", "--kind", "syllable", "--vocab-size", "20",
                           "--data", str(small_text), "--out", str(out_path), "--overwrite")
    assert code == 0 and "covering" in err
    assert isinstance(load_tokenizer(out_path), SyllableTokenizer)


@pytest.mark.parametrize("argv, message", [
    (["tokenizer", "train", "--vocab-size", "200", "--data", "{data}", "--out", "{out}"], "below the base"),
    (["tokenizer", "train", "--vocab-size", "999999999", "--data", "{data}", "--out", "{out}"], "absurdly"),
    (["tokenizer", "train", "--data", "{tmp}/missing.txt", "--out", "{out}"], "not found"),
    (["tokenizer", "train", "--data", "{tmp}/latin1.txt", "--out", "{out}"], "not UTF-8"),
    (["tokenize", "x", "--tokenizer", "{tmp}/corrupt.json"], "corrupt"),
    (["tokenize", "x", "--tokenizer", "bpe:12"], "below the base"),
    (["tokenize", "x", "--tokenizer", "wordpiece"], "unknown tokenizer"),
    (["tokenize", "--tokenizer", "char"], "either TEXT or --file"),
    (["tokenize", "\udcff", "--tokenizer", "bpe:300"], "surrogate"),
])
def test_bad_input_is_one_line_exit_2(capsys, small_text, tmp_path, argv, message):
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (tmp_path / "corrupt.json").write_text('{"kind": "bpe", "tokens": [', encoding="utf-8")
    out = tmp_path / "tok.json"
    argv = [a.format(data=small_text, out=out, tmp=tmp_path) for a in argv]
    code, _, err = run_cli(capsys, *argv)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("quill: error:") and message in err
    assert not out.exists()


def test_tokenizer_commands_do_not_import_torch(gpt2_cache, small_text, tmp_path):
    code = (
        "import sys\n"
        "from quillgpt.cli import main\n"
        f"main(['tokenize', 'Hello', '--tokenizer', 'gpt2'])\n"
        f"main(['tokenizer', 'train', '--data', {str(small_text)!r}, '--vocab-size', '280', "
        f"'--out', {str(tmp_path / 't.json')!r}, '--no-progress'])\n"
        f"main(['tokenize', 'Hello', '--tokenizer', {str(tmp_path / 't.json')!r}])\n"
        "print('torch' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip().splitlines()[-1] == "False"


@pytest.mark.parametrize("spec", ["char", "syllable:30", "bpe:300", "gpt2", "file"])
def test_train_end_to_end_with_each_tokenizer(capsys, gpt2_cache, small_text, tmp_path, spec):
    if spec == "file":
        spec = str(tmp_path / "tok.json")
        ByteBPETokenizer.train(small_text.read_text(encoding="utf-8"), 280).save(spec)
    run_dir = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "--data", str(small_text), "--tokenizer", spec,
                           "--out", str(run_dir), *TINY_MODEL)
    assert code == 0, err
    saved = load_tokenizer(run_dir / "tokenizer.json")
    expected_vocab = {"char": None, "syllable:30": 30, "bpe:300": 300, "gpt2": 50257}.get(spec, 280)
    if expected_vocab is not None:
        assert saved.vocab_size == expected_vocab
    code, out, err = run_cli(capsys, "sample", str(run_dir), "--prompt", "To be", "--max-new-tokens", "4",
                             "--seed", "1")
    assert code == 0, err
    assert out.startswith("To be")


def test_resume_with_another_tokenizer_file_is_refused(capsys, small_text, tmp_path):
    run_dir = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "--data", str(small_text), "--tokenizer", "bpe:300",
                           "--out", str(run_dir), *TINY_MODEL)
    assert code == 0, err
    other = tmp_path / "other.json"
    ByteBPETokenizer.train(small_text.read_text(encoding="utf-8"), 280).save(other)
    before = (run_dir / "tokenizer.json").read_bytes()
    code, _, err = run_cli(capsys, "train", "--resume", str(run_dir), "--tokenizer", str(other),
                           "--no-progress")
    assert code == 2 and err.count("\n") == 1 and "tokenizer" in err
    assert (run_dir / "tokenizer.json").read_bytes() == before
