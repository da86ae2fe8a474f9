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

A context and continuation longer than the model's context keep their last block_size + 1
tokens: the context is cut from the left, as the harness's hf backend does. A continuation
longer than the context itself (the hf backend refuses it) is scored in pieces of block_size
tokens, each after as much of what precedes it as fits.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F
from tqdm import tqdm

from .errors import QuillError

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


@torch.inference_mode()
def _run_rows(model: nn.Module, rows: Sequence[_Row], top: int) -> list[PositionScores]:
    """One forward pass over `rows` (right-padded to one length); their scored positions."""
    device = _device(model)
    L = max(len(r.inputs) for r in rows)
    x = torch.tensor([r.inputs + [0] * (L - len(r.inputs)) for r in rows], dtype=torch.long, device=device)
    b_idx = torch.cat([torch.full((len(r.targets),), b, dtype=torch.long) for b, r in enumerate(rows)])
    p_idx = torch.cat([torch.arange(r.start, r.start + len(r.targets)) for r in rows])
    targets = torch.tensor([t for r in rows for t in r.targets], dtype=torch.long, device=device)
    b_idx, p_idx = b_idx.to(device), p_idx.to(device)
    hidden_states = getattr(model, "hidden_states", None)
    if callable(hidden_states):
        h = hidden_states(x)[b_idx, p_idx]  # (N, C): only the scored positions
        logits_of = model.head
    else:  # the ladder's rungs: logits everywhere, then the scored positions
        h = model(x)[0][b_idx, p_idx]  # (N, vocab)
        logits_of = None
    lp_parts, hit_parts, top_ids, top_lps = [], [], [], []
    for i in range(0, h.size(0), HEAD_CHUNK):
        logits = h[i : i + HEAD_CHUNK]
        if logits_of is not None:
            logits = logits_of(logits)
        logp = F.log_softmax(logits.float(), dim=-1)  # (n, vocab)
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


def _run_sorted(model: nn.Module, rows: list[_Row], batch_size: int, top: int, progress: bool,
                unit: str) -> list[PositionScores]:
    """Run `rows` longest first in batches of `batch_size`; the results in the original order."""
    if batch_size < 1:
        raise QuillError(f"batch_size must be positive, got {batch_size}")
    order = sorted(range(len(rows)), key=lambda i: (-len(rows[i].inputs), rows[i].inputs))
    out: list[PositionScores | None] = [None] * len(rows)
    was_training = model.training
    model.eval()
    bar = tqdm(total=len(rows), disable=not progress, unit=unit, dynamic_ncols=True, file=sys.stderr)
    try:
        for i in range(0, len(order), batch_size):
            chunk = order[i : i + batch_size]
            for j, scores in zip(chunk, _run_rows(model, [rows[j] for j in chunk], top)):
                out[j] = scores
            bar.update(len(chunk))
    finally:
        bar.close()
        model.train(was_training)
    return out  # type: ignore[return-value]


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
                        batch_size: int = 16, progress: bool = False) -> list[Score]:
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
    for i, s in zip(owner, _run_sorted(model, rows, batch_size, 0, progress, "request")):
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
