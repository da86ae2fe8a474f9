"""Logprobs over the chat API: /v1/chat/completions with `logprobs: true` and `top_logprobs`, in
OpenAI's newer shape (`choices[i].logprobs.content`), checked against the model's own forward
pass; streamed chunks add up to the whole; `bytes` are each token's UTF-8 bytes; the official
openai client reads them; bad values are 400 JSON."""

from __future__ import annotations

import json

import pytest
import torch
from torch.nn import functional as F

pytest.importorskip("fastapi", reason="quill serve needs the serve extra (fastapi, uvicorn)")

from conftest import make_any_run  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from quillgpt import checkpoint as ckpt  # noqa: E402
from quillgpt.chat import CHAT_TOKENS, render  # noqa: E402
from quillgpt.config import ModelConfig  # noqa: E402
from quillgpt.serve import BackgroundServer, create_app  # noqa: E402
from quillgpt.tokenizers.bpe import ByteBPETokenizer  # noqa: E402
from quillgpt.tokenizers.char import CharTokenizer  # noqa: E402

TEXT = ("Über die Brücke gehn wir, für dich, müde Grüße — naïve café, señor. "
        "Shall I compare thee to a summer's day? Thou art more lovely and more temperate.\n") * 20
CONV = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "Grüße, señor"}]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A byte-level BPE chat model (random weights): small enough that many of its tokens are
    single bytes, pieces of a character (ü is two bytes)."""
    tok = ByteBPETokenizer.train(TEXT, 300).with_special_tokens(CHAT_TOKENS)
    path = make_any_run(tmp_path_factory.mktemp("chat-lp") / "run",
                        ModelConfig(block_size=128, n_layer=2, n_head=2, n_embd=32), tok)
    return ckpt.load_run(path)


@pytest.fixture(scope="module")
def client(run):
    with TestClient(create_app(run), base_url="http://localhost:8000") as c:
        yield c


def post(client, **body) -> dict:
    r = client.post("/v1/chat/completions", json={"messages": CONV, **body})
    assert r.status_code == 200, r.text
    return r.json()


def position_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log p(token | tokens before it) under one plain forward pass: (len(ids) - 1, vocab)."""
    with torch.no_grad():
        return F.log_softmax(model(torch.tensor([ids[:-1]]))[0][0].float(), dim=-1)


def ids_of(run, content: list[dict]) -> list[int]:
    """The token ids of a reply's logprobs entries, by their bytes (unique for ordinary tokens)."""
    tok = run.tokenizer
    specials = set(tok.special_tokens.values())
    by_bytes = {tok.decode_bytes([i]): i for i in range(tok.vocab_size) if i not in specials}
    assert len(by_bytes) == tok.vocab_size - len(specials)
    return [by_bytes[bytes(e["bytes"])] for e in content]


def written(raw: bytes) -> str:
    """How a token is written: its text, or (a piece of a character) its bytes escaped."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "".join(f"\\x{b:02x}" for b in raw)


def test_reply_logprobs_are_the_models_own_log_softmax(client, run):
    """Sampled at temperature 1.3 and top-k 8, each token's logprob and its top 5 are still the
    model's plain distribution at that place (a forward pass over prompt + reply)."""
    body = post(client, max_tokens=14, temperature=1.3, top_k=8, seed=5, n=2, logprobs=True, top_logprobs=5)
    prompt = render(run.tokenizer, CONV, add_generation_prompt=True).ids
    listed = 0
    for choice in body["choices"]:
        lp = choice["logprobs"]
        assert set(lp) == {"content", "refusal"} and lp["refusal"] is None
        content = lp["content"]
        assert all(set(e) == {"token", "logprob", "bytes", "top_logprobs"} for e in content)
        new = ids_of(run, content)
        # the reply is exactly these tokens (the one ending it, <|end|>, is not listed)
        assert run.tokenizer.decode(new) == choice["message"]["content"]
        listed += len(new) + (choice["finish_reason"] == "stop")
        expected = position_logprobs(run.model, prompt + new)
        for k, (entry, token) in enumerate(zip(content, new)):
            row = expected[len(prompt) - 1 + k]
            assert entry["logprob"] == pytest.approx(float(row[token]), abs=1e-5)
            best = row.topk(5)
            assert [t["logprob"] for t in entry["top_logprobs"]] == pytest.approx(best.values.tolist(), abs=1e-5)
            assert [t["token"] for t in entry["top_logprobs"]] == [
                written(run.tokenizer.decode_bytes([int(i)])) for i in best.indices]
    assert listed == body["usage"]["completion_tokens"]


def test_the_token_that_ends_a_reply_is_not_listed(run):
    """A model that ends a reply a quarter of the time: the replies that end with <|end|> list
    every token but that one (it is sampled and counted in usage, not part of the content)."""
    from quillgpt.chat import END_TOKEN
    from quillgpt.model import GPT

    end = run.tokenizer.special_tokens[END_TOKEN]

    class EndsOften(GPT):
        def forward(self, idx, targets=None, cache=None):
            logits, loss = super().forward(idx, targets, cache)
            others = torch.cat([logits[..., :end], logits[..., end + 1:]], dim=-1).logsumexp(-1)
            logits[..., end] = others + torch.log(torch.tensor(1 / 3))  # p(<|end|>) = 1/4
            return logits, loss

    ending = ckpt.load_run(run.path)
    ending.model.__class__ = EndsOften
    with TestClient(create_app(ending), base_url="http://localhost:8000") as c:
        body = post(c, max_tokens=30, seed=7, n=6, logprobs=True, top_logprobs=1)
    prompt = render(run.tokenizer, CONV, add_generation_prompt=True).ids
    finishes = [choice["finish_reason"] for choice in body["choices"]]
    assert "stop" in finishes
    listed = 0
    for choice in body["choices"]:
        content = choice["logprobs"]["content"]
        new = ids_of(run, content)  # every listed token is an ordinary one
        assert run.tokenizer.decode(new) == choice["message"]["content"]
        listed += len(new) + (choice["finish_reason"] == "stop")
        expected = position_logprobs(ending.model, prompt + new)
        for k, (entry, token) in enumerate(zip(content, new)):
            assert entry["logprob"] == pytest.approx(float(expected[len(prompt) - 1 + k, token]), abs=1e-5)
        assert all(e["token"] != END_TOKEN for e in content)
    assert listed == body["usage"]["completion_tokens"]


def test_greedy_tokens_are_the_most_likely(client):
    body = post(client, max_tokens=12, temperature=0, logprobs=True, top_logprobs=3)
    content = body["choices"][0]["logprobs"]["content"]
    assert content
    for entry in content:
        assert len(entry["top_logprobs"]) == 3
        assert entry["top_logprobs"][0]["token"] == entry["token"]
        assert entry["top_logprobs"][0]["bytes"] == entry["bytes"]
        assert entry["logprob"] == pytest.approx(entry["top_logprobs"][0]["logprob"])
        assert entry["logprob"] <= 0


def test_bytes_are_each_tokens_utf8_bytes(client, run):
    """`bytes` is the token's own bytes; a piece of a character is written escaped, and the
    pieces' bytes join into the reply."""
    body = post(client, max_tokens=30, temperature=1.0, seed=2, logprobs=True, top_logprobs=20)
    choice = body["choices"][0]
    entries = [e for entry in choice["logprobs"]["content"] for e in [entry, *entry["top_logprobs"]]]
    for e in entries:
        assert e["token"] == written(bytes(e["bytes"]))
    assert any(e["token"].startswith("\\x") for e in entries)  # pieces of characters were listed
    joined = b"".join(bytes(e["bytes"]) for e in choice["logprobs"]["content"])
    assert joined.decode("utf-8", errors="replace") == choice["message"]["content"]
    for entry in choice["logprobs"]["content"]:
        assert len(entry["top_logprobs"]) == 20
        lps = [t["logprob"] for t in entry["top_logprobs"]]
        assert lps == sorted(lps, reverse=True)  # most likely first


def test_logprobs_without_top_logprobs_lists_no_alternatives(client):
    body = post(client, max_tokens=6, seed=1, logprobs=True)
    content = body["choices"][0]["logprobs"]["content"]
    assert content and all(e["top_logprobs"] == [] for e in content)
    assert post(client, max_tokens=6, seed=1, logprobs=False)["choices"][0]["logprobs"] is None
    assert post(client, max_tokens=6, seed=1)["choices"][0]["logprobs"] is None


def test_streamed_logprobs_add_up_to_the_whole(client):
    request = {"messages": CONV, "max_tokens": 16, "temperature": 0.9, "seed": 11, "n": 2,
               "logprobs": True, "top_logprobs": 4}
    whole = client.post("/v1/chat/completions", json=request).json()
    with client.stream("POST", "/v1/chat/completions", json={**request, "stream": True}) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    texts, merged = ["", ""], [[], []]
    for chunk in chunks:
        for c in chunk["choices"]:
            texts[c["index"]] += c["delta"].get("content", "")
            if c["logprobs"] is not None:
                assert c["logprobs"]["refusal"] is None and c["logprobs"]["content"]
                merged[c["index"]] += c["logprobs"]["content"]
    assert all(c["logprobs"] is None for c in chunks[0]["choices"])  # the role chunk
    for i, choice in enumerate(whole["choices"]):
        assert texts[i] == choice["message"]["content"]
        content = choice["logprobs"]["content"]
        assert [e["token"] for e in merged[i]] == [e["token"] for e in content]
        assert [e["bytes"] for e in merged[i]] == [e["bytes"] for e in content]
        for a, b in zip(merged[i], content):
            assert a["logprob"] == pytest.approx(b["logprob"], abs=1e-5)
            assert [t["token"] for t in a["top_logprobs"]] == [t["token"] for t in b["top_logprobs"]]


BAD = [
    ({"top_logprobs": 3}, "top_logprobs", "needs logprobs: true"),
    ({"logprobs": False, "top_logprobs": 3}, "top_logprobs", "needs logprobs: true"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs", "less than or equal to 20"),
    ({"logprobs": True, "top_logprobs": -1}, "top_logprobs", "greater than or equal to 0"),
    ({"logprobs": True, "top_logprobs": "5"}, "top_logprobs", None),
    ({"logprobs": True, "top_logprobs": 2.5}, "top_logprobs", None),
    ({"logprobs": True, "top_logprobs": True}, "top_logprobs", None),
    ({"logprobs": "yes"}, "logprobs", None),
    ({"logprobs": 1}, "logprobs", None),
    ({"logprobs": 5}, "logprobs", None),  # the legacy API's integer is not the chat API's boolean
]


@pytest.mark.parametrize("extra,param,fragment", BAD)
def test_bad_logprobs_values_get_400_json(client, extra, param, fragment):
    r = client.post("/v1/chat/completions", json={"messages": CONV, "max_tokens": 4, **extra})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["param"] == param
    assert err["type"] == "invalid_request_error"
    if fragment:
        assert fragment in err["message"]


def test_top_logprobs_is_at_most_the_vocabulary(tmp_path):
    """A model with fewer than 20 tokens cannot list 20 alternatives: 400, saying how many."""
    tok = CharTokenizer.train("ab ").with_special_tokens(CHAT_TOKENS)
    run = ckpt.load_run(make_any_run(tmp_path / "tiny", ModelConfig(block_size=32, n_layer=1, n_head=1,
                                                                   n_embd=8), tok))
    vocab = tok.vocab_size
    assert vocab < 20
    with TestClient(create_app(run), base_url="http://localhost:8000") as c:
        body = {"messages": [{"role": "user", "content": "ab ba"}], "max_tokens": 3, "logprobs": True}
        r = c.post("/v1/chat/completions", json={**body, "top_logprobs": vocab + 1})
        assert r.status_code == 400
        err = r.json()["error"]
        assert err["param"] == "top_logprobs" and f"at most {vocab}" in err["message"]
        r = c.post("/v1/chat/completions", json={**body, "top_logprobs": vocab, "seed": 0})
        assert r.status_code == 200, r.text
        for entry in r.json()["choices"][0]["logprobs"]["content"]:
            lps = [t["logprob"] for t in entry["top_logprobs"]]
            assert len(lps) == vocab and sum(torch.tensor(lps).exp().tolist()) == pytest.approx(1, abs=1e-4)


def test_the_openai_client_reads_chat_logprobs(run):
    openai = pytest.importorskip("openai")
    with BackgroundServer(create_app(run)) as url:
        oc = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        got = oc.chat.completions.create(model="run", messages=CONV, max_tokens=10, seed=3, temperature=0.8,
                                         logprobs=True, top_logprobs=2)
        content = got.choices[0].logprobs.content
        assert content and all(len(e.top_logprobs) == 2 for e in content)
        assert b"".join(bytes(e.bytes) for e in content).decode("utf-8", "replace") == got.choices[0].message.content
        streamed = []
        for chunk in oc.chat.completions.create(model="run", messages=CONV, max_tokens=10, seed=3, temperature=0.8,
                                                logprobs=True, top_logprobs=2, stream=True):
            for c in chunk.choices:
                if c.logprobs is not None:
                    streamed += c.logprobs.content
        assert [(e.token, e.bytes) for e in streamed] == [(e.token, e.bytes) for e in content]
        assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in content], abs=1e-5)
        with pytest.raises(openai.BadRequestError, match="top_logprobs"):
            oc.chat.completions.create(model="run", messages=CONV, logprobs=True, top_logprobs=21)
        with pytest.raises(openai.BadRequestError, match="needs logprobs"):
            oc.chat.completions.create(model="run", messages=CONV, top_logprobs=2)
