"""quill serve: the completions API in process, the official openai client against a real server,
queueing, client disconnects, every kind of bad request, and the `quill serve` command."""

from __future__ import annotations

import json
import logging
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="quill serve needs the serve extra (fastapi, uvicorn)")
pytest.importorskip("uvicorn", reason="quill serve needs the serve extra (fastapi, uvicorn)")

import httpx  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from quillgpt.checkpoint import load_run  # noqa: E402
from quillgpt.cli import main  # noqa: E402
from quillgpt.config import load_config  # noqa: E402
from quillgpt.generate import generate, generate_batch  # noqa: E402
from quillgpt.model import count_params  # noqa: E402
from quillgpt.serve import BackgroundServer, ServeSettings, create_app  # noqa: E402
from quillgpt.train import Trainer  # noqa: E402

VERSE = [
    "To be, or not to be, that is the question:",
    "Whether 'tis nobler in the mind to suffer",
    "The slings and arrows of outrageous fortune,",
    "Or to take arms against a sea of troubles",
]


def train_tiny_run(root: Path) -> Path:
    """A few training steps of a tiny GPT on verse (char tokenizer): a real run directory."""
    data = root / "verse.txt"
    data.write_text("\n".join(VERSE * 40) + "\n", encoding="utf-8")
    cfg = load_config(None, {
        "data": str(data), "out": str(root / "run"), "n_layer": 1, "n_head": 2, "n_embd": 32,
        "block_size": 32, "batch_size": 8, "max_iters": 10, "eval_interval": 5, "eval_iters": 2,
        "log_interval": 5, "warmup_iters": 2, "device": "cpu", "sample_tokens": 0,
    })
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QUILL_CACHE", str(root / "cache"))
        Trainer(cfg, progress=False, log=lambda msg: None).run()
    return root / "run"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return train_tiny_run(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def run(run_dir):
    return load_run(run_dir)


@pytest.fixture(scope="module")
def client(run):
    with TestClient(create_app(run), base_url=LOCAL) as c:
        yield c


@pytest.fixture(scope="module")
def server(run):
    """A real uvicorn server on a free loopback port, in a thread; requests may ask for up to
    LONG tokens (minutes of work), so a test can hold the worker busy until it lets go."""
    app = create_app(run, ServeSettings(max_tokens_cap=LONG))
    with BackgroundServer(app) as url:
        yield url, app.state.engine


LONG = 1_000_000
LOCAL = "http://localhost:8000"  # the server answers to localhost and IP addresses (not "testserver")
JSON = {"content-type": "application/json"}


def expected(run, prompt: str, **kw) -> str:
    return generate(run.model, run.tokenizer, prompt, **kw)


# --- in process -------------------------------------------------------------------------------

def test_completion_is_openai_shaped_and_equals_generate(client, run):
    r = client.post("/v1/completions", json={"prompt": "To be", "max_tokens": 24, "seed": 7,
                                             "temperature": 0.9, "top_k": 10, "top_p": 0.95})
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert body["model"] == "run" and isinstance(body["created"], int)
    [choice] = body["choices"]
    assert choice["index"] == 0 and choice["finish_reason"] == "length" and choice["logprobs"] is None
    assert choice["text"] == expected(run, "To be", max_new_tokens=24, seed=7, temperature=0.9,
                                      top_k=10, top_p=0.95)
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 24, "total_tokens": 29}


def test_n_choices_equal_generate_batch(client, run):
    body = client.post("/v1/completions", json={"prompt": "The", "max_tokens": 12, "seed": 3, "n": 3}).json()
    texts = [c["text"] for c in body["choices"]]
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert texts == generate_batch(run.model, run.tokenizer, ["The"] * 3, max_new_tokens=12, seed=3)
    assert len(set(texts)) > 1  # different samples, not one copied
    assert body["usage"]["completion_tokens"] == 36


def test_list_of_prompts_and_echo(client, run):
    body = client.post("/v1/completions", json={"prompt": ["To", "Or"], "max_tokens": 6, "seed": 1,
                                                "echo": True}).json()
    texts = [c["text"] for c in body["choices"]]
    assert texts[0].startswith("To") and texts[1].startswith("Or")
    assert texts[1] == "Or" + expected(run, "Or", max_new_tokens=6, seed=2)  # row 1 uses seed + 1


def test_stop_string_ends_the_text(client, run):
    greedy = expected(run, "Whe", max_new_tokens=20, temperature=0)
    stop = greedy[6:8]
    body = client.post("/v1/completions", json={"prompt": "Whe", "max_tokens": 20, "temperature": 0,
                                                "stop": stop}).json()
    [choice] = body["choices"]
    assert choice["text"] == greedy[: greedy.find(stop)]
    assert choice["finish_reason"] == "stop"


def sse_events(text: str) -> list[str]:
    return [line[len("data: "):] for line in text.split("\n\n") if line.startswith("data: ")]


def test_stream_is_sse_ending_in_done_with_usage(client, run):
    r = client.post("/v1/completions", json={"prompt": "To be", "max_tokens": 15, "seed": 11,
                                             "stream": True, "stream_options": {"include_usage": True}})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "text_completion" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    assert text == expected(run, "To be", max_new_tokens=15, seed=11)
    assert len([c for c in chunks if c["choices"] and c["choices"][0]["text"]]) >= 10  # piece by piece
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 15


def test_models_health_and_model_card(client, run, run_dir):
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["run"]
    assert client.get("/v1/models/run").json()["id"] == "run"
    assert client.get("/v1/models/gpt-4").status_code == 404
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["queue"] == 0
    card = client.get("/v1/model-card").json()
    assert card["parameters"] == count_params(run.model)
    assert card["model"]["n_layer"] == 1 and card["model"]["block_size"] == 32
    last = (run_dir / "metrics.csv").read_text().strip().splitlines()[-1].split(",")
    assert card["losses"]["step"] == int(last[0]) == 10
    assert card["losses"]["train_loss"] == pytest.approx(float(last[3]))
    assert card["losses"]["val_loss"] == pytest.approx(float(last[4]))
    # names, never where things are on this machine
    assert "path" not in card and card["data"] == "verse.txt" and card["tokenizer"] == "char"
    assert str(run_dir.parent) not in json.dumps(card)


def test_foreign_hosts_and_non_json_posts_are_refused(client, run):
    """A web page the user visits must not drive the server: not through DNS rebinding (its own
    host name in Host) nor through a cross-origin text/plain POST (no CORS preflight)."""
    ok = {"prompt": "To", "max_tokens": 2}
    r = client.post("/v1/completions", json=ok, headers={"host": "attacker.example"})
    assert r.status_code == 400 and "Host 'attacker.example'" in r.json()["error"]["message"]
    assert client.get("/v1/model-card", headers={"host": "attacker.example:8000"}).status_code == 400
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data", None):
        headers = {"content-type": content_type} if content_type else {}
        r = client.post("/v1/completions", content=json.dumps(ok).encode(), headers=headers)
        assert r.status_code == 415 and "application/json" in r.json()["error"]["message"]
    for host in ("localhost:8000", "127.0.0.1:8000", "[::1]:8000", "10.1.2.3"):
        assert client.post("/v1/completions", json=ok, headers={"host": host}).status_code == 200
    with TestClient(create_app(run, ServeSettings(allowed_hosts=("gpu-box",))), base_url="http://gpu-box") as c:
        assert c.post("/v1/completions", json=ok).status_code == 200
        assert c.get("/health", headers={"host": "localhost"}).status_code == 400


def test_extreme_but_finite_sampling_values_are_answered(client):
    for extreme in ({"temperature": 1e-45}, {"repetition_penalty": 1e-45}, {"repetition_penalty": 1e38},
                    {"top_p": 1e-300}, {"min_p": 1e-300}, {"temperature": 1e300},
                    {"temperature": 1e-45, "repetition_penalty": 1e-45, "top_p": 1e-300}):
        r = client.post("/v1/completions", json={"prompt": "To", "max_tokens": 4, "seed": 1, **extreme})
        assert r.status_code == 200, (extreme, r.text)
        assert r.json()["usage"]["completion_tokens"] == 4


def test_playground_page_is_self_contained(client):
    r = client.get("/")
    assert r.status_code == 200 and "text/html" in r.headers["content-type"]
    assert "default-src 'self'" in r.headers["content-security-policy"]
    for needle in ('id="prompt"', 'id="generate"', 'id="temperature"', 'id="top_k"', 'id="top_p"',
                   'id="max_tokens"', 'id="seed"', 'id="output"', 'id="stats"', 'id="card"'):
        assert needle in r.text
    for asset in ("/static/app.js", "/static/style.css"):
        a = client.get(asset)
        assert a.status_code == 200 and len(a.text) > 500
    # no CDN, no outside address: everything comes from this server
    for text in (r.text, client.get("/static/app.js").text, client.get("/static/style.css").text):
        assert not re.search(r"https?://|//cdn|@import", text)


BAD_REQUESTS = [
    (b"{", 400, None, "not valid JSON"),
    (b"", 400, None, "not valid JSON"),
    (b"[1, 2]", 400, None, "JSON object"),
    (b'"prompt"', 400, None, "JSON object"),
    (b"\xff\xfe{}", 400, None, "UTF-8"),
    (b'{"prompt": "To \xc3"}', 400, None, "UTF-8"),
    (b"[" * 200_000, 400, None, None),
    (b"{}", 400, "prompt", "required"),
    (b'{"max_tokens": 5}', 400, "prompt", "required"),
    (b'{"prompt": 5}', 400, "prompt", None),
    (b'{"prompt": null}', 400, "prompt", None),
    (b'{"prompt": ["a", 3]}', 400, "prompt", None),
    (b'{"prompt": []}', 400, "prompt", "empty"),
    (b'{"prompt": "To", "max_tokens": 0}', 400, "max_tokens", None),
    (b'{"prompt": "To", "max_tokens": -3}', 400, "max_tokens", None),
    (b'{"prompt": "To", "max_tokens": 2049}', 400, "max_tokens", "at most 2048"),
    (b'{"prompt": "To", "max_tokens": 1e400}', 400, "max_tokens", None),
    (b'{"prompt": "To", "max_tokens": 123456789012345678901234567890}', 400, "max_tokens", "at most"),
    (b'{"prompt": "To", "max_tokens": "10"}', 400, "max_tokens", None),
    (b'{"prompt": "To", "max_tokens": 10.5}', 400, "max_tokens", None),
    (b'{"prompt": "To", "max_tokens": true}', 400, "max_tokens", None),
    (b'{"prompt": "To", "temperature": -1}', 400, "temperature", None),
    (b'{"prompt": "To", "temperature": "hot"}', 400, "temperature", None),
    (b'{"prompt": "To", "temperature": NaN}', 400, "temperature", "finite"),
    (b'{"prompt": "To", "temperature": Infinity}', 400, "temperature", "finite"),
    (b'{"prompt": "To", "top_p": 0}', 400, "top_p", None),
    (b'{"prompt": "To", "top_p": 1.5}', 400, "top_p", None),
    (b'{"prompt": "To", "top_k": -1}', 400, "top_k", None),
    (b'{"prompt": "To", "top_k": 2.5}', 400, "top_k", None),
    (b'{"prompt": "To", "seed": -1}', 400, "seed", None),
    (b'{"prompt": "To", "seed": 99999999999999999999999}', 400, "seed", None),
    (b'{"prompt": "To", "n": 0}', 400, "n", None),
    (b'{"prompt": "To", "n": 17}', 400, "n", "at most 16"),
    (b'{"prompt": "To", "stream": "yes"}', 400, "stream", None),
    (b'{"prompt": "To", "stop": 5}', 400, "stop", None),
    (b'{"prompt": "To", "stop": [""]}', 400, "stop", "empty"),
    (b'{"prompt": "To", "stop": ["a", "b", "c", "d", "e"]}', 400, "stop", "at most 4"),
    (b'{"prompt": "To", "stop": ["' + b"x" * 300 + b'"]}', 400, "stop", "at most 256"),
    (b'{"prompt": "To", "stop": ' + json.dumps([f"s{i}" for i in range(15000)]).encode() + b"}", 400, "stop",
     "at most 4"),
    (b'{"prompt": "To", "model": "' + b"m" * 100_000 + b'"}', 404, "model", "not found"),
    (b'{"prompt": "To", "logprobs": 6}', 400, "logprobs", "less than or equal to 5"),
    (b'{"prompt": "To", "logprobs": -1}', 400, "logprobs", None),
    (b'{"prompt": "To", "logprobs": "2"}', 400, "logprobs", None),
    (b'{"prompt": "To", "logprobs": true}', 400, "logprobs", None),
    (b'{"prompt": [1, 2, 99]}', 400, "prompt", "outside the vocabulary"),
    (b'{"prompt": [[1, 2], [-1]]}', 400, "prompt", "outside the vocabulary"),
    (b'{"prompt": [1, [2]]}', 400, "prompt", None),
    (b'{"prompt": [[1, 2], "To"]}', 400, "prompt", None),
    (b'{"prompt": [' + b"1, " * 32 + b'1]}', 400, "prompt", "context of 32"),
    (b'{"prompt": "To", "max_tokens": 0, "echo": false}', 400, "max_tokens", "echo"),
    (b'{"prompt": "To \\u20ac"}', 400, "prompt", "vocabulary"),
    (b'{"prompt": "' + b"a" * 33 + b'"}', 400, "prompt", "context of 32"),
    (b'{"prompt": "To", "model": "gpt-4"}', 404, "model", "not found"),
]


@pytest.mark.parametrize("body,status,param,fragment", BAD_REQUESTS)
def test_bad_requests_get_json_errors(client, body, status, param, fragment):
    r = client.post("/v1/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param
    if fragment:
        assert fragment in err["message"]


def test_body_too_large_is_413_with_or_without_content_length(client):
    big = b'{"prompt": "' + b"a" * (1 << 20) + b'"}'
    r = client.post("/v1/completions", content=big, headers=JSON)
    assert r.status_code == 413 and "larger than" in r.json()["error"]["message"]

    def chunked():  # no Content-Length: the server counts as it reads
        for i in range(0, len(big), 65536):
            yield big[i : i + 65536]

    r = client.post("/v1/completions", content=chunked(), headers=JSON)
    assert r.status_code == 413 and "error" in r.json()


def test_unknown_routes_and_methods_are_json_errors(client):
    r = client.get("/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    r = client.get("/v1/completions")
    assert r.status_code == 405 and "error" in r.json()


def test_small_limits_are_enforced(run):
    settings = ServeSettings(max_tokens_cap=8, max_batch=2, max_body_bytes=100)
    with TestClient(create_app(run, settings), base_url=LOCAL) as c:
        assert c.post("/v1/completions", json={"prompt": "To", "max_tokens": 9}).status_code == 400
        assert c.post("/v1/completions", json={"prompt": "To", "max_tokens": 8}).status_code == 200
        assert c.post("/v1/completions", json={"prompt": ["To", "Or"], "n": 2}).status_code == 400
        assert c.post("/v1/completions", json={"prompt": "T" * 120}).status_code == 413


# --- a real server ----------------------------------------------------------------------------

def test_openai_client_completion_and_stream(server, run):
    openai = pytest.importorskip("openai")
    url, _ = server
    oc = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    want = expected(run, "To be", max_new_tokens=20, seed=5, temperature=0.8, top_p=0.9)
    got = oc.completions.create(model="run", prompt="To be", max_tokens=20, seed=5, temperature=0.8,
                                top_p=0.9)
    assert got.choices[0].text == want
    assert got.choices[0].finish_reason == "length"
    assert got.usage.completion_tokens == 20 and got.usage.prompt_tokens == 5
    pieces = []
    for chunk in oc.completions.create(model="run", prompt="To be", max_tokens=20, seed=5,
                                       temperature=0.8, top_p=0.9, stream=True):
        pieces += [c.text for c in chunk.choices]
    assert "".join(pieces) == want and len([p for p in pieces if p]) > 5
    models = oc.models.list()
    assert [m.id for m in models.data] == ["run"]
    # top_k (not an OpenAI parameter) goes through extra_body
    got = oc.completions.create(model="run", prompt="To", max_tokens=10, seed=2, extra_body={"top_k": 1})
    assert got.choices[0].text == expected(run, "To", max_new_tokens=10, seed=2, top_k=1)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        oc.completions.create(model="run", prompt="To", max_tokens=0)


def test_concurrent_requests_are_queued_and_each_gets_its_own_answer(server, run):
    url, _ = server
    results: dict[int, str] = {}
    errors: list[str] = []

    def ask(seed: int) -> None:
        try:
            r = httpx.post(f"{url}/v1/completions", json={"prompt": "Or", "max_tokens": 30, "seed": seed,
                                                          "stream": seed % 2 == 0}, timeout=60)
            r.raise_for_status()
            if seed % 2:
                results[seed] = r.json()["choices"][0]["text"]
            else:
                results[seed] = "".join(json.loads(e)["choices"][0]["text"] for e in sse_events(r.text)[:-1]
                                        if json.loads(e)["choices"])
        except Exception as e:  # collected: an assert in a thread would go unseen
            errors.append(repr(e))

    threads = [threading.Thread(target=ask, args=(seed,)) for seed in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert results == {seed: expected(run, "Or", max_new_tokens=30, seed=seed) for seed in range(12)}


def wait_until(predicate, timeout: float = 600.0) -> None:
    """Poll until `predicate()` holds; the deadline only stops a hang (no speed is asserted)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_requests_with_mixed_settings_join_the_running_batch(server, run):
    """Continuous batching: while one long request decodes, requests with other settings join
    it at the next token and finish first; each equals what it would get alone."""
    url, engine = server
    wait_until(lambda: engine.pending == 0)
    settings = [dict(temperature=0.9, top_k=12), dict(temperature=0.0), dict(temperature=1.2, top_p=0.8),
                dict(temperature=0.7, min_p=0.1, repetition_penalty=1.3), dict(temperature=1.0)]
    asks = [{"prompt": p, "max_tokens": m, "seed": 100 + k, "n": n, **settings[k]}
            for k, (p, m, n) in enumerate([("To", 5, 1), ("Whether 'tis", 30, 2), ("", 12, 1),
                                           ("The slings", 20, 1), ("O", 1, 3)])]
    answers: dict[int, dict] = {}
    with httpx.Client(timeout=60) as c:
        with c.stream("POST", f"{url}/v1/completions",
                      json={"prompt": "To", "max_tokens": LONG, "temperature": 0.5, "stream": True}) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            threads = [threading.Thread(target=lambda k=k, a=a: answers.__setitem__(
                k, httpx.post(f"{url}/v1/completions", json=a, timeout=60).json())) for k, a in enumerate(asks)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert engine.pending == 1  # every ask was answered while the long request still ran
            assert json.loads(next(x for x in lines if x.startswith("data: "))[6:])["choices"][0]["text"]
    for k, a in enumerate(asks):
        want = generate_batch(run.model, run.tokenizer, [a["prompt"]] * a["n"], max_new_tokens=a["max_tokens"],
                              seed=a["seed"], **settings[k])
        assert [c["text"] for c in answers[k]["choices"]] == want
        assert answers[k]["usage"]["completion_tokens"] == a["max_tokens"] * a["n"]


def test_event_loop_answers_while_generating_and_disconnect_frees_the_slot(server):
    url, engine = server
    wait_until(lambda: engine.pending == 0)
    cancelled, tokens = engine.cancelled, engine.tokens
    with httpx.Client(timeout=60) as c:
        with c.stream("POST", f"{url}/v1/completions",
                      json={"prompt": "To", "max_tokens": LONG, "stream": True}) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            # generation is running on the worker; the event loop still answers
            health = httpx.get(f"{url}/health", timeout=10).json()
            assert health["queue"] == 1
        # leaving the block closed the connection mid-stream
    wait_until(lambda: engine.pending == 0)
    assert engine.cancelled == cancelled + 1
    assert engine.tokens - tokens < LONG  # stopped early
    assert httpx.post(f"{url}/v1/completions", json={"prompt": "To", "max_tokens": 3},
                      timeout=30).status_code == 200


def test_non_streaming_client_that_leaves_is_cancelled(server):
    url, engine = server
    wait_until(lambda: engine.pending == 0)
    cancelled, tokens = engine.cancelled, engine.tokens
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps({"prompt": "To", "max_tokens": LONG}).encode()
    with socket.create_connection((host, int(port))) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n" % len(body) + body)
        wait_until(lambda: engine.pending == 1 and engine.tokens > tokens)
    wait_until(lambda: engine.pending == 0)
    assert engine.cancelled == cancelled + 1
    assert engine.tokens - tokens < LONG


def test_full_queue_answers_503(run):
    app = create_app(run, ServeSettings(max_queue=1, max_tokens_cap=LONG))
    engine = app.state.engine
    with BackgroundServer(app) as url, httpx.Client(timeout=60) as c:
        with c.stream("POST", f"{url}/v1/completions",
                      json={"prompt": "To", "max_tokens": LONG, "stream": True}) as r:
            lines = r.iter_lines()  # kept: a dropped iterator closes the stream
            assert next(lines).startswith("data: ")
            busy = httpx.post(f"{url}/v1/completions", json={"prompt": "To"}, timeout=10)
            assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
            assert busy.json()["error"]["type"] == "server_busy"
        wait_until(lambda: engine.pending == 0)
        assert httpx.post(f"{url}/v1/completions", json={"prompt": "To"}, timeout=30).status_code == 200


# --- the command ------------------------------------------------------------------------------

def test_quill_serve_bad_input_is_one_line_exit_2(tmp_path, run_dir, capsys):
    assert main(["serve", str(tmp_path / "missing"), "--port", "0"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"quill: error: run directory not found: {tmp_path / 'missing'}"]
    assert main(["serve", str(run_dir), "--port", "70000"]) == 2
    assert capsys.readouterr().err.splitlines() == ["quill: error: --port must be in 0..65535, got 70000"]
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        assert main(["serve", str(run_dir), "--port", str(port)]) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith(f"quill: error: cannot listen on 127.0.0.1:{port}: ")


def test_quill_serve_end_to_end(run_dir, run):
    proc = subprocess.Popen([sys.executable, "-m", "quillgpt.cli", "serve", str(run_dir), "--port", "0",
                             "--device", "cpu", "--log-level", "warning"],
                            stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()
        m = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
        assert m, line
        url = f"http://127.0.0.1:{m.group(1)}"
        wait_until(lambda: _up(url))
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "To be", "max_tokens": 10, "seed": 4},
                       timeout=30)
        assert r.json()["choices"][0]["text"] == expected(run, "To be", max_new_tokens=10, seed=4)
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl-C: a clean shutdown, exit status 0
        assert proc.wait(timeout=30) == 0
        assert "server stopped" in proc.stderr.read()
        proc.stderr.close()


def _up(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_metrics_are_prometheus_text(client):
    before = client.get("/metrics")
    assert before.status_code == 200 and before.headers["content-type"].startswith("text/plain; version=0.0.4")
    client.post("/v1/completions", json={"prompt": "To", "max_tokens": 5, "seed": 1, "n": 2})
    families: dict[str, str] = {}
    values: dict[str, float] = {}
    for line in client.get("/metrics").text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            families[name] = kind
        elif line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    assert families["quill_generated_tokens_total"] == "counter" and families["quill_running_rows"] == "gauge"
    assert families["quill_time_to_first_token_seconds"] == "histogram"
    assert values["quill_generated_tokens_total"] >= 10 and values["quill_queue_depth"] == 0
    for h in ("quill_time_to_first_token_seconds", "quill_time_per_output_token_seconds"):
        buckets = [v for k, v in values.items() if k.startswith(h + "_bucket")]
        assert buckets == sorted(buckets) and buckets[-1] == values[h + "_count"] >= 1
        assert values[h + "_sum"] > 0
    assert values["quill_time_per_output_token_seconds_count"] >= 8  # 2 choices x 4 gaps


def test_kv_cache_budget_caps_the_rows(run):
    per_row = 2 * run.config.model.n_layer * run.config.model.block_size * run.config.model.n_embd * 4
    app = create_app(run, ServeSettings(kv_cache_mb=3 * per_row / 2**20))
    assert app.state.engine.decoder.max_rows == 3
    with TestClient(app, base_url=LOCAL) as c:
        body = c.post("/v1/completions", json={"prompt": "To", "max_tokens": 6, "seed": 5, "n": 7}).json()
    assert [ch["text"] for ch in body["choices"]] == generate_batch(run.model, run.tokenizer, ["To"] * 7,
                                                                    max_new_tokens=6, seed=5)


def test_a_failed_step_is_logged_answered_and_the_server_goes_on(run, caplog, monkeypatch):
    app = create_app(run)
    engine = app.state.engine

    def broken():
        raise RuntimeError("device on fire")

    with TestClient(app, base_url=LOCAL) as c:
        monkeypatch.setattr(engine.decoder, "step", broken)
        with caplog.at_level(logging.ERROR, logger="quillgpt.serve"):
            r = c.post("/v1/completions", json={"prompt": "To", "max_tokens": 3})
        assert r.status_code == 500 and "device on fire" in r.json()["error"]["message"]
        [record] = [rec for rec in caplog.records if rec.name == "quillgpt.serve"]
        assert record.exc_info and "device on fire" in str(record.exc_info[1])  # with its traceback
        again = c.post("/v1/completions", json={"prompt": "To", "max_tokens": 3, "seed": 2})
        assert again.status_code == 200
        assert again.json()["choices"][0]["text"] == expected(run, "To", max_new_tokens=3, seed=2)


@pytest.mark.parametrize("stream", [False, True])
def test_a_lone_surrogate_is_400_whatever_the_tokenizer(tmp_path, stream):
    """"\ud800" is not valid Unicode: every run answers 400 naming the field, also a syllable run
    (whose catch-all token would take it) with echo, streamed or not."""
    data = tmp_path / "verse.txt"
    data.write_text("\n".join(VERSE * 20) + "\n", encoding="utf-8")
    cfg = load_config(None, {"data": str(data), "out": str(tmp_path / "run"), "n_layer": 1, "n_head": 2,
                             "n_embd": 16, "block_size": 16, "batch_size": 4, "max_iters": 1, "eval_iters": 1,
                             "device": "cpu", "sample_tokens": 0, "tokenizer": "syllable"})
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QUILL_CACHE", str(tmp_path / "cache"))
        Trainer(cfg, progress=False, log=lambda msg: None).run()
    with TestClient(create_app(load_run(tmp_path / "run")), base_url=LOCAL) as c:
        for body in (b'{"prompt": "To \\ud800", "echo": true, "max_tokens": 1, "stream": %s}',
                     b'{"prompt": ["To", "be"], "stop": ["\\udfff"], "stream": %s}'):
            r = c.post("/v1/completions", content=body % (b"true" if stream else b"false"), headers=JSON)
            assert r.status_code == 400, r.text
            assert "lone surrogate" in r.json()["error"]["message"] and r.json()["error"]["param"] in {"prompt", "stop"}
        r = c.post("/v1/completions", json={"prompt": "To", "max_tokens": 2, "echo": True}, headers=JSON)
        assert r.status_code == 200 and r.json()["choices"][0]["text"].startswith("To")


def test_idle_and_half_sent_connections_never_starve_the_server(run, caplog):
    """Connections that never send a whole request are closed after the read timeout, and at the
    connection cap the longest-waiting one makes room: normal requests are answered all along,
    with no traceback (60 half-sent requests against a cap of 20 here)."""
    from quillgpt.serve import BackgroundServer

    app = create_app(run, ServeSettings(read_timeout_s=2, max_connections=20))
    with BackgroundServer(app) as url:
        host, port = url.removeprefix("http://").split(":")
        held = []
        for i in range(60):
            s = socket.create_connection((host, int(port)))
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\n" if i % 2 else
                      b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 1000\r\n\r\n{\"prompt\": ")
            held.append(s)
        for _ in range(3):  # at the cap: a new connection is served, a waiting one makes room
            r = httpx.post(url + "/v1/completions", json={"prompt": "To", "max_tokens": 2}, headers=JSON,
                           timeout=60)
            assert r.status_code == 200, r.text
        for s in held:  # every half-sent request ends closed, unanswered: evicted at once, or after 2 s
            s.settimeout(60)
            received = b""
            try:
                while chunk := s.recv(1024):
                    received += chunk
            except ConnectionResetError:
                pass
            s.close()
            assert received == b"", received[:200]
    assert not [r for r in caplog.records if r.exc_info or "Traceback" in r.getMessage()]
