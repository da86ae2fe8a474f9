"""benchmarks/tools.py end to end at its tiny setting (`--smoke`: a few steps per model, 40
held-out questions): the data in OpenAI's shapes (calls and answers alone, the same questions,
held-out pairs unseen), one tokenizer that keeps digits apart and the tool list whole, both
models trained from scratch and scored, the report written. The full measurement is the
lead's (docs/tools.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from quillgpt.chat import add_chat_tokens, render
from quillgpt.checkpoint import load_run
from quillgpt.conversations import read_conversations
from quillgpt.tokenizers import load_tokenizer

REPO = Path(__file__).resolve().parent.parent


def test_the_benchmark_runs_end_to_end_at_its_smoke_setting(tmp_path):
    out = tmp_path / "tools"
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "tools.py"), "--out", str(out), "--smoke",
                           "--train", "60", "--test", "6", "--threads", "1"], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    table = done.stdout.splitlines()
    assert table[1].startswith("| model | parameters | steps |") and len(table) == 5
    assert "with calculator calls (--tools calculator)" in table[3] and "answers alone" in table[4]
    assert (out / "report.md").read_text(encoding="utf-8") == done.stdout
    # the data: the same questions, with a calculator call and alone; held-out pairs unseen
    tools = read_conversations(str(out / "tool_chats.jsonl")).conversations
    plain = read_conversations(str(out / "plain_chats.jsonl")).conversations
    assert len(tools) == len(plain) == 60
    first = tools[0]
    a, b = json.loads(first[1].tool_calls[0].arguments)["expression"].split("*")
    assert first[0].content == plain[0][0].content and first[2].content == first[3].content == str(int(a) * int(b))
    assert plain[0][1].content == str(int(a) * int(b)) and first.tools[0]["function"]["name"] == "calculator"
    test = [json.loads(line) for line in (out / "test.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(test) == 6 and {t["messages"][0]["content"] for t in test}.isdisjoint(c[0].content for c in plain)
    # one tokenizer: the tool list is one token, each digit its own
    tok = add_chat_tokens(load_tokenizer(out / "tokenizer.json"), tools=True)
    pieces = [tok.decode([i]) for i in render(tok, first).ids]
    assert pieces[1] == json.dumps(first.tools[0]) and all(len(p) == 1 for p in pieces if p.isdigit())
    for name in ("tools", "plain"):
        run = load_run(out / f"run-{name}")
        assert run.tokenizer.vocab_size == tok.vocab_size - (0 if name == "tools" else 4)


def test_a_bad_setting_is_one_line(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "tools.py"), "--out", str(tmp_path),
                           "--train", "1"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stderr.strip() == "tools.py: --train must be at least 2 and --test at least 1"
