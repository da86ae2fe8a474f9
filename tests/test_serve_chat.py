"""POST /v1/chat/completions: OpenAI's chat API on a model fine-tuned with quill sft. Replies
equal `chat.replies`; streaming is OpenAI's delta chunks; the official openai client works,
streamed and not; bad requests and models without a chat template get 4xx JSON."""

from __future__ import annotations

import json
import random

import pytest

pytest.importorskip("fastapi", reason="quill serve needs the serve extra (fastapi, uvicorn)")
pytest.importorskip("uvicorn", reason="quill serve needs the serve extra (fastapi, uvicorn)")

from fastapi.testclient import TestClient  # noqa: E402

from quillgpt.chat import CHAT_TOKENS, replies  # noqa: E402
from quillgpt.checkpoint import load_run  # noqa: E402
from quillgpt.config import load_config  # noqa: E402
from quillgpt.serve import BackgroundServer, ServeSettings, create_app  # noqa: E402
from quillgpt.sft import sft_trainer  # noqa: E402
from quillgpt.train import Trainer  # noqa: E402

VERSE = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n" * 40
TINY = {"n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 64, "batch_size": 8, "max_iters": 6,
        "eval_interval": 3, "eval_iters": 1, "log_interval": 3, "warmup_iters": 1, "device": "cpu",
        "sample_tokens": 0, "learning_rate": 3e-3}
CONV = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "turn: nobler"}]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny base model on verse, and the same model after a few SFT steps on conversations."""
    root = tmp_path_factory.mktemp("chat-serve")
    (root / "verse.txt").write_text(VERSE, encoding="utf-8")
    rng = random.Random(0)
    with open(root / "chats.jsonl", "w", encoding="utf-8") as f:
        for _ in range(40):
            w = "".join(rng.choice("abehimnorstu") for _ in range(rng.randint(3, 6)))
            f.write(json.dumps({"messages": [{"role": "user", "content": f"turn: {w}"},
                                             {"role": "assistant", "content": w[::-1]}]}) + "\n")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QUILL_CACHE", str(root / "cache"))
        Trainer(load_config(None, dict(TINY, data=str(root / "verse.txt"), out=str(root / "base"))),
                progress=False, log=lambda m: None).run()
        cfg = load_config(None, dict(TINY, data=str(root / "chats.jsonl"), out=str(root / "chat"),
                                     init_from=str(root / "base")))
        sft_trainer(cfg, progress=False, log=lambda m: None).run()
    return load_run(root / "base"), load_run(root / "chat")


@pytest.fixture(scope="module")
def chat_run(runs):
    return runs[1]


@pytest.fixture(scope="module")
def client(chat_run):
    with TestClient(create_app(chat_run), base_url="http://localhost:8000") as c:
        yield c


def want(run, conv=CONV, n=1, **sampling):
    return replies(run.model, run.tokenizer, [conv] * n, **sampling)


def test_chat_completion_is_openai_shaped_and_equals_replies(client, chat_run):
    r = client.post("/v1/chat/completions", json={"messages": CONV, "max_tokens": 12, "seed": 3,
                                                  "temperature": 0.9, "top_k": 20, "n": 2})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["model"] == "chat"
    texts = [c["message"]["content"] for c in body["choices"]]
    assert texts == want(chat_run, n=2, max_new_tokens=12, seed=3, temperature=0.9, top_k=20)
    for i, c in enumerate(body["choices"]):
        assert c["index"] == i and c["message"]["role"] == "assistant" and c["finish_reason"] in ("stop", "length")
        assert not any(t in c["message"]["content"] for t in CHAT_TOKENS)
    from quillgpt.chat import render

    prompt = render(chat_run.tokenizer, CONV, add_generation_prompt=True).ids
    u = body["usage"]
    assert u["prompt_tokens"] == 2 * len(prompt) and u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]


def test_greedy_reply_ends_at_end_of_turn_with_finish_stop(client, chat_run):
    text = want(chat_run, max_new_tokens=40, temperature=0)[0]
    r = client.post("/v1/chat/completions", json={"messages": CONV, "max_completion_tokens": 40,
                                                  "temperature": 0}).json()
    assert r["choices"][0]["message"]["content"] == text
    assert r["choices"][0]["finish_reason"] == ("stop" if r["usage"]["completion_tokens"] < 40 else "length")


def test_greedy_reply_logprobs_list_its_tokens(client, chat_run):
    """Greedy, each listed token is the most likely one; the tokens' texts make up the reply
    (test_serve_chat_logprobs.py checks the values against a forward pass)."""
    r = client.post("/v1/chat/completions", json={"messages": CONV, "max_tokens": 40, "temperature": 0,
                                                  "logprobs": True, "top_logprobs": 2}).json()
    choice = r["choices"][0]
    content = choice["logprobs"]["content"]
    assert "".join(e["token"] for e in content) == choice["message"]["content"]
    assert all(e["token"] == e["top_logprobs"][0]["token"] for e in content)
    assert all(bytes(e["bytes"]).decode("utf-8") == e["token"] for e in content)
    assert len(content) + (choice["finish_reason"] == "stop") == r["usage"]["completion_tokens"]
    assert not any(t in e["token"] for e in content for t in CHAT_TOKENS)


def test_stream_is_delta_chunks_ending_in_done(client, chat_run):
    r = client.post("/v1/chat/completions", json={"messages": CONV, "max_tokens": 15, "seed": 1, "stream": True,
                                                  "stream_options": {"include_usage": True}})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = [e for e in r.text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    content = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert content == want(chat_run, max_new_tokens=15, seed=1)[0]
    assert chunks[-2]["choices"][0]["finish_reason"] in ("stop", "length")
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 0
    assert all(c["usage"] is None for c in chunks[:-1])


def test_stop_strings_and_content_parts(client, chat_run):
    full = want(chat_run, max_new_tokens=20, temperature=0)[0]
    stop = full[2:4] if len(full) >= 4 else None
    if stop:
        r = client.post("/v1/chat/completions", json={"messages": CONV, "max_tokens": 20, "temperature": 0,
                                                      "stop": stop}).json()
        assert r["choices"][0]["message"]["content"] == full[: full.index(stop)]
        assert r["choices"][0]["finish_reason"] == "stop"
    parts = [{"role": "developer", "content": [{"type": "text", "text": "be "}, {"type": "text", "text": "brief"}]},
             CONV[1]]
    r = client.post("/v1/chat/completions", json={"messages": parts, "max_tokens": 20, "temperature": 0}).json()
    assert r["choices"][0]["message"]["content"] == full


BAD = [
    ({}, 400, "messages", "required"),
    ({"messages": []}, 400, "messages", None),
    ({"messages": "hi"}, 400, "messages", None),
    ({"messages": [{"role": "user"}]}, 400, "messages", "content must be a string"),
    ({"messages": [{"role": "user", "content": 5}]}, 400, "messages", None),
    ({"messages": [{"role": "bot", "content": "x"}]}, 400, "messages", "unknown role 'bot'"),
    ({"messages": [{"role": "tool", "content": "x"}]}, 400, "messages", "missing tool_call_id"),
    ({"messages": [{"role": "assistant", "content": "x"}]}, 400, "messages", "roles out of order"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}, 400, "messages",
     "last message"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, 400, "messages",
     "text content"),
    ({"messages": [{"role": "user", "content": "\u20ac"}]}, 400, "messages", "vocabulary"),
    ({"messages": [{"role": "user", "content": "to be " * 20}]}, 400, "messages", "context of 64"),
    ({"messages": CONV, "max_tokens": 0}, 400, "max_tokens", None),
    ({"messages": CONV, "max_completion_tokens": 5000}, 400, "max_completion_tokens", "at most 2048"),
    ({"messages": CONV, "temperature": -1}, 400, "temperature", None),
    ({"messages": CONV, "top_p": 2}, 400, "top_p", None),
    ({"messages": CONV, "n": 17}, 400, "n", "at most 16"),
    ({"messages": CONV, "stop": [""]}, 400, "stop", "empty"),
    ({"messages": CONV, "stream": "yes"}, 400, "stream", None),
    ({"messages": CONV, "top_logprobs": 2}, 400, "top_logprobs", "needs logprobs: true"),
    ({"messages": CONV, "tools": [{"type": "function"}]}, 400, "tools", "function must be an object with a name"),
    ({"messages": CONV, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools",
     "has not learnt tools"),
    ({"messages": CONV, "model": "gpt-4o"}, 404, "model", "not found"),
    # the legacy function-calling fields, and a tool_choice that forces a call: refused, never ignored
    ({"messages": CONV, "functions": [{"name": "f", "parameters": {}}]}, 400, "functions", "not supported"),
    ({"messages": CONV, "function_call": "auto"}, 400, "function_call", "not supported"),
    ({"messages": CONV, "function_call": {"name": "f"}}, 400, "function_call", "not supported"),
    ({"messages": CONV, "tool_choice": "required"}, 400, "tool_choice", "tool_choice"),
    ({"messages": CONV, "tool_choice": {"type": "function", "function": {"name": "f"}}}, 400, "tool_choice",
     "tool_choice"),
]


@pytest.mark.parametrize("body,status,param,fragment", BAD)
def test_bad_chat_requests_get_json_errors(client, body, status, param, fragment):
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["param"] == param
    if fragment:
        assert fragment in err["message"]


def test_raw_bad_bodies(client):
    for raw in (b"{", b"[]", b"\xff"):
        r = client.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
        assert r.status_code == 400 and "error" in r.json()


def test_a_model_without_a_chat_template_gets_400_saying_so(runs):
    base, chat = runs
    with TestClient(create_app(base), base_url="http://localhost:8000") as c:
        r = c.post("/v1/chat/completions", json={"messages": CONV})
        assert r.status_code == 400
        err = r.json()["error"]
        assert "no chat template" in err["message"] and err["code"] == "no_chat_template"
        assert c.get("/v1/model-card").json()["chat"] is False
        assert c.post("/v1/completions", json={"prompt": "To", "max_tokens": 3}).status_code == 200
    with TestClient(create_app(chat), base_url="http://localhost:8000") as c:
        assert c.get("/v1/model-card").json()["chat"] is True


def test_openai_client_chat_streamed_and_not(chat_run):
    openai = pytest.importorskip("openai")
    app = create_app(chat_run, ServeSettings())
    with BackgroundServer(app) as url:
        oc = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        got = oc.chat.completions.create(model="chat", messages=CONV, max_tokens=12, seed=4, temperature=0.7)
        expected = want(chat_run, max_new_tokens=12, seed=4, temperature=0.7)[0]
        assert got.choices[0].message.content == expected and got.choices[0].message.role == "assistant"
        assert got.usage.completion_tokens > 0
        pieces, finish, usage = [], None, None
        stream = oc.chat.completions.create(model="chat", messages=CONV, max_completion_tokens=12, seed=4,
                                            temperature=0.7, stream=True, stream_options={"include_usage": True})
        for chunk in stream:
            if chunk.usage:
                usage = chunk.usage
            for c in chunk.choices:
                pieces.append(c.delta.content or "")
                finish = c.finish_reason or finish
        assert "".join(pieces) == expected and finish in ("stop", "length")
        assert usage.completion_tokens == got.usage.completion_tokens
        greedy = oc.chat.completions.create(model="chat", messages=CONV, max_tokens=12, temperature=0,
                                            extra_body={"top_k": 1})
        assert greedy.choices[0].message.content == want(chat_run, max_new_tokens=12, temperature=0)[0]
        with pytest.raises(openai.BadRequestError, match="a tool message answering no call"):
            oc.chat.completions.create(model="chat", messages=[{"role": "tool", "content": "x",
                                                                "tool_call_id": "1"}])



def test_quill_serve_names_the_chat_api_for_a_chat_run(runs, monkeypatch):
    """The banner lists /v1/chat/completions for a chat model only; --help names both APIs and
    does not call every run one that quill train wrote."""
    import uvicorn

    from quillgpt.cli import build_parser
    from quillgpt.serve import serve

    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets=None: None)  # the banner, then stop
    banners = {}
    for run in runs:
        lines: list[str] = []
        serve(run.path, port=0, log=lines.append)
        banners[run.path.name] = lines[0]
    assert "(API: /v1/completions; Ctrl-C stops)" in banners["base"]
    assert "(API: /v1/completions, /v1/chat/completions; Ctrl-C stops)" in banners["chat"]
    sub = next(a for a in build_parser()._actions if hasattr(a, "choices") and a.choices and "serve" in a.choices)
    text = " ".join(sub.choices["serve"].format_help().split())
    assert "/v1/chat/completions" in text and "/v1/completions" in text
    assert "written by quill train)" not in text and "quill sft" in text


def test_completions_on_a_chat_model_never_spell_special_tokens(client, chat_run):
    """A chat model's <|end|> ends a /v1/completions choice too, and no special token (a role
    token, say) is ever rendered as its spelling."""
    from quillgpt.chat import render

    prompt = render(chat_run.tokenizer, CONV, add_generation_prompt=True).ids
    body = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 40, "seed": 1, "n": 8,
                                                "temperature": 1.5}).json()
    for choice in body["choices"]:
        assert not any(t in choice["text"] for t in CHAT_TOKENS), choice["text"]
    assert body["usage"]["completion_tokens"] > 0
