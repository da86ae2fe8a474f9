"""Tools on /v1/chat/completions, driven by the official openai client: a request's `tools` go
into the prompt; a reply that calls one ends with `finish_reason: "tool_calls"` and
`message.tool_calls` (id, type function, function.name, function.arguments as JSON text),
streamed in OpenAI's delta shape too; the tool message that follows continues the
conversation. `quill serve --tools calculator` runs built-ins on the server (their calls and results in
quill's own `quill_tools` field, which the playground shows). Malformed calls
are text with finish "stop"; invalid tool schemas and unsupported tool_choice values are 400s
and the server keeps serving. The model is scripted (tests/tool_models.py)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("fastapi", reason="quill serve needs the serve extra (fastapi, uvicorn)")
pytest.importorskip("uvicorn", reason="quill serve needs the serve extra (fastapi, uvicorn)")

from fastapi.testclient import TestClient  # noqa: E402
from tool_models import ScriptedChat, tool_tokenizer  # noqa: E402

from quillgpt import cli  # noqa: E402
from quillgpt.chat import add_chat_tokens  # noqa: E402
from quillgpt.checkpoint import Run  # noqa: E402
from quillgpt.config import load_config  # noqa: E402
from quillgpt.errors import QuillError  # noqa: E402
from quillgpt.serve import BackgroundServer, ServeSettings, create_app  # noqa: E402
from quillgpt.tokenizers.char import CharTokenizer  # noqa: E402

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The temperature in a city, in °C.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
ASK = [{"role": "user", "content": "weather Oslo"}]


def scripted(tmp_path, tok=None) -> Run:
    tok = tok or tool_tokenizer()
    model = ScriptedChat(tok)
    cfg = load_config(None, {"vocab_size": tok.vocab_size, "block_size": model.config.block_size})
    return Run(tmp_path / "calc", cfg, tok, model)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return scripted(tmp_path_factory.mktemp("serve-tools"))


@pytest.fixture(scope="module")
def client(run):
    with TestClient(create_app(run), base_url="http://localhost:8000") as c:
        yield c


def test_openai_client_drives_the_client_side_flow(run):
    openai = pytest.importorskip("openai")
    with BackgroundServer(create_app(run)) as url:
        oc = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        r = oc.chat.completions.create(model="calc", messages=ASK, tools=[WEATHER], temperature=0)
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        [call] = choice.message.tool_calls
        assert call.type == "function" and call.id.startswith("call_") and call.function.name == "get_weather"
        assert isinstance(call.function.arguments, str) and json.loads(call.function.arguments) == {"city": "Oslo"}
        # the client runs it and sends the result back
        follow = [*ASK, choice.message, {"role": "tool", "tool_call_id": call.id, "content": "21"}]
        r2 = oc.chat.completions.create(model="calc", messages=follow, tools=[WEATHER], temperature=0)
        assert r2.choices[0].finish_reason == "stop" and r2.choices[0].message.content == "Oslo: 21"
        assert not r2.choices[0].message.tool_calls

        # streamed: OpenAI's delta shape, which the client's chunks carry
        calls: dict[int, dict] = {}
        content, finish = [], None
        for chunk in oc.chat.completions.create(model="calc", messages=ASK, tools=[WEATHER], temperature=0,
                                                stream=True):
            for c in chunk.choices:
                content.append(c.delta.content or "")
                finish = c.finish_reason or finish
                for d in c.delta.tool_calls or []:
                    got = calls.setdefault(d.index, {"id": None, "name": "", "arguments": ""})
                    got["id"] = d.id or got["id"]
                    got["name"] += d.function.name or ""
                    got["arguments"] += d.function.arguments or ""
        assert finish == "tool_calls" and "".join(content) == ""
        assert list(calls) == [0] and calls[0]["name"] == "get_weather" and calls[0]["id"].startswith("call_")
        assert json.loads(calls[0]["arguments"]) == {"city": "Oslo"}
        follow = [*ASK, {"role": "assistant", "content": None, "tool_calls": [
            {"id": calls[0]["id"], "type": "function",
             "function": {"name": "get_weather", "arguments": calls[0]["arguments"]}}]},
            {"role": "tool", "tool_call_id": calls[0]["id"], "content": "-3"}]
        pieces = [c.delta.content or "" for chunk in oc.chat.completions.create(
            model="calc", messages=follow, tools=[WEATHER], temperature=0, stream=True) for c in chunk.choices]
        assert "".join(pieces) == "Oslo: -3"


def test_a_malformed_call_is_text_with_finish_stop(client):
    body = {"messages": [{"role": "user", "content": "bad"}], "tools": [WEATHER], "temperature": 0}
    r = client.post("/v1/chat/completions", json=body).json()
    assert r["choices"][0]["finish_reason"] == "stop"
    assert r["choices"][0]["message"] == {"role": "assistant", "content": "calculator {expression: 1}"}
    lines = client.post("/v1/chat/completions", json={**body, "stream": True}).text.split("\n\n")
    chunks = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert "".join(d.get("content") or "" for d in deltas) == "calculator {expression: 1}"
    assert not any("tool_calls" in d for d in deltas)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    undefined = client.post("/v1/chat/completions", json={**body, "messages": [
        {"role": "user", "content": "undefined"}]}).json()["choices"][0]
    assert undefined["finish_reason"] == "stop" and undefined["message"] == {"role": "assistant",
                                                                           "content": "get_time {}"}


def test_tool_choice_none_never_calls(client):
    r = client.post("/v1/chat/completions", json={"messages": ASK, "tools": [WEATHER], "tool_choice": "none",
                                                  "temperature": 0}).json()
    assert r["choices"][0]["finish_reason"] == "stop" and r["choices"][0]["message"] == {"role": "assistant",
                                                                                          "content": ""}


def test_n_rows_each_run_their_own_calls(client):
    r = client.post("/v1/chat/completions", json={"messages": ASK, "tools": [WEATHER], "n": 3,
                                                  "temperature": 0}).json()
    ids = [c["message"]["tool_calls"][0]["id"] for c in r["choices"]]
    assert [c["finish_reason"] for c in r["choices"]] == ["tool_calls"] * 3 and len(set(ids)) == 3


def test_server_side_built_ins(run):
    app = create_app(run, ServeSettings(tools=("calculator",)))
    with TestClient(app, base_url="http://localhost:8000") as c:
        assert c.get("/v1/model-card").json()["tools"] == ["calculator"]
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "chain 12*34+5"}],
                                                 "temperature": 0}).json()
        assert r["choices"][0]["message"] == {"role": "assistant", "content": "413", "quill_tools": [
            {"type": "call", "text": 'calculator {"expression": "12*34"}'}, {"type": "result", "text": "408"},
            {"type": "call", "text": 'calculator {"expression": "408+5"}'}, {"type": "result", "text": "413"}]}
        assert r["choices"][0]["finish_reason"] == "stop"
        # built-ins and a client's tools together: the client's call goes back to the client
        r = c.post("/v1/chat/completions", json={"messages": ASK, "tools": [WEATHER], "temperature": 0}).json()
        assert r["choices"][0]["finish_reason"] == "tool_calls"
        assert r["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "get_weather"
        text = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "12*34"}],
                                                    "temperature": 0, "stream": True}).text
        deltas = [json.loads(x[6:])["choices"][0]["delta"] for x in text.split("\n\n") if x.startswith("data: {")]
        assert "".join(d.get("content") or "" for d in deltas) == "408"
        # the built-in round, in order: the call and its result before the answer's text
        shown = [(k, v) for d in deltas for k, v in d.items() if k in ("content", "quill_tools") and v]
        assert shown[0] == ("quill_tools", [{"type": "call", "text": 'calculator {"expression": "12*34"}'},
                                            {"type": "result", "text": "408"}])
        assert [k for k, _ in shown[1:]] == ["content"] * 3
        bad = c.post("/v1/chat/completions", json={"messages": ASK, "tools": [
            {"type": "function", "function": {"name": "calculator"}}]})
        assert bad.status_code == 400 and "'calculator' is a built-in tool here" in bad.json()["error"]["message"]


@pytest.mark.parametrize("change, fragment", [
    ({"tools": "get_weather"}, "tools: Input should be a valid list"),
    ({"tools": [{"type": "function", "function": {"name": "get weather"}}]}, "function.name must be"),
    ({"tools": [{"type": "code", "function": {"name": "x"}}]}, 'tools[0] must be {"type": "function"'),
    ({"tools": [{"type": "function", "function": {"name": "x", "parameters": {"type": "str"}}}]},
     "is not a JSON Schema type"),
    ({"tools": [{"type": "function", "function": {"name": "x", "parameters": {
        "type": "object", "properties": {}, "required": ["city"]}}}]}, "required names 'city'"),
    ({"tools": [WEATHER, WEATHER]}, "a second tool named 'get_weather'"),
    ({"tools": [{"type": "function", "function": {"name": "x", "parameters": {"type": "array"}}}]},
     "must describe an object"),
    ({"tools": [WEATHER], "tool_choice": "required"}, 'only "auto" and "none"'),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_weather"}}},
     'only "auto" and "none"'),
    ({"messages": [*ASK, {"role": "tool", "tool_call_id": "call_1", "content": "1"}]}, "answering no call"),
])
def test_invalid_tools_are_400_and_the_server_keeps_serving(client, change, fragment):
    r = client.post("/v1/chat/completions", json={"messages": ASK, "temperature": 0, **change})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert fragment in error["message"] and error["type"] == "invalid_request_error"
    assert client.post("/v1/chat/completions", json={"messages": ASK, "tools": [WEATHER]}).status_code == 200


def test_a_model_that_never_learnt_tools(tmp_path):
    plain = scripted(tmp_path, add_chat_tokens(CharTokenizer(list("abcdefghijklmnopqrstuvwxyz "))))
    with TestClient(create_app(plain), base_url="http://localhost:8000") as c:
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "tools": [WEATHER]})
        assert r.status_code == 400 and r.json()["error"]["code"] == "no_tool_template"
    with pytest.raises(QuillError, match="has not learnt tools"):
        create_app(plain, ServeSettings(tools=("calculator",)))


def test_quill_serve_names_a_misspelt_tool(capsys, tmp_path):
    assert cli.main(["serve", str(tmp_path / "none"), "--tools", "calculater"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "quill: error: unknown tool 'calculater'; the built-in tools are calculator, python"
