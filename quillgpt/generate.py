"""Sampling text from a trained model: the front doors over the decode engine.

The decoding itself - KV cache, batches of rows with their own settings, past block_size, stop
strings, streaming - is `quillgpt.engine`'s; the settings of a row are one
`quillgpt.sampling.Sampling`. Here are the ways in:

- `generate` (text in, text out), `generate_stream` (text pieces as they are produced),
  `generate_batch` (a list of prompts, one batch: row b uses seed + b).
- `stream_texts` (prompt ids in, each step's text piece of every row) and `stream_ids` (each
  step's token of every row, no end token: every row runs max_new_tokens), `generate_ids`
  (ids (B, T) in, (B, T + new) out).

Past `block_size` (the model has learned positions 0..block_size-1 only) the context is a
window over the last tokens: `overflow="shift"` (default) keeps the last block_size // 2
tokens and re-prefills them; `"slide"` is nanoGPT's exact sliding window (docs/generation.md).
"""

from __future__ import annotations

import os
from collections.abc import Collection, Iterator
from dataclasses import replace

import torch
import torch.nn as nn

from .engine import OVERFLOW_STRATEGIES, Request, decode, supports_cache
from .errors import QuillError
from .sampling import (
    MAX_STOP_CHARS,
    MAX_STOP_STRINGS,
    SEED_LIMIT,
    Sampling,
    TextStream,
    check_sampling_args,
    check_seed,
    sample_next,
)
from .tokenizers import Tokenizer

__all__ = [
    "MAX_STOP_CHARS", "MAX_STOP_STRINGS", "OVERFLOW_STRATEGIES", "SEED_LIMIT", "Sampling", "TextStream",
    "check_sampling_args", "check_seed", "encode_prompt", "generate", "generate_batch", "generate_ids",
    "generate_stream", "sample_next", "start_ids", "stream_ids", "stream_texts", "supports_cache",
]


DEFAULT = Sampling()  # frozen: a safe default argument


def row_seeds(seed: int | None, rows: int) -> list[int]:
    """Row b's seed: seed + b (a random base when `seed` is None); QuillError when out of range."""
    check_seed(seed, rows)
    base = seed if seed is not None else int.from_bytes(os.urandom(8), "little") >> 2
    return [base + b for b in range(rows)]


# --- ids in, ids out --------------------------------------------------------------------------

def stream_ids(model: nn.Module, prompts: list[list[int]], sampling: Sampling = DEFAULT, *,
               overflow: str = "shift", use_cache: bool = True) -> Iterator[torch.Tensor]:
    """Yield the next token of every row, (B,), `sampling.max_new_tokens` times: no token ends
    a row here. Row b draws with seed `sampling.seed + b`. `use_cache=False` recomputes every
    window at every step (same tokens, much slower): the reference in tests."""
    seeds = row_seeds(sampling.seed, len(prompts))
    requests = [Request(p, replace(sampling, seed=s), end_ids=()) for p, s in zip(prompts, seeds)]
    queued: list[list[int]] = [[] for _ in prompts]
    for events in decode(model, _NoText(), requests, overflow=overflow, use_cache=use_cache):
        for e in events:
            if e.token is not None:
                queued[e.row].append(e.token)
        while all(queued):  # a row whose window moved may lag a step behind the others
            yield torch.tensor([q.pop(0) for q in queued])


class _NoText:
    """A tokenizer stand-in for id streams: no text, no special tokens."""

    eot_id = None
    special_tokens: dict[str, int] = {}

    def decode(self, ids: list[int]) -> str:
        return ""


def generate_ids(model: nn.Module, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, generator: torch.Generator | None = None,
                 top_p: float | None = None, min_p: float | None = None,
                 repetition_penalty: float = 1.0, overflow: str = "shift",
                 use_cache: bool = True) -> torch.Tensor:
    """Append `max_new_tokens` tokens to every row of `idx` (B, T); returns (B, T + new).
    `generator` seeds the rows (row b: a seed drawn from it, + b)."""
    seed = None if generator is None else int(torch.randint(0, 2**62, (1,), generator=generator))
    sampling = Sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                        min_p=min_p, repetition_penalty=repetition_penalty, seed=seed)
    new = list(stream_ids(model, idx.tolist(), sampling, overflow=overflow, use_cache=use_cache))
    if not new:
        return idx
    return torch.cat([idx, torch.stack(new, dim=1).to(idx.device)], dim=1)


# --- text in, text out ------------------------------------------------------------------------

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


def stream_texts(model: nn.Module, tokenizer: Tokenizer, ids: list[list[int]],
                 sampling: Sampling = DEFAULT, *, end_ids: Collection[int] | None = None,
                 overflow: str = "shift") -> Iterator[list[str]]:
    """Continue each row of prompt ids; yield, each step, the new text piece of every row until
    every row is done. Row b draws with seed `sampling.seed + b`; a row ends at a stop string or
    at one of `end_ids` (default: <|endoftext|> and a chat model's <|end|>)."""
    sampling.check()
    seeds = row_seeds(sampling.seed, len(ids))
    requests = [Request(p, replace(sampling, seed=s), end_ids=end_ids) for p, s in zip(ids, seeds)]
    for events in decode(model, tokenizer, requests, overflow=overflow):
        pieces = [""] * len(ids)
        for e in events:
            pieces[e.row] += e.text
        yield pieces


def _text_rows(model: nn.Module, tokenizer: Tokenizer, prompts: list[str], sampling: Sampling,
               overflow: str) -> Iterator[list[str]]:
    sampling.check()
    block_size = model.config.block_size
    ids = [encode_prompt(tokenizer, p, block_size) or start_ids(tokenizer) for p in prompts]
    yield from stream_texts(model, tokenizer, ids, sampling, overflow=overflow)


def _sampling(max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None,
              min_p: float | None, repetition_penalty: float, stop: list[str] | None,
              seed: int | None) -> Sampling:
    if stop is not None and (isinstance(stop, str) or not all(isinstance(s, str) for s in stop)):
        raise QuillError("stop must be a list of strings")
    return Sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                    min_p=min_p, repetition_penalty=repetition_penalty, stop=tuple(stop or ()), seed=seed)


def generate_stream(model: nn.Module, tokenizer: Tokenizer, prompt: str = "",
                    max_new_tokens: int = 200, temperature: float = 1.0, top_k: int | None = None,
                    top_p: float | None = None, min_p: float | None = None,
                    repetition_penalty: float = 1.0, stop: list[str] | None = None,
                    seed: int | None = None, overflow: str = "shift") -> Iterator[str]:
    """Continue `prompt`, yielding the new text in pieces as it is produced.

    Pieces never split a UTF-8 character and never show a stop string (nor the start of one
    that then completes); generation ends at the first stop string or <|endoftext|>.
    """
    sampling = _sampling(max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty, stop, seed)
    for pieces in _text_rows(model, tokenizer, [prompt], sampling, overflow):
        if pieces[0]:
            yield pieces[0]


def generate(model: nn.Module, tokenizer: Tokenizer, prompt: str = "", max_new_tokens: int = 200,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             min_p: float | None = None, repetition_penalty: float = 1.0,
             stop: list[str] | None = None, seed: int | None = None, overflow: str = "shift") -> str:
    """Continue `prompt` and return the new text (the prompt and any stop string not included).

    temperature 0 is greedy decoding; `seed` fixes the output. See `Sampling` for the
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
    sampling = _sampling(max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty, stop, seed)
    out = [""] * len(prompts)
    for pieces in _text_rows(model, tokenizer, list(prompts), sampling, overflow):
        out = [o + p for o, p in zip(out, pieces)]
    return out
