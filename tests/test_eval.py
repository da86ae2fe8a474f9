"""`quill eval`: sliding-window loss, perplexity and bits per byte, checked against transformers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import make_run

from quillgpt import checkpoint as ckpt
from quillgpt.cli import main
from quillgpt.config import ModelConfig
from quillgpt.errors import QuillError
from quillgpt.evaluate import evaluate_ids, sliding_windows
from quillgpt.tokenizers import CharTokenizer
from quillgpt.tokenizers.bpe import ByteBPETokenizer

transformers = pytest.importorskip("transformers")


def hf_guide_perplexity(model, ids: torch.Tensor, max_length: int, stride: int) -> tuple[float, int]:
    """The loop of Hugging Face's perplexity guide: (exp of HF's loss, tokens scored).

    One correction: the guide weights each window's mean loss by (valid labels - 1), "due to
    the internal label shift", but when windows overlap the label the shift drops is already
    masked, so the window really scores all its valid labels. We count the labels the loss
    actually averages over, which makes exp(total / count) the exact perplexity.
    """
    seq_len = ids.size(1)
    nll_sum, n_tokens, prev_end_loc = 0.0, 0, 0
    for begin_loc in range(0, seq_len, stride):
        end_loc = min(begin_loc + max_length, seq_len)
        trg_len = end_loc - prev_end_loc
        input_ids = ids[:, begin_loc:end_loc]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            loss = model(input_ids, labels=target_ids).loss
        num_loss_tokens = (target_ids[:, 1:] != -100).sum().item()
        nll_sum += loss.item() * num_loss_tokens
        n_tokens += num_loss_tokens
        prev_end_loc = end_loc
        if end_loc == seq_len:
            break
    return math.exp(nll_sum / n_tokens), n_tokens


def make_eval_run(path: Path, tokenizer, block_size: int = 32) -> Path:
    return make_run(path, ModelConfig(block_size=block_size, n_layer=2, n_head=2, n_embd=32), tokenizer)


@pytest.mark.parametrize("n, block, stride", [(10, 6, 3), (100, 32, 32), (100, 32, 7), (5, 32, 16),
                                              (33, 32, 1)])
def test_windows_score_each_token_at_most_once(n, block, stride):
    windows = sliding_windows(n, block, stride)
    scored = [t for b, e, first in windows for t in range(first, e)]
    assert len(scored) == len(set(scored)) and 0 not in scored
    assert all(e - b <= block and b < first <= e for b, e, first in windows)
    assert windows[-1][1] == n
    if stride < block:  # overlapping windows: every token but the first is scored
        assert sorted(scored) == list(range(1, n))
    else:  # disjoint windows: each window's first token goes unscored
        assert len(scored) == n - len(windows)


def test_windows_bad_arguments():
    with pytest.raises(QuillError, match="stride"):
        sliding_windows(100, 32, 0)
    with pytest.raises(QuillError, match="stride"):
        sliding_windows(100, 32, 33)
    with pytest.raises(QuillError, match="at least 2"):
        sliding_windows(1, 32, 16)


@pytest.mark.parametrize("stride", [32, 16, 5])
def test_perplexity_equals_hf_guide(tmp_path, small_text, capsys, stride):
    from transformers import GPT2LMHeadModel

    from quillgpt.hf import export_hf

    tok = ByteBPETokenizer.train(small_text.read_text()[:2000], 300)
    text = small_text.read_text()[:1000] + "Whether 'tis nobler in the mind — ünïcödé 日本\n"
    small_text = tmp_path / "part.txt"
    small_text.write_text(text, encoding="utf-8")
    run_dir = make_eval_run(tmp_path / "run", tok)
    export_hf(run_dir, tmp_path / "hf")
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    ids = torch.tensor([tok.encode(text)])
    expected_ppl, expected_n = hf_guide_perplexity(hf, ids, 32, stride)

    capsys.readouterr()
    assert main(["eval", str(run_dir), "--data", str(small_text), "--stride", str(stride), "--json",
                 "--batch-size", "3"]) == 0
    out = capsys.readouterr()
    result = json.loads(out.out)
    assert result["scored"] == expected_n
    assert result["perplexity"] == pytest.approx(expected_ppl, rel=1e-5)
    assert result["loss"] == pytest.approx(math.log(expected_ppl), rel=1e-5)
    assert "window" in out.err  # the progress bar
    # bits per byte: the same log-likelihood over the scored tokens' bytes
    assert result["bits_per_byte"] == pytest.approx(result["nll"] / math.log(2) / result["bytes"])
    # the exported HF directory evaluates the same, without importing it first
    assert main(["eval", str(tmp_path / "hf"), "--data", str(small_text), "--stride", str(stride),
                 "--json", "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["perplexity"] == pytest.approx(expected_ppl, rel=1e-5)


def test_bits_per_byte_of_a_char_model(tmp_path, small_text, capsys):
    """ASCII text with a char tokenizer: one byte per token, so bits/byte = loss / ln 2."""
    text = small_text.read_text()[:2000]
    small_text.write_text(text)
    run_dir = make_eval_run(tmp_path / "run", CharTokenizer.train(text), block_size=64)
    assert main(["eval", str(run_dir), "--data", str(small_text), "--json", "--no-progress"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["bytes"] == r["scored"] == len(text) - 1 and r["stride"] == 32
    assert r["bits_per_byte"] == pytest.approx(r["loss"] / math.log(2))
    assert r["perplexity"] == pytest.approx(math.exp(r["loss"]))
    # the table a person reads
    assert main(["eval", str(run_dir), "--data", str(small_text), "--no-progress", "--max-tokens",
                 "500"]) == 0
    table = capsys.readouterr().out
    assert "perplexity" in table and "bits per byte" in table and "of 500" in table


def test_batching_does_not_change_the_result(tmp_path, small_text):
    tok = CharTokenizer.train(small_text.read_text())
    run = ckpt.load_run(make_eval_run(tmp_path / "run", tok))
    ids = tok.encode(small_text.read_text())[:400]
    one = evaluate_ids(run.model, ids, stride=11, batch_size=1, progress=False)
    many = evaluate_ids(run.model, ids, stride=11, batch_size=16, progress=False)
    assert one.scored == many.scored == 399
    assert many.nll == pytest.approx(one.nll, rel=1e-6)


def test_eval_bad_input(tmp_path, small_text, capsys):
    run_dir = make_eval_run(tmp_path / "run", CharTokenizer.train(small_text.read_text()))

    def error(argv: list[str]) -> str:
        capsys.readouterr()
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("quill: error: ") and "\n" not in err, err
        return err

    assert "stride" in error(["eval", str(run_dir), "--data", str(small_text), "--stride", "0"])
    assert "stride" in error(["eval", str(run_dir), "--data", str(small_text), "--stride", "33"])
    assert "not found" in error(["eval", str(run_dir), "--data", str(tmp_path / "missing.txt")])
    assert "batch-size" in error(["eval", str(run_dir), "--data", str(small_text), "--batch-size", "0"])
    other = tmp_path / "other.txt"
    other.write_text("zebra")  # 'z' is not in the char vocabulary
    error(["eval", str(run_dir), "--data", str(other)])
    assert "not found" in error(["eval", str(tmp_path / "norun"), "--data", str(small_text)])
    assert "required" in error(["eval", str(run_dir)])
