"""Generation: KV cache == recomputation, past block_size, batches, sampling sets, stop, streaming."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from quillgpt.checkpoint import load_run
from quillgpt.cli import main
from quillgpt.config import ModelConfig
from quillgpt.errors import QuillError
from quillgpt.generate import (
    TextStream,
    generate,
    generate_batch,
    generate_ids,
    generate_stream,
    sample_next,
)
from quillgpt.model import GPT, KVCache
from quillgpt.tokenizers.char import CharTokenizer

CHARS = "\n !',.:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def random_model(block_size: int = 64, vocab_size: int = len(CHARS), seed: int = 0, std: float = 1.0,
                 **kw) -> GPT:
    """A small GPT with large random weights, so greedy decoding wanders instead of repeating."""
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=vocab_size, block_size=block_size, n_layer=2, n_head=2, n_embd=32,
                      dropout=0.0, bias=True, **kw)
    model = GPT(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, std)
    return model


@pytest.fixture(scope="module")
def tok() -> CharTokenizer:
    return CharTokenizer(list(CHARS))


def greedy_reference(model: GPT, ids: list[int], n: int, window) -> list[int]:
    """Recompute the whole window every step (no cache); `window(seq, start)` moves the start."""
    seq, start = list(ids), 0
    with torch.no_grad():
        for _ in range(n):
            logits, _ = model(torch.tensor([seq[start:]]))
            seq.append(int(logits[0, -1].argmax()))
            start = window(seq, start)
    return seq


def shift_window(block_size: int):
    keep = block_size // 2

    def window(seq: list[int], start: int) -> int:
        return len(seq) - keep if len(seq) - start > block_size else start

    return window


def slide_window(block_size: int):
    return lambda seq, start: max(0, len(seq) - block_size)


# --- the cache ----------------------------------------------------------------------------------

def test_cached_greedy_equals_recompute_for_200_tokens():
    model = random_model(block_size=256)
    prompt = torch.randint(0, model.config.vocab_size, (1, 7), generator=torch.Generator().manual_seed(1))
    cached = generate_ids(model, prompt, 200, temperature=0)
    recomputed = greedy_reference(model, prompt[0].tolist(), 200, slide_window(256))
    assert cached.shape == (1, 207)
    assert cached[0].tolist() == recomputed
    assert len(set(recomputed[7:])) > 10  # the model really wanders: the comparison means something


def test_cached_logits_equal_uncached_logits():
    model = random_model(block_size=64, std=0.3)
    seq = torch.randint(0, model.config.vocab_size, (2, 50), generator=torch.Generator().manual_seed(2))
    cache = KVCache(model.config, 2, "cpu")
    with torch.no_grad():
        logits, _ = model(seq[:, :10], cache=cache)  # prefill
        full, _ = model(seq[:, :10])
        torch.testing.assert_close(logits[:, -1], full[:, -1], rtol=0, atol=1e-5)
        for t in range(10, 50):  # then one token at a time
            logits, _ = model(seq[:, t : t + 1], cache=cache)
            full, _ = model(seq[:, : t + 1])
            assert logits.shape == (2, 1, model.config.vocab_size)
            torch.testing.assert_close(logits[:, -1], full[:, -1], rtol=0, atol=1e-5)
    assert full.abs().max() > 1.0  # logits of a real size, not all near zero
    assert cache.pos == 50
    with pytest.raises(ValueError, match="block_size"):
        model(seq[:, :15], cache=cache)  # 50 + 15 > 64


def no_cache_forward(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    """GPT-2's forward written out with no cache anywhere: embeddings, then per block
    x + attn(ln_1(x)) with an explicit causal softmax, x + mlp(ln_2(x)), then ln_f and the head."""
    tr, cfg = model.transformer, model.config
    B, T = idx.shape
    nh, hs = cfg.n_head, cfg.n_embd // cfg.n_head
    x = tr.wte(idx) + tr.wpe(torch.arange(T))
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for block in tr.h:
        q, k, v = block.attn.c_attn(block.ln_1(x)).split(cfg.n_embd, dim=2)
        q, k, v = (t.view(B, T, nh, hs).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        att = (q @ k.transpose(-2, -1) / hs**0.5).masked_fill(~causal, float("-inf")).softmax(dim=-1)
        x = x + block.attn.c_proj((att @ v).transpose(1, 2).reshape(B, T, cfg.n_embd))
        x = x + block.mlp.c_proj(torch.nn.functional.gelu(block.mlp.c_fc(block.ln_2(x)), approximate="tanh"))
    return model.lm_head(tr.ln_f(x))


@pytest.mark.parametrize("training", [False, True])
def test_training_forward_unchanged_by_the_cache_path(training):
    """The training forward (targets, no cache) is the plain no-cache computation: its logits at
    every position and its loss equal the forward written out above, in eval and train mode."""
    model = random_model(block_size=32, std=0.3).train(training)
    gen = torch.Generator().manual_seed(4)
    idx = torch.randint(0, model.config.vocab_size, (2, 32), generator=gen)
    targets = torch.randint(0, model.config.vocab_size, (2, 32), generator=gen)
    targets[0, :5] = -1  # not scored
    logits, loss = model(idx, targets)
    with torch.no_grad():
        expected = no_cache_forward(model, idx)
    assert expected.abs().max() > 1.0  # logits of a real size: the comparison means something
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-4)
    scored = targets != -1
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(expected[scored], targets[scored]),
                               rtol=0, atol=1e-5)


# --- past block_size --------------------------------------------------------------------------

@pytest.mark.parametrize("overflow, window", [("shift", shift_window), ("slide", slide_window)])
def test_past_block_size_matches_reference(overflow, window):
    block = 24
    model = random_model(block_size=block, seed=3)
    prompt = [5, 9, 20, 33, 41]
    out = generate_ids(model, torch.tensor([prompt]), 90, temperature=0, overflow=overflow)
    assert out[0].tolist() == greedy_reference(model, prompt, 90, window(block))


def test_shift_and_slide_differ_only_past_block_size():
    model = random_model(block_size=24, seed=3)
    prompt = torch.tensor([[5, 9, 20]])
    shift = generate_ids(model, prompt, 60, temperature=0, overflow="shift")[0].tolist()
    slide = generate_ids(model, prompt, 60, temperature=0, overflow="slide")[0].tolist()
    assert shift[:25] == slide[:25]  # the first 24-token window is the same context
    assert shift != slide


def test_full_block_prompt_then_generate(tok):
    model = random_model(block_size=16)
    text = generate(model, tok, "abcdefghijklmnop", 30, temperature=0)  # exactly block_size
    assert len(text) == 30


# --- batches ------------------------------------------------------------------------------------

@pytest.mark.parametrize("overflow", ["shift", "slide"])
def test_mixed_length_batch_equals_each_alone_greedy(tok, overflow):
    model = random_model(block_size=24, seed=4)
    prompts = ["To be", "Or not to be, that is", "A", ""]
    batch = generate_batch(model, tok, prompts, max_new_tokens=45, temperature=0, overflow=overflow)
    alone = [generate(model, tok, p, max_new_tokens=45, temperature=0, overflow=overflow) for p in prompts]
    assert batch == alone
    assert all(len(t) == 45 for t in batch)


def test_mixed_length_batch_equals_each_alone_sampled(tok):
    model = random_model(block_size=32, seed=5)
    prompts = ["Hello", "The quick brown fox", "x"]
    batch = generate_batch(model, tok, prompts, 50, temperature=0.9, top_k=20, top_p=0.95, seed=11)
    alone = [generate(model, tok, p, 50, temperature=0.9, top_k=20, top_p=0.95, seed=11 + i)
             for i, p in enumerate(prompts)]
    assert batch == alone
    # the same prompt twice in a batch gives two different samples (seeds 11 and 12)
    a, b = generate_batch(model, tok, ["Hello", "Hello"], 50, temperature=0.9, top_k=20, top_p=0.95, seed=11)
    assert a == batch[0] and a != b


# --- sampling sets ------------------------------------------------------------------------------

def test_greedy_is_argmax_and_temperature_zero():
    logits = torch.tensor([[0.1, 3.0, 2.9, -1.0], [5.0, 0.0, 0.0, 0.0]])
    assert sample_next(logits, temperature=0)[:, 0].tolist() == [1, 0]


def test_top_k_never_samples_outside_the_k_most_likely():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 50, generator=g)
    allowed = torch.topk(logits, 5).indices
    for _ in range(300):
        ids = sample_next(logits, temperature=2.0, top_k=5, generator=g)
        assert all(int(ids[b]) in allowed[b].tolist() for b in range(4))


def test_top_p_never_samples_outside_the_nucleus():
    g = torch.Generator().manual_seed(0)
    probs = torch.tensor([[0.5, 0.3, 0.1, 0.05, 0.05], [0.05, 0.05, 0.1, 0.3, 0.5]])
    logits = probs.log()
    seen = set()
    for _ in range(500):
        ids = sample_next(logits, top_p=0.75, generator=g)[:, 0].tolist()
        assert ids[0] in (0, 1) and ids[1] in (4, 3)  # 0.5 + 0.3 >= 0.75: two tokens each
        seen.add(ids[0])
    assert seen == {0, 1}  # and both of them do get sampled
    for _ in range(100):  # a top token above p on its own is the whole nucleus
        assert sample_next(logits, top_p=0.4, generator=g)[:, 0].tolist() == [0, 4]


def test_min_p_and_top_p_one_and_repetition_penalty():
    g = torch.Generator().manual_seed(0)
    logits = torch.tensor([[0.6, 0.25, 0.1, 0.05]]).log()
    for _ in range(300):  # min_p 0.3: only tokens at least 0.3 * 0.6 = 0.18 likely
        assert int(sample_next(logits, min_p=0.3, generator=g)) in (0, 1)
    every = {int(sample_next(logits, top_p=1.0, generator=g)) for _ in range(400)}
    assert every == {0, 1, 2, 3}
    logits = torch.tensor([[2.0, 1.5, -1.0]])
    seen = torch.tensor([[True, False, False]])
    assert int(sample_next(logits, 0, repetition_penalty=1.5, seen=seen)) == 1  # 2.0 / 1.5 < 1.5
    assert int(sample_next(logits, 0, repetition_penalty=1.2, seen=seen)) == 0  # 2.0 / 1.2 > 1.5


def test_extreme_finite_settings_sample_without_nan():
    """Values at the ends of float range: the sampler stays finite (a tiny temperature is greedy,
    a tiny top_p keeps the top token) instead of failing on NaN probabilities."""
    g = torch.Generator().manual_seed(0)
    logits = torch.tensor([[2.0, 1.0, -3.0, 0.5], [0.0, 4.0, 1.0, -1.0]])
    seen = torch.tensor([[True, True, False, False], [False, True, True, False]])
    for kw in ({"temperature": 1e-45}, {"top_p": 1e-300}, {"top_p": 1e-300, "temperature": 1e-45},
               {"temperature": 1e-45, "repetition_penalty": 1e-45, "seen": seen}):
        assert sample_next(logits, generator=g, **kw)[:, 0].tolist() == [0, 1], kw
    for kw in ({"repetition_penalty": 1e-45, "seen": seen}, {"repetition_penalty": 1e38, "seen": seen},
               {"temperature": 1e300}, {"min_p": 1e-300}):
        ids = sample_next(logits, generator=g, **kw)[:, 0].tolist()
        assert all(0 <= i < 4 for i in ids), kw


def test_non_finite_settings_seeds_and_stop_lists_are_refused(tok):
    model = random_model()
    for kw, message in (({"temperature": float("inf")}, "finite"), ({"seed": -1}, "seed"),
                        ({"seed": 2**64}, "seed"), ({"stop": ["x"] * 17}, "at most 16"),
                        ({"stop": ["x" * 257]}, "at most 256")):
        with pytest.raises(QuillError, match=message):
            generate(model, tok, "To", 5, **kw)


# --- seeds, stop strings, streaming ---------------------------------------------------------

def test_seed_fixes_the_output(tok):
    model = random_model()
    a = generate(model, tok, "To be", 60, temperature=1.0, seed=7)
    b = generate(model, tok, "To be", 60, temperature=1.0, seed=7)
    c = generate(model, tok, "To be", 60, temperature=1.0, seed=8)
    assert a == b and a != c and len(a) == 60


def test_stop_strings_stop(tok):
    model = random_model(seed=6)
    full = generate(model, tok, "Hi", 80, temperature=0)
    stop = full[30:33]  # some text the model will produce
    first = full.find(stop)
    assert generate(model, tok, "Hi", 80, temperature=0, stop=[stop]) == full[:first]
    assert generate(model, tok, "Hi", 80, temperature=0, stop=["@@", stop]) == full[:first]
    pieces = list(generate_stream(model, tok, "Hi", 80, temperature=0, stop=[stop]))
    assert "".join(pieces) == full[:first]
    assert not any(stop[0] in p for p in pieces if p.endswith(stop[0]))  # nothing of the stop shown
    batch = generate_batch(model, tok, ["Hi", "Hi there"], 80, temperature=0, stop=[stop])
    assert batch[0] == full[:first] and stop not in batch[1]


def test_stream_pieces_join_to_generate(tok):
    model = random_model(seed=7)
    pieces = list(generate_stream(model, tok, "A", 50, temperature=0.8, seed=3))
    assert len(pieces) == 50  # one character per token for a char tokenizer
    assert "".join(pieces) == generate(model, tok, "A", 50, temperature=0.8, seed=3)


class ByteTokenizer(CharTokenizer):
    """One token per UTF-8 byte, as byte-level BPE's base vocabulary: tokens can be half a character."""

    def __init__(self):
        super().__init__([chr(i) for i in range(256)])

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


def test_stream_holds_back_half_characters():
    text = "héllo wörld — 😀 ok"
    stream = TextStream(ByteTokenizer())
    pieces = [stream.add(b) for b in text.encode("utf-8")] + [stream.finish()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    assert "" in pieces  # the first bytes of é, ö, — and 😀 waited
    broken = TextStream(ByteTokenizer())  # a genuinely invalid byte still comes out at the end
    assert "".join([broken.add(0xC3), broken.finish()]) == "\ufffd"


def test_stream_holds_back_a_possible_stop_string():
    stream = TextStream(CharTokenizer(list("abc\n")), stop=["\n\n"])
    ids = {"a": 0, "b": 1, "c": 2, "\n": 3}
    assert stream.add(ids["a"]) == "a"
    assert stream.add(ids["\n"]) == ""  # may be the start of "\n\n"
    assert stream.add(ids["b"]) == "\nb"  # it was not
    assert stream.add(ids["\n"]) == ""
    assert stream.add(ids["\n"]) == ""  # the stop string: nothing of it is shown
    assert stream.done and stream.add(ids["c"]) == "" and stream.finish() == ""


def test_end_of_text_token_stops():
    class EotTokenizer(CharTokenizer):
        @property
        def special_tokens(self) -> dict[str, int]:
            return {"<|endoftext|>": 0}

    tok = EotTokenizer(list("#abc"))
    stream = TextStream(tok)
    assert [stream.add(i) for i in (1, 2, 0, 3)] == ["a", "b", "", ""]
    assert stream.done


# --- bad arguments --------------------------------------------------------------------------

@pytest.mark.parametrize("kw, fragment", [
    (dict(temperature=-0.1), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-1), "top_k"),
    (dict(min_p=2.0), "min_p"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(max_new_tokens=-1), "max_new_tokens"),
    (dict(stop=[""]), "stop"),
    (dict(stop="\n"), "stop"),
    (dict(overflow="wrap"), "overflow"),
])
def test_bad_arguments_raise_quill_error(tok, kw, fragment):
    model = random_model(block_size=16)
    with pytest.raises(QuillError, match=fragment):
        generate(model, tok, "ab", **kw)
    with pytest.raises(QuillError, match=fragment):
        generate_batch(model, tok, ["ab"], **kw)


def test_prompt_longer_than_block_size(tok):
    model = random_model(block_size=16)
    with pytest.raises(QuillError, match="longer than the model's context of 16"):
        generate(model, tok, "a" * 17)
    with pytest.raises(QuillError, match="longer than"):
        generate_batch(model, tok, ["ok", "a" * 17])
    with pytest.raises(QuillError, match="non-empty list"):
        generate_batch(model, tok, [])


def test_model_mode_restored(tok):
    model = random_model().train()
    generate(model, tok, "a", 5)
    assert model.training


# --- the command line -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("gen")
    data = tmp / "verse.txt"
    data.write_text("To be, or not to be, that is the question:\nWhether 'tis nobler in the mind\n" * 40)
    args = ["train", "--data", str(data), "--out", str(tmp / "run"), "--max-iters", "3", "--n-layer", "1",
            "--n-head", "2", "--n-embd", "16", "--block-size", "16", "--batch-size", "4", "--eval-iters", "1",
            "--eval-interval", "10", "--sample-tokens", "0", "--no-progress"]
    assert main(args) == 0
    return tmp / "run"


def sample_out(run_dir: Path, capsys, *args: str) -> str:
    capsys.readouterr()
    assert main(["sample", str(run_dir), "--max-new-tokens", "40", *args]) == 0
    return capsys.readouterr().out


def test_cli_stream_equals_plain_and_num_samples(run_dir, capsys):
    plain = sample_out(run_dir, capsys, "--prompt", "To", "--seed", "3")
    assert sample_out(run_dir, capsys, "--prompt", "To", "--seed", "3", "--stream") == plain
    assert plain.startswith("To") and len(plain) == len("To") + 40 + 1
    three = sample_out(run_dir, capsys, "--prompt", "To", "--seed", "3", "--num-samples", "3")
    samples = three.rstrip("\n").split("\n---------------\n")
    assert len(samples) == 3 and samples[0] + "\n" == plain and len(set(samples)) == 3
    streamed = sample_out(run_dir, capsys, "--prompt", "To", "--seed", "3", "--num-samples", "3", "--stream")
    assert streamed == three


def test_cli_greedy_stop_and_controls(run_dir, capsys):
    greedy = sample_out(run_dir, capsys, "--prompt", "To be", "--temperature", "0")
    assert sample_out(run_dir, capsys, "--prompt", "To be", "--temperature", "0", "--seed", "9") == greedy
    new = greedy[len("To be"):-1]
    stop = new[5:7]
    stopped = sample_out(run_dir, capsys, "--prompt", "To be", "--temperature", "0", "--stop", stop)
    assert stopped == "To be" + new[: new.find(stop)] + "\n"
    out = sample_out(run_dir, capsys, "--top-p", "0.9", "--min-p", "0.05", "--repetition-penalty", "1.3",
                     "--top-k", "0", "--seed", "1", "--stop", "\\n")
    assert "\n" not in out[:-1]


def test_cli_interactive(run_dir):
    r = subprocess.run([sys.executable, "-m", "quillgpt", "sample", str(run_dir), "--interactive",
                        "--max-new-tokens", "10", "--seed", "0", "--temperature", "0"],
                       input="To be\nthé\nthe\n", capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 2 and lines[0].startswith("To be") and lines[1].startswith("the")
    assert len(lines[0]) == len("To be") + 10
    assert "'é'" in r.stderr  # the bad prompt was reported and the session went on
    run = load_run(run_dir, "cpu")
    assert lines[0] == "To be" + generate(run.model, run.tokenizer, "To be", 10, temperature=0)


@pytest.mark.parametrize("args, fragment", [
    (["--top-p", "0"], "top_p"),
    (["--temperature", "-1"], "temperature"),
    (["--num-samples", "0"], "num-samples"),
    (["--stop", ""], "stop"),
    (["--prompt", "To be or not to be, that"], "longer than the model's context of 16"),
])
def test_cli_bad_sampling_flags(run_dir, capsys, args, fragment):
    capsys.readouterr()
    assert main(["sample", str(run_dir), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("quill: error:") and fragment in err[0]


# --- torch.compile ----------------------------------------------------------------------------

@pytest.mark.slow
def test_cached_decoding_under_torch_compile():
    """The compiled model decodes with the cache as eager does, with one graph for the prefill and
    one for every decode step (the growing cache length does not recompile per token)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = random_model(block_size=32, std=0.3)
    compiled = torch.compile(model)
    seq = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(3))
    eager_cache, compiled_cache = KVCache(model.config, 2, "cpu"), KVCache(model.config, 2, "cpu")
    with torch.no_grad():
        for t0, t1 in [(0, 6)] + [(t, t + 1) for t in range(6, 24)]:
            a, _ = model(seq[:, t0:t1], cache=eager_cache)
            b, _ = compiled(seq[:, t0:t1], cache=compiled_cache)
            torch.testing.assert_close(b, a, rtol=0, atol=1e-5)
    assert counters["stats"]["unique_graphs"] <= 3


def test_a_compiled_model_decodes_with_the_cache():
    """torch.compile's wrapper takes *args; generation must still see that the model takes a cache."""
    from quillgpt.generate import supports_cache

    model = random_model()
    assert supports_cache(model) and supports_cache(torch.compile(model))  # compiling is lazy: no cost here
