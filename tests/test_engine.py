"""The decode engine: per-row settings, rows that join and leave a running batch, chunked
prefill, end ids and stop strings, logprobs, the tool hook, the KV-cache budget; every row
checked against the same row decoded alone, the no-cache reference, or the pre-engine path."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from quillgpt.config import ModelConfig
from quillgpt.engine import Engine, Request, complete, decode
from quillgpt.errors import QuillError
from quillgpt.model import GPT, KVCache
from quillgpt.sampling import Sampling
from quillgpt.tokenizers.char import CharTokenizer

CHARS = "\n !',.:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def random_model(block_size: int = 64, seed: int = 0, std: float = 1.0) -> GPT:
    """A small GPT with large random weights, so that decoding wanders instead of repeating."""
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=len(CHARS) + 3, block_size=block_size, n_layer=2, n_head=2, n_embd=32,
                      dropout=0.0, bias=True)
    model = GPT(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, std)
    return model


@pytest.fixture(scope="module")
def tok() -> CharTokenizer:
    return CharTokenizer(list(CHARS)).with_special_tokens(["<|endoftext|>", "<|end|>", "<|user|>"])


def ids(tok, text: str) -> list[int]:
    return tok.encode(text)


def alone(model, tok, request: Request, **options) -> list[int]:
    return complete(model, tok, [request], **options)[0].ids


MIXED = [Sampling(max_new_tokens=30, temperature=0.0),
         Sampling(max_new_tokens=25, temperature=0.9, top_k=12, seed=1),
         Sampling(max_new_tokens=40, temperature=1.3, top_p=0.8, seed=2),
         Sampling(max_new_tokens=20, temperature=0.7, min_p=0.1, repetition_penalty=1.4, seed=3),
         Sampling(max_new_tokens=35, temperature=1.0, seed=4)]


# --- the same tokens as before the engine, and as the no-cache reference ---------------------

def pre_engine_greedy(model: GPT, prompts: list[list[int]], n: int) -> list[list[int]]:
    """The decoding loop before the engine: left-padded prompts in one KVCache, then one token
    per row per step (within the context)."""
    L = max(len(p) for p in prompts)
    pad = torch.tensor([L - len(p) for p in prompts])
    cache = KVCache(model.config, len(prompts), "cpu", pad=pad)
    out: list[list[int]] = [[] for _ in prompts]
    with torch.no_grad():
        logits = model(torch.tensor([[0] * (L - len(p)) + p for p in prompts]), cache=cache)[0][:, -1]
        for _ in range(n):
            nxt = logits.argmax(-1)
            for o, t in zip(out, nxt.tolist()):
                o.append(t)
            logits = model(nxt[:, None], cache=cache)[0][:, -1]
    return out


def test_greedy_tokens_equal_the_pre_engine_path_and_the_no_cache_reference(tok):
    model = random_model(block_size=64)
    prompts = [ids(tok, p) for p in ["To be", "Or not to be, that is", "A", "Whether 'tis nobler"]]
    n = 40
    requests = [Request(p, Sampling(max_new_tokens=n, temperature=0), end_ids=()) for p in prompts]
    got = [c.ids for c in complete(model, tok, requests)]
    assert got == pre_engine_greedy(model, prompts, n)
    assert got == [c.ids for c in complete(model, tok, requests, use_cache=False)]
    assert all(len(set(g)) > 5 for g in got)  # the model wanders: the comparison means something


# --- per-row settings, joining and leaving ------------------------------------------------------

def test_rows_with_mixed_settings_draw_as_each_alone(tok):
    model = random_model()
    prompts = ["To be", "Or not", "", "Whether 'tis nobler in", "O"]
    requests = [Request(ids(tok, p) or [0], s) for p, s in zip(prompts, MIXED)]
    together = complete(model, tok, requests)
    for r, c in zip(requests, together):
        assert c.ids == alone(model, tok, r)
        assert c.finish in ("length", "stop") and len(c.ids) <= r.sampling.max_new_tokens
    assert len({tuple(c.ids) for c in together}) == len(requests)


def test_rows_join_at_token_boundaries_and_leave_freeing_their_slot(tok):
    """Rows added while others decode join at the next step; with 2 slots, 5 rows flow
    through; every row equals itself alone."""
    model = random_model()
    requests = [Request(ids(tok, p), s) for p, s in zip(["To", "Be", "Or", "Not", "Th"], MIXED)]
    engine = Engine(model, tok, max_rows=2)
    got: dict[int, list[int]] = {}
    first_step: dict[int, int] = {}
    engine.add(requests[0])
    added, step = 1, 0
    while not engine.idle or added < len(requests):
        if added < len(requests) and (step in (3, 7) or (step > 7 and engine.waiting == 0)):
            engine.add(requests[added])
            added += 1
        for e in engine.step():
            got.setdefault(e.row, []).append(e.token)
            first_step.setdefault(e.row, step)
        assert engine.running <= 2
        step += 1
    assert first_step[1] == 3  # added before step 3, with a free slot: its first token in step 3
    for i, r in enumerate(requests):
        assert got[i] == alone(model, tok, r)


def test_a_long_prompt_is_prefilled_in_chunks_while_others_decode(tok):
    model = random_model(block_size=64)
    short = Request(ids(tok, "To"), Sampling(max_new_tokens=30, temperature=0.8, seed=5))
    long = Request(ids(tok, "Whether 'tis nobler in the mind to suffer the slings"), Sampling(
        max_new_tokens=10, temperature=0.8, seed=6))
    engine = Engine(model, tok, prefill_chunk=8)
    engine.add(short)
    engine.step()
    engine.add(long)
    waited, long_started, short_done = 0, False, False
    while not engine.idle:
        events = engine.step()
        rows = {e.row for e in events}
        assert short_done or 0 in rows  # the decoding row is never stalled by the prefill
        short_done = short_done or any(e.row == 0 and e.finish for e in events)
        long_started = long_started or 1 in rows
        waited += not long_started
    assert waited == -(-len(long.prompt) // 8) - 1  # chunks of 8: the last one gives a token at once
    both = complete(model, tok, [short, long], prefill_chunk=8)
    assert both[1].ids == alone(model, tok, long) and both[0].ids == alone(model, tok, short)


def test_a_joining_rows_prompt_rides_in_the_decode_forward(tok):
    """While rows decode, a new row's prompt (and a second row sharing it) goes through the
    model in the same forward as their tokens (model.StepView): one forward per step once rows
    decode, and every row still equals itself alone."""
    model = random_model()
    first = [Request(ids(tok, p), s) for p, s in zip(["To be", "Or"], MIXED)]
    joining = [Request(ids(tok, "Whether 'tis"), s) for s in (MIXED[2], MIXED[4])]
    engine = Engine(model, tok, max_rows=4)
    calls: list[int] = []
    model.register_forward_pre_hook(lambda module, args: calls.append(args[0].size(1)))
    for r in first:
        engine.add(r)
    got: dict[int, list[int]] = {}
    for step in range(60):
        if step == 3:
            for r in joining:
                engine.add(r)
        calls.clear()
        events = engine.step()
        for e in events:
            got.setdefault(e.row, []).append(e.token)
        assert len(calls) <= 1 or step == 0  # (the first prompts: a forward per length)
        if step == 3:  # a token per slot (fillers in the joining rows' slots), the shared prompt once
            assert calls == [4 + len(joining[0].prompt)] and {e.row for e in events} == {0, 1, 2, 3}
        if engine.idle:
            break
    for i, r in enumerate(first + joining):
        assert got[i] == alone(model, tok, r)


def test_shared_prompts_are_run_once_and_still_differ(tok):
    model = random_model()
    prompt = ids(tok, "To be, or not")
    requests = [Request(prompt, Sampling(max_new_tokens=20, seed=s)) for s in range(4)]
    got = complete(model, tok, requests)
    assert [c.ids for c in got] == [alone(model, tok, r) for r in requests]
    assert len({tuple(c.ids) for c in got}) == 4


@pytest.mark.parametrize("overflow", ["shift", "slide"])
def test_rows_past_block_size_equal_the_no_cache_reference(tok, overflow):
    model = random_model(block_size=16, seed=3)
    requests = [Request(ids(tok, p), s) for p, s in zip(["To be", "Or not to be,", "A"], MIXED)]
    cached = complete(model, tok, requests, overflow=overflow)
    plain = complete(model, tok, requests, overflow=overflow, use_cache=False)
    assert [c.ids for c in cached] == [c.ids for c in plain]
    assert all(len(c.ids) > 16 for c in cached if c.finish == "length")


def test_cancel_frees_the_slot_and_ends_the_events(tok):
    model = random_model()
    engine = Engine(model, tok, max_rows=1)
    a = engine.add(Request(ids(tok, "To"), Sampling(max_new_tokens=1000, seed=1)))
    b = engine.add(Request(ids(tok, "Or"), Sampling(max_new_tokens=5, seed=2)))
    engine.step()
    assert engine.running == 1 and engine.waiting == 1
    engine.cancel(a)
    events = [e for _ in range(8) for e in engine.step()]
    assert {e.row for e in events} == {b} and engine.idle
    assert [e.token for e in events] == alone(model, tok, Request(ids(tok, "Or"), Sampling(max_new_tokens=5, seed=2)))


# --- ends, text, logprobs ---------------------------------------------------------------------

def test_end_ids_stop_strings_and_special_tokens(tok):
    model = random_model()
    free = complete(model, tok, [Request(ids(tok, "To"), Sampling(max_new_tokens=40, temperature=0), end_ids=())])[0]
    end_at = free.ids[10]
    ended = complete(model, tok, [Request(ids(tok, "To"), Sampling(max_new_tokens=40, temperature=0),
                                          end_ids=[end_at])])[0]
    assert ended.ids == free.ids[: free.ids.index(end_at) + 1] and ended.finish == "stop"
    text = tok.decode(free.ids)
    stop = text[12:14]
    stopped = complete(model, tok, [Request(ids(tok, "To"), Sampling(max_new_tokens=40, temperature=0,
                                                                      stop=[stop]))])[0]
    assert stopped.text == text[: text.find(stop)] and stopped.finish == "stop"
    # special tokens are not text: <|end|> ends a row by default, <|user|> is never spelled out
    specials = tok.special_tokens
    force_end = lambda ids_: [specials["<|user|>"], ids(tok, "x")[0], specials["<|end|>"]]  # noqa: E731
    row = complete(model, tok, [Request(ids(tok, "To"), Sampling(max_new_tokens=3, temperature=0),
                                        tool_hook=force_end, tool_ids=[free.ids[0]])])[0]
    assert "<|" not in row.text and "x" in row.text


def test_logprobs_are_the_models_own_distribution(tok):
    model = random_model(std=0.3)
    prompt = ids(tok, "To be")
    row = complete(model, tok, [Request(prompt, Sampling(max_new_tokens=12, temperature=1.5, top_k=5, seed=3,
                                                         logprobs=3))])[0]
    seq = torch.tensor([prompt + row.ids])
    with torch.no_grad():
        logp = F.log_softmax(model(seq)[0][0], dim=-1)  # no temperature, no top-k
    for t, (token, lp, top) in enumerate(zip(row.ids, row.logprobs, row.top)):
        at = logp[len(prompt) - 1 + t]
        assert lp == pytest.approx(at[token].item(), abs=1e-4)
        assert [i for i, _ in top] == at.topk(3).indices.tolist()
    plain = complete(model, tok, [Request(prompt, Sampling(max_new_tokens=4, seed=3))])[0]
    assert plain.logprobs == [None] * 4 and plain.top == [[]] * 4


# --- the tool hook ------------------------------------------------------------------------------

def test_tool_hook_forces_ids_or_ends_the_row(tok):
    model = random_model()
    prompt = ids(tok, "Q:")
    free = complete(model, tok, [Request(prompt, Sampling(max_new_tokens=30, temperature=0), end_ids=())])[0]
    close = free.ids[4]  # "a tool call closes" at the first occurrence of this token
    result = ids(tok, " is 42.".replace("42", "XLII"))
    calls: list[list[int]] = []
    limit = 20  # the hook ends the row (a client-side tool) once it holds 20 ids

    def hook(so_far: list[int]) -> list[int] | None:
        calls.append(list(so_far))
        if so_far[-1] == close and len(calls) == len(so_far):  # the first call closes: run the tool
            return result
        return None if len(so_far) >= limit else []  # [] goes on as if nothing happened

    row = complete(model, tok, [Request(prompt, Sampling(max_new_tokens=30, temperature=0), end_ids=(),
                                        tool_hook=hook)])[0]
    cut = free.ids.index(close) + 1
    assert calls[cut - 1] == free.ids[:cut]
    assert row.ids[:cut] == free.ids[:cut] and row.ids[cut : cut + len(result)] == result
    assert row.forced == [False] * cut + [True] * len(result) + [False] * (len(row.ids) - cut - len(result))
    assert row.logprobs[cut] is None
    # decoding goes on from the forced ids as it would from a prompt that ends with them
    after = alone(model, tok, Request(prompt + row.ids[: cut + len(result)],
                                      Sampling(max_new_tokens=30, temperature=0), end_ids=()))
    rest = row.ids[cut + len(result):]
    assert rest == after[: len(rest)]
    assert row.finish == "tool_calls" and len(row.ids) == limit
    assert "XLII" in row.text


# --- limits and bad input -----------------------------------------------------------------------

def test_kv_cache_budget_limits_the_rows(tok):
    model = random_model(block_size=64)
    per_row = 2 * 2 * 64 * 32 * 4  # k and v, 2 layers, 64 positions, 32 wide, float32
    engine = Engine(model, tok, max_rows=16, kv_cache_mb=3 * per_row / 2**20)
    assert engine.max_rows == 3
    requests = [Request(ids(tok, "To"), Sampling(max_new_tokens=5, seed=i)) for i in range(7)]
    for r in requests:
        engine.add(r)
    seen = 0
    while not engine.idle:
        engine.step()
        seen = max(seen, engine.running)
    assert seen == 3 and engine.cache.slots == 3
    with pytest.raises(QuillError, match="holds no row"):
        Engine(model, tok, kv_cache_mb=0.001)


@pytest.mark.parametrize("request_, fragment", [
    (Request([]), "empty"),
    (Request([1] * 65), "longer than the model's context"),
    (Request([10**6]), "prompt ids"),
    (Request([1], Sampling(temperature=-1)), "temperature"),
    (Request([1], Sampling(top_p=0.0)), "top_p"),
    (Request([1], Sampling(logprobs=-1)), "logprobs"),
])
def test_bad_requests_are_quill_errors(tok, request_, fragment):
    with pytest.raises(QuillError, match=fragment):
        Engine(random_model(), tok).add(request_)


def test_zero_new_tokens_and_the_step_by_step_iterator(tok):
    model = random_model()
    steps = list(decode(model, tok, [Request([1], Sampling(max_new_tokens=0)),
                                     Request([2], Sampling(max_new_tokens=3, temperature=0))]))
    assert steps[0][0].token is None and steps[0][0].finish == "length"
    assert [len(s) for s in steps] == [2, 1, 1]
    assert steps[-1][-1].finish == "length"


def test_the_model_keeps_its_training_mode(tok):
    model = random_model().train()
    complete(model, tok, [Request([1], Sampling(max_new_tokens=3))])
    assert model.training


def test_leaving_rows_move_others_between_slots_and_penalties_stay_per_row(tok):
    """A row cancelled from the middle of the batch: the last slot's row moves into its place
    and goes on as if alone; a repetition-penalty row, then rows without one."""
    model = random_model()
    requests = [Request(ids(tok, p), s) for p, s in zip(["Whe", "To", "Or", "Be"], MIXED[1:] + MIXED[:1])]
    engine = Engine(model, tok)
    for r in requests[:3]:
        engine.add(r)
    got: dict[int, list[int]] = {}
    for step in range(40):
        if step == 2:
            engine.cancel(0)  # outside any inference mode, as the server calls it
            engine.add(requests[3])
        for e in engine.step():
            got.setdefault(e.row, []).append(e.token)
    for i in (1, 2, 3):
        assert got[i] == alone(model, tok, requests[i])
    penalty = Request(ids(tok, "To"), Sampling(max_new_tokens=5, repetition_penalty=1.5, seed=1))
    later = [Request(ids(tok, p), Sampling(max_new_tokens=8, seed=i)) for i, p in enumerate(["A", "B", "C"])]
    engine = Engine(model, tok)
    engine.add(penalty)
    while not engine.idle:
        engine.step()
    out: dict[int, list[int]] = {}
    for r in later + [penalty]:
        engine.add(r)
    while not engine.idle:
        for e in engine.step():
            out.setdefault(e.row, []).append(e.token)
    assert [out[i] for i in range(1, 5)] == [alone(model, tok, r) for r in later + [penalty]]
