"""Tool use with a real model end to end, from the command line: `quill sft` on conversations
with calculator calls (a new tokenizer with the tool tokens, a GPT with its KV cache), then
`quill chat --tools calculator` runs the call the model writes, forces the result in and the
model answers from it; the server runs the same model's calls (`--tools calculator`) or hands
them to the client (OpenAI's `tools`). The model learns a few conversations by heart, so its
calls are known."""

from __future__ import annotations

import json

import pytest

from quillgpt import cli
from quillgpt.tokenizers.bpe import ByteBPETokenizer
from quillgpt.tools import BUILTINS

CALC = BUILTINS["calculator"].definition()
PAIRS = [(12, 34), (56, 78), (91, 23), (45, 67)]


def line(a: int, b: int) -> dict:
    call = {"id": "call_0", "type": "function",
            "function": {"name": "calculator", "arguments": json.dumps({"expression": f"{a}*{b}"})}}
    return {"messages": [{"role": "user", "content": f"What is {a} times {b}?"},
                         {"role": "assistant", "content": None, "tool_calls": [call]},
                         {"role": "tool", "tool_call_id": "call_0", "content": str(a * b)},
                         {"role": "assistant", "content": str(a * b)}], "tools": [CALC]}


@pytest.fixture(scope="module")
def calc_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("calc")
    lines = [line(a, b) for a, b in PAIRS]
    (root / "tool_chats.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines * 8), encoding="utf-8")
    text = "\n".join([json.dumps(CALC), *(f"What is {a} times {b}?" for a, b in PAIRS),
                      *(f'calculator {{"expression": "{a}*{b}"}}' for a, b in PAIRS)])
    ByteBPETokenizer.train(text * 4, 400, within_words=False, no_merge="0123456789").save(root / "tok.json")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QUILL_CACHE", str(root / "cache"))
        code = cli.main(["sft", "--data", str(root / "tool_chats.jsonl"), "--tokenizer", str(root / "tok.json"),
                         "--out", str(root / "calc"), "--n-layer", "2", "--n-head", "2", "--n-embd", "64",
                         "--block-size", "64", "--batch-size", "8", "--max-iters", "150", "--learning-rate", "1e-2",
                         "--warmup-iters", "10", "--eval-interval", "150", "--eval-iters", "1", "--dropout", "0",
                         "--val-fraction", "0.2", "--sample-tokens", "0", "--compile", "false", "--no-progress",
                         "--device", "cpu", "--seed", "0"])
    assert code == 0
    return root / "calc"


def test_quill_chat_runs_the_calls_a_trained_model_writes(calc_run, capsys):
    capsys.readouterr()
    assert cli.main(["chat", str(calc_run), "--tools", "calculator", "--temperature", "0",
                     "--message", "What is 56 times 78?"]) == 0
    out = capsys.readouterr().out
    assert out == '[tool call] calculator {"expression": "56*78"}\n[tool result] 4368\n4368\n'


def test_the_server_runs_or_hands_over_a_trained_models_calls(calc_run):
    pytest.importorskip("fastapi", reason="quill serve needs the serve extra")
    from fastapi.testclient import TestClient

    from quillgpt.checkpoint import load_run
    from quillgpt.serve import ServeSettings, create_app

    run = load_run(calc_run)
    ask = [{"role": "user", "content": "What is 91 times 23?"}]
    with TestClient(create_app(run, ServeSettings(tools=("calculator",))), base_url="http://localhost") as c:
        r = c.post("/v1/chat/completions", json={"messages": ask, "temperature": 0}).json()["choices"][0]
        assert r["message"]["content"] == "2093" and r["finish_reason"] == "stop"
        assert r["message"]["quill_tools"] == [{"type": "call", "text": 'calculator {"expression": "91*23"}'},
                                               {"type": "result", "text": "2093"}]
    with TestClient(create_app(run), base_url="http://localhost") as c:  # the client runs its calculator
        r = c.post("/v1/chat/completions", json={"messages": ask, "tools": [CALC], "temperature": 0}).json()
        message = r["choices"][0]["message"]
        assert r["choices"][0]["finish_reason"] == "tool_calls" and message["content"] is None
        call = message["tool_calls"][0]
        assert call["function"] == {"name": "calculator", "arguments": '{"expression": "91*23"}'}
        follow = [*ask, message, {"role": "tool", "tool_call_id": call["id"], "content": "2093"}]
        r = c.post("/v1/chat/completions", json={"messages": follow, "tools": [CALC], "temperature": 0}).json()
        assert r["choices"][0]["message"] == {"role": "assistant", "content": "2093"}
