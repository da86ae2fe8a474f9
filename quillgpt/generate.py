"""Sampling text from a trained model: KV cache, sampling controls, streaming, batches.

The pieces, bottom up:

- `sample_next`: one token per row from the last logits (repetition penalty, temperature or
  greedy, top-k, top-p, min-p).
- `stream_ids`: the decoding loop. The prompts are processed once (prefill) into a preallocated
  `KVCache`, then each step feeds one token per row. Prompts of different lengths are
  left-padded into one batch.
- Past `block_size` (the model has learned positions 0..block_size-1 only) the context is a
  window over the last tokens. Two strategies (see docs/generation.md):
  `"shift"` (default): when the window is full, keep its last `block_size // 2` tokens,
  re-prefill them at positions 0.., and go on decoding with the cache; every token then sees
  between half a window and a full window of context, at the cost of one half-window prefill
  per `block_size // 2` tokens.
  `"slide"`: exact sliding window as nanoGPT's sampler: each token past the first window
  recomputes the whole window (no cache benefit there, ~block_size times the work per token).
- `generate_ids` (token ids in, ids out), `generate` (text), `generate_stream` (text pieces as
  they are produced) and `generate_batch` (a list of prompts).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Collection, Iterator, Sequence

import torch
import torch.nn as nn
from torch.nn import functional as F

from .errors import QuillError, shown
from .inference import activation_dtype
from .model import KVCache
from .tokenizers import Tokenizer

OVERFLOW_STRATEGIES = ("shift", "slide")
FLOAT_MAX = torch.finfo(torch.float32).max
# Stop strings are checked at every token: their number and length bound that work.
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
SEED_LIMIT = 2**63  # seeds are in 0 .. 2**63 - 1


# --- sampling one token -----------------------------------------------------------------------

def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                generator: torch.Generator | Sequence[torch.Generator] | None = None,
                top_p: float | None = None, min_p: float | None = None,
                repetition_penalty: float = 1.0, seen: torch.Tensor | None = None) -> torch.Tensor:
    """One token id per row of `logits` (B, vocab) -> (B, 1): greedy at temperature 0.

    Applied in this order: repetition penalty (CTRL-style: logits of the tokens in `seen`, a
    (B, vocab) bool tensor, are divided by the penalty when positive and multiplied when
    negative), temperature, top-k (keep the k most likely), top-p (keep the smallest set of most
    likely tokens whose probability reaches p), min-p (drop tokens less likely than min_p times
    the most likely one). `generator` is one generator, or one per row.
    """
    logits = logits.float()
    if repetition_penalty != 1.0 and seen is not None:
        penalized = torch.where(logits > 0, logits / repetition_penalty, logits * repetition_penalty)
        # an extreme penalty overflows to infinity: stay finite, keep the order
        logits = torch.where(seen, penalized, logits).clamp(-FLOAT_MAX, FLOAT_MAX)
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    # the most likely token at 0 before dividing: a tiny temperature sends the others to -inf,
    # never the best one to +inf (inf - inf would be NaN)
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / temperature
    if top_k is not None and 0 < top_k < logits.size(-1):
        kth = torch.topk(logits, top_k).values[:, [-1]]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # drop a token when the ones before it already reach top_p (the first always stays)
        drop_sorted = (cum - sorted_logits.softmax(dim=-1)) >= top_p
        drop_sorted[:, 0] = False  # even when top_p is below float32's smallest number
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = F.softmax(logits, dim=-1)
    if min_p is not None and min_p > 0:
        probs = probs.masked_fill(probs < min_p * probs.max(dim=-1, keepdim=True).values, 0.0)
    if generator is None or isinstance(generator, torch.Generator):
        return torch.multinomial(probs, num_samples=1, generator=generator)
    # one generator per row: row b draws exactly as it would alone
    return torch.cat([torch.multinomial(probs[b : b + 1], 1, generator=g)
                      for b, g in enumerate(generator)])


# --- the decoding loop ------------------------------------------------------------------------

def supports_cache(model: nn.Module) -> bool:
    """Whether `model.forward` takes a KVCache (the GPT does; the ladder's rungs do not).

    A `torch.compile`d model is asked about the model it wraps (its own forward takes *args)."""
    import inspect

    model = getattr(model, "_orig_mod", model)
    return "cache" in inspect.signature(model.forward).parameters


def _prefill(model: nn.Module, windows: list[list[int]], device: torch.device) -> tuple[KVCache, torch.Tensor]:
    """A fresh cache holding `windows` (left-padded to one length); the next-token logits."""
    L = max(len(w) for w in windows)
    pad = torch.tensor([L - len(w) for w in windows], device=device)
    idx = torch.tensor([[0] * (L - len(w)) + w for w in windows], dtype=torch.long, device=device)
    cache = KVCache(model.config, len(windows), device, activation_dtype(model), pad)
    logits, _ = model(idx, cache=cache)
    return cache, logits[:, -1, :]


@torch.inference_mode()
def stream_ids(model: nn.Module, prompts: list[list[int]], max_new_tokens: int,
               temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
               min_p: float | None = None, repetition_penalty: float = 1.0,
               generators: Sequence[torch.Generator] | None = None, overflow: str = "shift",
               use_cache: bool = True,
               on_logits: Callable[[torch.Tensor, torch.Tensor], None] | None = None) -> Iterator[torch.Tensor]:
    """Yield the next token of every row, (B,), `max_new_tokens` times.

    `prompts` are lists of token ids (non-empty, each at most block_size long; different
    lengths are fine). `generators`: one per row (row b then draws as it would alone).
    `overflow` picks the strategy past block_size (module docstring). `use_cache=False` is the
    plain recompute-everything loop (same results, much slower): the reference in tests.
    `on_logits(logits, tokens)` sees each step's logits (B, vocab), before any sampling
    setting, and the tokens drawn from them (the server's logprobs).
    """
    block_size = model.config.block_size
    device = next(model.parameters()).device
    if overflow not in OVERFLOW_STRATEGIES:
        raise QuillError(f"overflow must be one of {', '.join(OVERFLOW_STRATEGIES)}, got {overflow!r}")
    use_cache = use_cache and supports_cache(model)
    keep = max(1, block_size // 2) if overflow == "shift" else block_size
    seqs = [list(p) for p in prompts]
    starts = [0] * len(seqs)  # each row's window is seqs[b][starts[b]:]
    seen = None
    if repetition_penalty != 1.0:
        seen = torch.zeros(len(seqs), model.config.vocab_size, dtype=torch.bool, device=device)
        for b, s in enumerate(seqs):
            seen[b, s] = True
    rows = torch.arange(len(seqs), device=device)

    def windows() -> list[list[int]]:
        return [s[st:] for s, st in zip(seqs, starts)]

    def full_logits() -> torch.Tensor:
        """No cache: recompute every window (left-padded, so rows may differ in length)."""
        ws = windows()
        L = max(len(w) for w in ws)
        if all(len(w) == L for w in ws):
            idx = torch.tensor(ws, dtype=torch.long, device=device)
            return model(idx)[0][:, -1, :]
        return torch.cat([model(torch.tensor([w], device=device))[0][:, -1, :] for w in ws])

    cache = None
    if use_cache:
        cache, logits = _prefill(model, windows(), device)
    else:
        logits = full_logits()
    for step in range(max_new_tokens):
        nxt = sample_next(logits, temperature, top_k, generators, top_p, min_p,
                          repetition_penalty, seen)[:, 0]  # (B,)
        if on_logits is not None:
            on_logits(logits, nxt)
        if seen is not None:
            seen[rows, nxt] = True
        for s, t in zip(seqs, nxt.tolist()):
            s.append(t)
        yield nxt
        if step == max_new_tokens - 1:
            break
        overflowing = False
        for b, s in enumerate(seqs):
            if len(s) - starts[b] > block_size:  # the window is over-full: move it
                starts[b] = len(s) - keep
                overflowing = True
        if cache is None:
            logits = full_logits()
        elif overflowing:
            cache, logits = _prefill(model, windows(), device)
        else:
            logits = model(nxt[:, None], cache=cache)[0][:, -1, :]


def generate_ids(model: nn.Module, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, generator: torch.Generator | None = None,
                 top_p: float | None = None, min_p: float | None = None,
                 repetition_penalty: float = 1.0, overflow: str = "shift",
                 use_cache: bool = True) -> torch.Tensor:
    """Append `max_new_tokens` tokens to every row of `idx` (B, T); returns (B, T + new)."""
    was_training = model.training
    model.eval()
    try:
        gens = None if generator is None else [generator] * idx.size(0)
        new = list(stream_ids(model, idx.tolist(), max_new_tokens, temperature, top_k, top_p,
                              min_p, repetition_penalty, gens, overflow, use_cache))
    finally:
        model.train(was_training)
    if not new:
        return idx
    return torch.cat([idx, torch.stack(new, dim=1).to(idx.device)], dim=1)


# --- text in, text out ------------------------------------------------------------------------

def check_sampling_args(temperature: float = 1.0, top_k: int | None = None,
                        top_p: float | None = None, min_p: float | None = None,
                        repetition_penalty: float = 1.0, max_new_tokens: int = 0,
                        stop: list[str] | None = None) -> None:
    """QuillError for settings that make no sense (the CLI and the server call this too)."""
    if not temperature >= 0:
        raise QuillError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if max_new_tokens < 0:
        raise QuillError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if top_k is not None and top_k < 0:
        raise QuillError(f"top_k must be >= 1 (or 0/None for no limit), got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise QuillError(f"top_p must be in (0, 1], got {top_p}")
    if min_p is not None and not 0 <= min_p <= 1:
        raise QuillError(f"min_p must be in [0, 1], got {min_p}")
    if not repetition_penalty > 0:
        raise QuillError(f"repetition_penalty must be > 0 (1 = none), got {repetition_penalty}")
    for name, value in (("temperature", temperature), ("top_p", top_p), ("min_p", min_p),
                        ("repetition_penalty", repetition_penalty)):
        if value is not None and not math.isfinite(value):
            raise QuillError(f"{name} must be a finite number, got {value}")
    if stop is not None:
        if isinstance(stop, str) or not all(isinstance(s, str) for s in stop):
            raise QuillError("stop must be a list of strings")
        if any(s == "" for s in stop):
            raise QuillError("stop strings must not be empty")
        if len(stop) > MAX_STOP_STRINGS:
            raise QuillError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(stop)}")
        if any(len(s) > MAX_STOP_CHARS for s in stop):
            raise QuillError(f"stop strings may be at most {MAX_STOP_CHARS} characters long")


def check_seed(seed: int | None, rows: int = 1) -> None:
    """QuillError unless `seed` (of the first of `rows` rows; row i uses seed + i) is in range."""
    if seed is not None and not 0 <= seed <= SEED_LIMIT - rows:
        raise QuillError(f"seed must be in 0 .. 2**63 - {rows}, got {shown(seed)}")


def encode_prompt(tokenizer: Tokenizer, prompt: str, block_size: int) -> list[int]:
    """The prompt's ids, or a start token for an empty prompt; QuillError if it is too long."""
    ids = tokenizer.encode(prompt)
    if len(ids) > block_size:
        raise QuillError(
            f"prompt is {len(ids)} tokens long, longer than the model's context of {block_size}"
        )
    return ids


def start_ids(tokenizer: Tokenizer) -> list[int]:
    """What an empty prompt starts from: <|endoftext|>, else a newline, else token 0."""
    if tokenizer.eot_id is not None:
        return [tokenizer.eot_id]
    try:
        ids = tokenizer.encode("\n")
    except QuillError:
        ids = []
    return ids[:1] or [0]


def _seed_generator(device: torch.device, seed: int | None) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed if seed is not None else int.from_bytes(os.urandom(8), "little") >> 1)
    return g


class TextStream:
    """Turns one row's new token ids into text pieces that are safe to show.

    Decodes the new ids and emits only what is new and stable: a trailing U+FFFD (half
    of a UTF-8 character from a byte-level BPE token) and a tail that could be the start of a
    stop string are held back until the next token settles them. When a stop string appears,
    the text ends just before it.
    """

    def __init__(self, tokenizer: Tokenizer, stop: list[str] | None = None,
                 end_ids: Collection[int] | None = None):
        self.tokenizer = tokenizer
        self.stop = [s for s in (stop or []) if s]
        # tokens that end the text (not shown): <|endoftext|>, or a chat turn's end tokens
        self.end_ids = set(end_ids) if end_ids is not None else {tokenizer.eot_id}
        self.ids: list[int] = []
        self.text = ""  # the decoded text so far
        self.emitted = 0  # characters of it already given out
        self.done = False
        # ids[:clean_ids] decode to clean_text, ending on a whole character: later steps decode
        # only the ids after it, so a step costs the same at token 10 and at token 10,000
        self.clean_ids = 0
        self.clean_text = ""

    def add(self, token: int) -> str:
        """Take one token; return the text that can be shown now ("" if none yet)."""
        if self.done:
            return ""
        final = False
        if token in self.end_ids:
            final = True  # end of text: stop there (the token itself is not shown)
        else:
            self.ids.append(token)
            tail = self.tokenizer.decode(self.ids[self.clean_ids :])
            self.text = self.clean_text + tail
            if not tail.endswith("\ufffd"):
                self.clean_ids, self.clean_text = len(self.ids), self.text
        return self._emit(final)

    def finish(self) -> str:
        """Everything still held back, at the end of generation."""
        return "" if self.done else self._emit(final=True)

    def _emit(self, final: bool) -> str:
        text = self.text
        end = len(text)
        if self.stop:
            # a stop string may straddle what was already emitted: search from a little before
            lo = max(0, self.emitted - max(len(s) for s in self.stop))
            hits = [i for i in (text.find(s, lo) for s in self.stop) if i >= 0]
            if hits:
                end = min(hits)
                self.done = final = True
        if not final:
            while end > self.emitted and text[end - 1] == "\ufffd":
                end -= 1  # possibly a UTF-8 character cut in half
            for s in self.stop:  # a tail that may grow into a stop string waits
                for n in range(min(len(s) - 1, end - self.emitted), 0, -1):
                    if text[end - n : end] == s[:n]:
                        end -= n
                        break
        if final:
            self.done = True
        piece = text[self.emitted : end] if end > self.emitted else ""
        self.emitted = max(self.emitted, end)
        return piece


def _prepare(model: nn.Module, tokenizer: Tokenizer, prompts: list[str], max_new_tokens: int,
             temperature: float, top_k: int | None, top_p: float | None, min_p: float | None,
             repetition_penalty: float, stop: list[str] | None) -> list[list[int]]:
    check_sampling_args(temperature, top_k, top_p, min_p, repetition_penalty, max_new_tokens, stop)
    block_size = model.config.block_size
    return [encode_prompt(tokenizer, p, block_size) or start_ids(tokenizer) for p in prompts]


def _stream_rows(model: nn.Module, tokenizer: Tokenizer, prompts: list[str], max_new_tokens: int,
                 temperature: float, top_k: int | None, top_p: float | None, min_p: float | None,
                 repetition_penalty: float, stop: list[str] | None, seed: int | None,
                 overflow: str) -> Iterator[list[str]]:
    """Yield, each step, the new text piece of every row, until every row is done."""
    ids = _prepare(model, tokenizer, prompts, max_new_tokens, temperature, top_k, top_p, min_p,
                   repetition_penalty, stop)
    yield from stream_texts(model, tokenizer, ids, max_new_tokens, temperature, top_k, top_p, min_p,
                            repetition_penalty, stop, seed, overflow)


def stream_texts(model: nn.Module, tokenizer: Tokenizer, ids: list[list[int]], max_new_tokens: int,
                 temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                 min_p: float | None = None, repetition_penalty: float = 1.0,
                 stop: list[str] | None = None, seed: int | None = None, overflow: str = "shift",
                 end_ids: Collection[int] | None = None) -> Iterator[list[str]]:
    """Continue each row of prompt ids; yield, each step, the new text piece of every row until
    every row is done. Row b draws from a generator seeded with `seed + b`; a row ends at a stop
    string or at one of `end_ids` (default: <|endoftext|>)."""
    check_seed(seed, len(ids))
    device = next(model.parameters()).device
    base = seed if seed is not None else int.from_bytes(os.urandom(8), "little") >> 2
    generators = [_seed_generator(device, base + b) for b in range(len(ids))]
    streams = [TextStream(tokenizer, stop, end_ids) for _ in ids]
    was_training = model.training
    model.eval()
    try:
        for nxt in stream_ids(model, ids, max_new_tokens, temperature, top_k, top_p, min_p,
                              repetition_penalty, generators, overflow):
            yield [s.add(t) for s, t in zip(streams, nxt.tolist())]
            if all(s.done for s in streams):
                return
        yield [s.finish() for s in streams]
    finally:
        model.train(was_training)


def generate_stream(model: nn.Module, tokenizer: Tokenizer, prompt: str = "",
                    max_new_tokens: int = 200, temperature: float = 1.0, top_k: int | None = None,
                    top_p: float | None = None, min_p: float | None = None,
                    repetition_penalty: float = 1.0, stop: list[str] | None = None,
                    seed: int | None = None, overflow: str = "shift") -> Iterator[str]:
    """Continue `prompt`, yielding the new text in pieces as it is produced.

    Pieces never split a UTF-8 character and never show a stop string (nor the start of one
    that then completes); generation ends at the first stop string or <|endoftext|>.
    """
    for pieces in _stream_rows(model, tokenizer, [prompt], max_new_tokens, temperature, top_k,
                               top_p, min_p, repetition_penalty, stop, seed, overflow):
        if pieces[0]:
            yield pieces[0]


def generate(model: nn.Module, tokenizer: Tokenizer, prompt: str = "", max_new_tokens: int = 200,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             min_p: float | None = None, repetition_penalty: float = 1.0,
             stop: list[str] | None = None, seed: int | None = None, overflow: str = "shift") -> str:
    """Continue `prompt` and return the new text (the prompt and any stop string not included).

    temperature 0 is greedy decoding; `seed` fixes the output. See `sample_next` for the
    sampling controls and the module docstring for `overflow` (generating past block_size).
    """
    return "".join(generate_stream(model, tokenizer, prompt, max_new_tokens, temperature, top_k,
                                   top_p, min_p, repetition_penalty, stop, seed, overflow))


def generate_batch(model: nn.Module, tokenizer: Tokenizer, prompts: list[str],
                   max_new_tokens: int = 200, temperature: float = 1.0, top_k: int | None = None,
                   top_p: float | None = None, min_p: float | None = None,
                   repetition_penalty: float = 1.0, stop: list[str] | None = None,
                   seed: int | None = None, overflow: str = "shift") -> list[str]:
    """Continue every prompt in one batch; returns the new text of each.

    Row b draws from its own generator seeded with `seed + b`, so it equals
    `generate(model, tokenizer, prompts[b], ..., seed=seed + b)`; the same prompt repeated
    gives different samples.
    """
    if isinstance(prompts, str) or not prompts:
        raise QuillError("prompts must be a non-empty list of strings")
    out = [""] * len(prompts)
    for pieces in _stream_rows(model, tokenizer, list(prompts), max_new_tokens, temperature, top_k,
                               top_p, min_p, repetition_penalty, stop, seed, overflow):
        out = [o + p for o, p in zip(out, pieces)]
    return out
