"""Log-probabilities of given tokens, batched: what benchmarks and the API's `logprobs` ask.

    score_continuations(model, [(context_ids, continuation_ids), ...])  -> [Score(logprob, greedy)]
    prompt_logprobs(model, [ids, ...], top=5)  -> [PositionScores of tokens 1.. of each row]

A request scores the tokens at some positions of a sequence: position t's logits predict token
t + 1. Requests are sorted longest first (as lm-evaluation-harness's hf backend sorts them: the
first batch is the largest, so memory runs out at once if it will, and the rows of a batch have
nearly one length), cut into batches, right-padded (padding after the end of a causal sequence
changes nothing before it) and run once. The GPT's LM head (for GPT-2's 50,257-token vocabulary
the largest matrix of the model) and the softmax over the vocabulary run only at the positions
that are scored (`GPT.hidden_states` / `GPT.head`); models without that split (the ladder's
rungs) give logits everywhere and the scored positions are picked from them.

Requests that share their context (the choices of a multiple-choice question) run it once: the
contexts of a batch fill a KV cache (left-padded to one length), the cache is copied to each
choice's row, and the rows then run only their own tokens. On a HellaSwag-shaped question (a
context of ~60 tokens, four endings of ~20) that is 140 tokens through the model instead of 320.

A context and continuation longer than the model's context keep their last block_size + 1
tokens: the context is cut from the left, as the harness's hf backend does. A continuation
longer than the context itself (the hf backend refuses it) is scored in pieces of block_size
tokens, each after as much of what precedes it as fits.
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
from torch.nn import functional as F
from tqdm import tqdm

from .errors import QuillError
from .model import KVCache

HEAD_CHUNK = 1024  # scored positions per LM-head call: bounds the (positions, vocab) logits


@dataclass
class Score:
    """A continuation's log-likelihood, and whether greedy decoding would have produced it."""

    logprob: float  # sum of log p(token | everything before it) over the continuation, nats
    greedy: bool  # every continuation token is the most likely one at its position


@dataclass
class PositionScores:
    """Per scored position of one row: the target token's log-probability and the top tokens."""

    logprobs: torch.Tensor  # (n,) float32
    is_top: torch.Tensor  # (n,) bool: the target is the most likely token there
    top_ids: torch.Tensor | None = None  # (n, k) most likely tokens, most likely first
    top_logprobs: torch.Tensor | None = None  # (n, k)


@dataclass
class _Row:
    """One sequence to run: `inputs` go in; positions start.. predict `targets`."""

    inputs: list[int]
    start: int
    targets: list[int]


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _activation_dtype(model: nn.Module) -> torch.dtype:
    """The dtype the model computes in: its first floating-point parameter's (the KV cache's)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def _scores(model: nn.Module, h: torch.Tensor, rows: Sequence[_Row], top: int, logits: bool
            ) -> list[PositionScores]:
    """The rows' scores from the hidden states (or, `logits`, the logits) of their scored
    positions, (N, C) in row order: LM head, log-softmax and the targets, HEAD_CHUNK at a time."""
    targets = torch.tensor([t for r in rows for t in r.targets], dtype=torch.long, device=h.device)
    lp_parts, hit_parts, top_ids, top_lps = [], [], [], []
    for i in range(0, h.size(0), HEAD_CHUNK):
        chunk = h[i : i + HEAD_CHUNK]
        logp = F.log_softmax((chunk if logits else model.head(chunk)).float(), dim=-1)  # (n, vocab)
        tgt = targets[i : i + HEAD_CHUNK]
        lp_parts.append(logp.gather(1, tgt[:, None])[:, 0])
        hit_parts.append(logp.argmax(dim=-1) == tgt)
        if top:
            values, ids = logp.topk(min(top, logp.size(-1)), dim=-1)
            top_ids.append(ids)
            top_lps.append(values)
    counts = [len(r.targets) for r in rows]
    lps = torch.cat(lp_parts).cpu().split(counts)
    hits = torch.cat(hit_parts).cpu().split(counts)
    if top:
        tids = torch.cat(top_ids).cpu().split(counts)
        tlps = torch.cat(top_lps).cpu().split(counts)
        return [PositionScores(lp, hit, ti, tl) for lp, hit, ti, tl in zip(lps, hits, tids, tlps)]
    return [PositionScores(lp, hit) for lp, hit in zip(lps, hits)]


@torch.inference_mode()
def _run_rows(model: nn.Module, rows: Sequence[_Row], top: int) -> list[PositionScores]:
    """One forward pass over `rows` (right-padded to one length); their scored positions."""
    device = _device(model)
    L = max(len(r.inputs) for r in rows)
    x = torch.tensor([r.inputs + [0] * (L - len(r.inputs)) for r in rows], dtype=torch.long, device=device)
    b_idx = torch.cat([torch.full((len(r.targets),), b, dtype=torch.long) for b, r in enumerate(rows)])
    p_idx = torch.cat([torch.arange(r.start, r.start + len(r.targets)) for r in rows])
    b_idx, p_idx = b_idx.to(device), p_idx.to(device)
    if callable(getattr(model, "hidden_states", None)):
        return _scores(model, model.hidden_states(x)[b_idx, p_idx], rows, top, logits=False)
    # the ladder's rungs: logits everywhere, then the scored positions
    return _scores(model, model(x)[0][b_idx, p_idx], rows, top, logits=True)


@torch.inference_mode()
def _run_shared(model: nn.Module, rows: Sequence[_Row], top: int) -> list[PositionScores]:
    """Rows whose scored tokens follow a prefix they share (the choices of a multiple-choice
    question after its context): each distinct prefix runs once into a KV cache, which is copied
    to its rows; then the rows run only their own tokens. Rows end at their last target."""
    device, dtype = _device(model), _activation_dtype(model)
    index: dict[tuple[int, ...], int] = {}
    group = [index.setdefault(tuple(r.inputs[: r.start + 1]), len(index)) for r in rows]
    prefixes = list(index)
    P = max(len(p) for p in prefixes)
    S = max(len(r.inputs) - r.start - 1 for r in rows)
    cfg = replace(model.config, block_size=P + S)  # a cache just large enough
    pad = torch.tensor([P - len(p) for p in prefixes], device=device)
    x = torch.tensor([[0] * (P - len(p)) + list(p) for p in prefixes], dtype=torch.long, device=device)
    cache = KVCache(cfg, len(prefixes), device, dtype, pad)
    last = model.hidden_states(x, cache)[:, -1]  # (G, C): predicts each row's first target
    if S:
        g = torch.tensor(group, device=device)
        row_cache = KVCache(cfg, len(rows), device, dtype, pad[g])
        row_cache.k.copy_(cache.k.index_select(1, g))
        row_cache.v.copy_(cache.v.index_select(1, g))
        row_cache.pos = cache.pos
        own = [r.inputs[r.start + 1 :] for r in rows]
        y = torch.tensor([o + [0] * (S - len(o)) for o in own], dtype=torch.long, device=device)
        after = model.hidden_states(y, row_cache)  # (R, S, C)
    parts = []
    for b, r in enumerate(rows):
        parts.append(last[group[b]][None])
        if len(r.targets) > 1:
            parts.append(after[b, : len(r.targets) - 1])
    return _scores(model, torch.cat(parts), rows, top, logits=False)


def _batches(rows: Sequence[_Row], batch_size: int) -> list[list[int]]:
    """Row indices in batches of at most `batch_size`, longest first."""
    order = sorted(range(len(rows)), key=lambda i: (-len(rows[i].inputs), rows[i].inputs))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def _shared_batches(rows: Sequence[_Row], shared: list[int], batch_size: int, block_size: int) -> list[list[int]]:
    """The `shared` rows in batches of at most `batch_size` rows, each prefix's rows together
    (longest prefix + own tokens first), each batch's longest prefix and longest own part within
    the context."""
    by_prefix: dict[tuple[int, ...], list[int]] = {}
    for i in shared:
        by_prefix.setdefault(tuple(rows[i].inputs[: rows[i].start + 1]), []).append(i)
    groups = sorted(by_prefix.items(), key=lambda kv: (-len(kv[0]) - max(len(rows[i].targets) for i in kv[1]), kv[0]))
    out: list[list[int]] = []
    batch: list[int] = []
    P = S = 0  # the batch's longest prefix and longest own part
    for prefix, members in groups:
        for i in members:
            own = len(rows[i].targets) - 1
            if batch and (len(batch) == batch_size or max(P, len(prefix)) + max(S, own) > block_size):
                out.append(batch)
                batch, P, S = [], 0, 0
            batch.append(i)
            P, S = max(P, len(prefix)), max(S, own)
    return out + ([batch] if batch else [])


def _run_batches(model: nn.Module, rows: list[_Row], batches: list[tuple[bool, list[int]]], top: int,
                 progress: bool, unit: str) -> list[PositionScores]:
    """Run each (shared?, row indices) batch; the results in the rows' order."""
    out: list[PositionScores | None] = [None] * len(rows)
    was_training = model.training
    model.eval()
    bar = tqdm(total=len(rows), disable=not progress, unit=unit, dynamic_ncols=True, file=sys.stderr)
    try:
        for shared, chunk in batches:
            run = _run_shared if shared else _run_rows
            for j, scores in zip(chunk, run(model, [rows[j] for j in chunk], top)):
                out[j] = scores
            bar.update(len(chunk))
    finally:
        bar.close()
        model.train(was_training)
    return out  # type: ignore[return-value]


def _run_sorted(model: nn.Module, rows: list[_Row], batch_size: int, top: int, progress: bool,
                unit: str, share_prefixes: bool = False) -> list[PositionScores]:
    """Run `rows` longest first in batches of `batch_size`; the results in the original order.
    With `share_prefixes` (models with a KV cache), rows that share their prefix run it once."""
    if batch_size < 1:
        raise QuillError(f"batch_size must be positive, got {batch_size}")
    shared: list[int] = []
    if share_prefixes and _can_share(model):
        count = Counter(tuple(r.inputs[: r.start + 1]) for r in rows)
        shared = [i for i, r in enumerate(rows) if count[tuple(r.inputs[: r.start + 1])] > 1]
    alone = sorted(set(range(len(rows))) - set(shared))
    plan = [(True, b) for b in _shared_batches(rows, shared, batch_size, model.config.block_size)]
    plan += [(False, [alone[i] for i in b]) for b in _batches([rows[i] for i in alone], batch_size)]
    return _run_batches(model, rows, plan, top, progress, unit)


def _can_share(model: nn.Module) -> bool:
    """Whether the model takes a KV cache and gives hidden states (the GPT; not the ladder)."""
    import inspect

    return callable(getattr(model, "hidden_states", None)) and "cache" in inspect.signature(model.forward).parameters


def continuation_row(context: Sequence[int], continuation: Sequence[int], block_size: int) -> _Row:
    """The model's input for scoring `continuation` after `context` (the harness's hf backend's
    layout): the last block_size + 1 tokens of both, all but the last as input."""
    if not context:
        raise QuillError("a context of at least one token is needed (a start token for an empty one)")
    if not 1 <= len(continuation) <= block_size:
        raise QuillError(f"a continuation to score must have 1 to {block_size} tokens, got {len(continuation)}")
    whole = (list(context) + list(continuation))[-(block_size + 1):]
    inputs = whole[:-1]
    return _Row(inputs, len(inputs) - len(continuation), list(continuation))


def score_continuations(model: nn.Module, requests: Sequence[tuple[Sequence[int], Sequence[int]]],
                        batch_size: int = 16, progress: bool = False, share_prefixes: bool = True) -> list[Score]:
    """log p(continuation | context) and greediness of each (context ids, continuation ids) pair.

    Equal requests are run once. Contexts are cut from the left to fit the model's block_size;
    a longer continuation is scored in pieces (module docstring)."""
    block_size = model.config.block_size
    keys = [(tuple(c), tuple(k)) for c, k in requests]
    unique = list(dict.fromkeys(keys))
    rows, owner = [], []
    for i, (context, continuation) in enumerate(unique):
        for start in range(0, max(len(continuation), 1), block_size):
            rows.append(continuation_row(context + continuation[:start], continuation[start : start + block_size],
                                         block_size))
            owner.append(i)
    logprob, greedy = [0.0] * len(unique), [True] * len(unique)
    for i, s in zip(owner, _run_sorted(model, rows, batch_size, 0, progress, "request", share_prefixes)):
        logprob[i] += float(s.logprobs.double().sum())
        greedy[i] = greedy[i] and bool(s.is_top.all())
    by_key = {key: Score(lp, g) for key, lp, g in zip(unique, logprob, greedy)}
    return [by_key[key] for key in keys]


def prompt_logprobs(model: nn.Module, prompts: Sequence[Sequence[int]], top: int = 0,
                    batch_size: int = 16) -> list[PositionScores]:
    """For each prompt (at most block_size tokens): the log-probability of each of its tokens
    after the first, given the tokens before it, and the `top` most likely tokens there."""
    block_size = model.config.block_size
    rows = []
    for ids in prompts:
        if not 1 <= len(ids) <= block_size:
            raise QuillError(f"a prompt to score must have 1 to {block_size} tokens, got {len(ids)}")
        rows.append(_Row(list(ids[:-1]) or list(ids), 0, list(ids[1:])))
    scorable = [i for i, r in enumerate(rows) if r.targets]
    out = [PositionScores(torch.zeros(0), torch.zeros(0, dtype=torch.bool),
                          torch.zeros(0, top, dtype=torch.long) if top else None,
                          torch.zeros(0, top) if top else None) for _ in rows]
    if scorable:
        for i, s in zip(scorable, _run_sorted(model, [rows[i] for i in scorable], batch_size, top,
                                              False, "prompt")):
            out[i] = s
    return out
