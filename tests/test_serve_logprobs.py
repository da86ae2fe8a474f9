"""Logprobs over the API: /v1/completions with `logprobs`, `echo`, `max_tokens: 0`, token-id
prompts and streaming, checked against the model's own forward pass; and lm-evaluation-harness's
`local-completions` model against a real `quill serve` on loopback, which must get the numbers
`quill eval --tasks` gets in process."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from torch.nn import functional as F

pytest.importorskip("fastapi", reason="quill serve needs the serve extra (fastapi, uvicorn)")

from conftest import LM_EVAL_TASKS, make_any_run, task_text  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from quillgpt import checkpoint as ckpt  # noqa: E402
from quillgpt.config import ModelConfig  # noqa: E402
from quillgpt.serve import BackgroundServer, create_app  # noqa: E402
from quillgpt.serve.logprobs import token_text  # noqa: E402
from quillgpt.tokenizers.bpe import ByteBPETokenizer  # noqa: E402

pytestmark = pytest.mark.usefixtures("offline")  # any connection to another host fails the test
BLOCK = 512  # every offline task's request fits: the API and in-process see the same context


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from quillgpt.hf import export_hf

    root = tmp_path_factory.mktemp("served")
    tok = ByteBPETokenizer.train(task_text(), 320)
    run_dir = make_any_run(root / "run", ModelConfig(block_size=BLOCK, n_layer=2, n_head=2, n_embd=32), tok)
    export_hf(run_dir, root / "hf")
    return run_dir, root / "hf"


@pytest.fixture(scope="module")
def run(exported):
    return ckpt.load_run(exported[0])


@pytest.fixture(scope="module")
def client(run):
    with TestClient(create_app(run), base_url="http://localhost:8000") as c:
        yield c


def position_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log p(token | tokens before it) under one plain forward pass: (len(ids) - 1, vocab)."""
    with torch.no_grad():
        return F.log_softmax(model(torch.tensor([ids[:-1]]))[0][0].float(), dim=-1)


def post(client, **body) -> dict:
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def test_echo_with_max_tokens_0_scores_token_id_prompts(client, run):
    tok = run.tokenizer
    prompts = [tok.encode("Shall I compare thee to a summer's day?"), tok.encode("Rough winds do shake"),
               tok.encode("So")]
    body = post(client, prompt=prompts, max_tokens=0, echo=True, logprobs=3)
    assert body["usage"]["completion_tokens"] == 0
    for ids, choice in zip(prompts, body["choices"]):
        lp = choice["logprobs"]
        assert choice["text"] == tok.decode(ids) and choice["finish_reason"] == "length"
        assert lp["tokens"] == [tok.decode([i]) for i in ids]
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        assert lp["text_offset"] == [len(tok.decode(ids[:k])) for k in range(len(ids))]
        if len(ids) == 1:
            continue
        expected = position_logprobs(run.model, ids)
        for k, token in enumerate(ids[1:]):
            assert lp["token_logprobs"][k + 1] == pytest.approx(float(expected[k, token]), abs=1e-5)
            top = lp["top_logprobs"][k + 1]
            best = expected[k].topk(3)
            assert 3 <= len(top) <= 4 and max(top.values()) == pytest.approx(float(best.values[0]), abs=1e-5)
            assert {token_text(tok, int(i)) for i in best.indices} <= set(top)
            assert tok.decode([token]) in top  # the scored token is always listed


def test_a_piece_of_a_character_is_written_as_bytes(client, run):
    ids = run.tokenizer.encode("\u00fc\u00fc")  # ü: two bytes, each its own token in this small BPE
    assert run.tokenizer.decode_bytes(ids[:1]) == b"\xc3"
    lp = post(client, prompt=ids, max_tokens=0, echo=True, logprobs=5)["choices"][0]["logprobs"]
    assert lp["tokens"][:2] == ["bytes:\\xc3", "bytes:\\xbc"]
    assert all(len(top) >= 5 for top in lp["top_logprobs"][1:])  # byte tokens do not collide


def test_generated_tokens_carry_the_models_own_logprobs(client, run):
    """Sampled at temperature 1.5 and top_k 5, each token's logprob is still the model's plain
    distribution at that place."""
    prompt = "When in disgrace with fortune"
    body = post(client, prompt=prompt, max_tokens=6, temperature=1.5, top_k=5, seed=3, logprobs=2)
    lp = body["choices"][0]["logprobs"]
    ids = run.tokenizer.encode(prompt)
    by_text: dict[str, list[int]] = {}
    for i in range(run.tokenizer.vocab_size):
        by_text.setdefault(token_text(run.tokenizer, i), []).append(i)
    assert all(len(by_text[t]) == 1 for t in lp["tokens"])  # each token string names one id
    new = [by_text[t][0] for t in lp["tokens"]]
    assert len(new) == body["usage"]["completion_tokens"] == 6
    expected = position_logprobs(run.model, ids + new)
    for k, token in enumerate(new):
        assert lp["token_logprobs"][k] == pytest.approx(float(expected[len(ids) - 1 + k, token]), abs=1e-5)
    assert lp["text_offset"][0] == 0 and run.tokenizer.decode(new) == body["choices"][0]["text"]
    # greedy: every token is the most likely one
    greedy = post(client, prompt=prompt, max_tokens=6, temperature=0, logprobs=1)["choices"][0]["logprobs"]
    assert all(t == pytest.approx(max(top.values())) for t, top in zip(greedy["token_logprobs"],
                                                                        greedy["top_logprobs"]))


def test_streaming_logprobs_add_up_to_the_whole(client):
    request = dict(prompt="Let me not to the marriage", max_tokens=8, temperature=0.9, seed=11, logprobs=2,
                   echo=True)
    whole = post(client, **request)["choices"][0]
    with client.stream("POST", "/v1/completions", json={**request, "stream": True}) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    text, merged = "", {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for event in events:
        for choice in event["choices"]:
            text += choice["text"]
            for key, values in (choice["logprobs"] or {}).items():
                merged[key] += values
    assert text == whole["text"]
    assert merged["tokens"] == whole["logprobs"]["tokens"]
    assert merged["text_offset"] == whole["logprobs"]["text_offset"]
    assert merged["token_logprobs"][0] is None
    for a, b in zip(merged["token_logprobs"][1:], whole["logprobs"]["token_logprobs"][1:]):
        assert a == pytest.approx(b, abs=1e-5)


def test_the_prompts_of_one_batch_are_scored_together(client, run, monkeypatch):
    import quillgpt.serve.engine as engine

    calls = []
    real = engine.prompt_logprobs

    def counting(model, rows, top=0, batch_size=16):
        calls.append(len(rows))
        return real(model, rows, top, batch_size)

    monkeypatch.setattr(engine, "prompt_logprobs", counting)
    prompts = [run.tokenizer.encode(f"line {i} of verse") for i in range(6)]
    body = post(client, prompt=prompts, max_tokens=0, echo=True, logprobs=1)
    assert calls == [6] and len(body["choices"]) == 6


def test_the_openai_client_reads_the_logprobs(exported, run):
    openai = pytest.importorskip("openai")
    with BackgroundServer(create_app(run)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        ids = run.tokenizer.encode("Not marble, nor the gilded monuments")
        got = client.completions.create(model="run", prompt=[ids], max_tokens=0, echo=True, logprobs=2)
        lp = got.choices[0].logprobs
        assert lp.token_logprobs[0] is None and len(lp.tokens) == len(ids) and lp.top_logprobs[1]


def test_lm_eval_local_completions_gets_the_in_process_numbers(exported, run):
    """lm-eval's `local-completions` (token-id prompts, the export's tokenizer) against a real
    server on loopback, request by request equal to `quill eval --tasks` in process."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    lm_eval = pytest.importorskip("lm_eval", reason="the eval extra: pip install 'quillgpt[eval]'")
    pytest.importorskip("aiohttp", reason="lm-eval's API models need lm_eval[api]")
    from quillgpt.lm_eval_adapter import QuillLM, task_manager

    tasks = ["quill_sonnets", "quill_verse_choice", "quill_verse_lastword", "quill_verse_repeat"]
    manager = task_manager(LM_EVAL_TASKS, tasks)
    settings = dict(tasks=tasks, task_manager=manager, limit=8, bootstrap_iters=0, log_samples=True)
    ours = lm_eval.simple_evaluate(model=QuillLM(model=run.model, tokenizer=run.tokenizer, progress=False),
                                   **settings)
    with BackgroundServer(create_app(run)) as url:
        model_args = (f"model=run,base_url={url}/v1/completions,tokenizer={exported[1]},"
                      f"tokenizer_backend=huggingface,max_length={BLOCK + 1},batch_size=4")
        theirs = lm_eval.simple_evaluate(model="local-completions", model_args=model_args, **settings)
    for task in tasks:
        a = {s["doc_id"]: s["resps"] for s in ours["samples"][task]}
        b = {s["doc_id"]: s["resps"] for s in theirs["samples"][task]}
        assert a.keys() == b.keys()
        for doc_id in a:
            flat_a, flat_b = json.dumps(a[doc_id]), json.dumps(b[doc_id])
            assert same(json.loads(flat_a), json.loads(flat_b)), (task, doc_id, flat_a, flat_b)
        for metric, value in ours["results"][task].items():
            if "," in metric and "stderr" not in metric:
                assert math.isclose(theirs["results"][task][metric], value, rel_tol=1e-4), (task, metric)


def same(a, b) -> bool:
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, float):
        return math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-4)
    return a == b
