"""benchmarks/engine_mix.py end to end at a tiny size: the four loads run through the engine and
make its table (the measurement itself is docs/serve.md's)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import make_run

from quillgpt.config import ModelConfig
from quillgpt.tokenizers.char import CharTokenizer

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.engine_mix import PROMPTS, requests  # noqa: E402


def tokenizer() -> CharTokenizer:
    return CharTokenizer(sorted(set("".join(PROMPTS) + "abcdefghijklmnopqrstuvwxyz ")))


def test_the_loads_differ_only_where_they_say():
    tok = tokenizer()
    same = requests(tok, 30, 8, False, False)
    settings = requests(tok, 30, 8, True, False)
    lengths = requests(tok, 30, 8, False, True)
    assert {r.sampling.max_new_tokens for r in same} == {r.sampling.max_new_tokens for r in settings} == {8}
    assert {r.sampling.max_new_tokens for r in lengths} == {4, 8, 12}
    assert len({(r.sampling.temperature, r.sampling.top_k) for r in same}) == 1
    assert len({(r.sampling.temperature, r.sampling.top_p, r.sampling.top_k) for r in settings}) > 3
    assert [r.prompt for r in same] == [r.prompt for r in requests(tok, 30, 8, False, False)]  # seeded


def test_the_benchmark_prints_its_table(tmp_path):
    run = make_run(tmp_path / "run", ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=32), tokenizer())
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "engine_mix.py"), "--run", str(run),
                           "--requests", "6", "--rows", "3", "--tokens", "4", "--rounds", "1", "--threads", "1"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[1] == "| load | generated tokens/s | vs identical |"
    assert [line.split(" | ")[0] for line in lines[3:]] == ["| identical", "| mixed settings", "| mixed lengths",
                                                             "| both"]
    assert lines[3].endswith("| 1.00x |")


def test_a_bad_value_is_one_line(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "engine_mix.py"), "--run", str(tmp_path),
                           "--rounds", "0"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_the_served_mixed_load_gives_every_client_the_same_total():
    """serve_load's mixed load: lengths of half, one and 1.5x max_tokens in each client's own
    order, every client's total that of the identical load; settings differ between requests."""
    from benchmarks.serve_load import request_mix

    for requests_each in (6, 7, 8):
        identical = request_mix(16, requests_each, 48, mixed=False)
        mixed = request_mix(16, requests_each, 48, mixed=True)
        want = sum(r["max_tokens"] for r in identical[0])
        assert {sum(r["max_tokens"] for r in c) for c in identical} == {want}
        assert {sum(r["max_tokens"] for r in c) for c in mixed} == {want}
        assert {r["max_tokens"] for c in mixed for r in c} == {24, 48, 72}
        assert len({tuple(r["max_tokens"] for r in c) for c in mixed}) > 1  # each client its own order
        assert len({(r["temperature"], r["top_k"], r["top_p"]) for c in mixed for r in c}) > 5
