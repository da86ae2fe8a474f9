r"""Loss, perplexity, bits per byte and word perplexity of a model on any text, with sliding windows.

The text is encoded once and read in windows of `block_size` tokens that start every `stride`
tokens, as in Hugging Face's perplexity guide
(https://huggingface.co/docs/transformers/perplexity). Each token is scored once, in the first
window whose end reaches past it, so with a stride below `block_size` every scored token (past
the first window) sees at least `block_size - stride` tokens of context:

    tokens   0 1 2 3 4 5 6 7 8 9
    window   [0 . . . . 5)            block_size 6, stride 3: scores tokens 1..5
    window         [3 . . . . 8)      scores 6..7, with tokens 3.. as context
    window               [6 . . . 10) scores 8..9

A stride equal to `block_size` gives disjoint windows; the first token of each window is then
not scored (it has no context inside its window), exactly as in the guide.

    loss           mean negative log-likelihood of the scored tokens, in nats
    perplexity     exp(loss)
    bits per byte  the same log-likelihood in bits, divided by the UTF-8 bytes of the scored
                   tokens: comparable between tokenizers (a char model and GPT-2's BPE)
    word perplexity  exp(summed negative log-likelihood / words), words counted as
                   lm-evaluation-harness counts them (`len(re.split(r"\s+", text))`): also
                   comparable between tokenizers, and the harness's figure for the same text

A character-level tokenizer knows only the characters of its training text; `unknown="skip"`
drops the others before scoring (`encode_text`) and the result says how many were dropped.
"""

from __future__ import annotations

import math
import re
import sys
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F
from tqdm import tqdm

from .errors import QuillError
from .tokenizers import Tokenizer


@dataclass
class EvalResult:
    tokens: int  # tokens in the text
    scored: int  # tokens whose loss counts
    bytes: int  # UTF-8 bytes of the scored tokens
    windows: int
    block_size: int
    stride: int
    nll: float  # summed negative log-likelihood of the scored tokens, nats
    loss: float
    perplexity: float
    bits_per_byte: float
    words: int = 0  # words in the text, as lm-evaluation-harness counts them
    word_perplexity: float = float("nan")  # exp(nll / words)
    dropped: int = 0  # characters outside a char tokenizer's vocabulary, dropped (unknown="skip")

    def to_dict(self) -> dict:
        return asdict(self)


UNKNOWN_POLICIES = ("error", "skip")


def safe_exp(x: float) -> float:
    """exp(x), or infinity where it overflows (a perplexity of an untrained model can)."""
    try:
        return math.exp(x)
    except OverflowError:
        return float("inf")


def count_words(text: str) -> int:
    """Words as lm-evaluation-harness counts them for word perplexity."""
    return len(re.split(r"\s+", text))


def encode_text(tokenizer: Tokenizer, text: str, unknown: str = "error") -> tuple[list[int], int]:
    """(token ids of `text`, characters dropped). Only a character-level tokenizer can meet a
    character it does not know: "error" stops there (QuillError), "skip" drops every such
    character and counts them."""
    if unknown not in UNKNOWN_POLICIES:
        raise QuillError(f"unknown must be error or skip, got {unknown!r}")
    stoi = getattr(tokenizer, "stoi", None) if tokenizer.kind == "char" else None
    if unknown == "skip" and stoi is not None:
        kept = "".join(c for c in text if c in stoi)
        return tokenizer.encode(kept), len(text) - len(kept)
    try:
        return tokenizer.encode(text), 0
    except QuillError as e:
        if stoi is None:
            raise
        raise QuillError(f"{e}; skip such characters with --unknown skip") from None


def sliding_windows(n_tokens: int, block_size: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first_scored) for each window over `n_tokens` tokens, as HF's guide.

    The window feeds tokens [begin, end) to the model and scores the tokens at positions
    [first_scored, end); position 0 is never scored (nothing predicts it).
    """
    if block_size < 2:
        raise QuillError(f"block_size must be at least 2 to score anything, got {block_size}")
    if not 1 <= stride <= block_size:
        raise QuillError(f"stride must be between 1 and the block size {block_size}, got {stride}")
    if n_tokens < 2:
        raise QuillError(f"the text is {n_tokens} token(s) long; at least 2 are needed to score one")
    out = []
    prev_end = 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + block_size, n_tokens)
        out.append((begin, end, max(prev_end, begin + 1)))
        prev_end = end
        if end == n_tokens:
            break
    return out


def token_byte_lengths(tokenizer: Tokenizer) -> torch.Tensor:
    """UTF-8 bytes of every token id (the raw bytes, for byte-level BPE tokens)."""
    decode_bytes = getattr(tokenizer, "decode_bytes", None)
    if callable(decode_bytes):
        lengths = [len(decode_bytes([i])) for i in range(tokenizer.vocab_size)]
    else:
        lengths = [len(tokenizer.decode([i]).encode("utf-8")) for i in range(tokenizer.vocab_size)]
    return torch.tensor(lengths, dtype=torch.long)


@torch.no_grad()
def evaluate_ids(model: nn.Module, ids: list[int] | torch.Tensor, stride: int | None = None,
                 batch_size: int = 8, byte_lengths: torch.Tensor | None = None,
                 progress: bool = True) -> EvalResult:
    """Score token ids with sliding windows of the model's block_size (see the module doc)."""
    block_size = model.config.block_size
    stride = stride if stride is not None else max(1, block_size // 2)
    ids = torch.as_tensor(ids, dtype=torch.long)
    windows = sliding_windows(len(ids), block_size, stride)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    nll, scored, n_bytes = 0.0, 0, 0
    bar = tqdm(total=len(windows), disable=not progress, unit="window", dynamic_ncols=True, file=sys.stderr)
    i = 0
    while i < len(windows):
        # a batch of consecutive windows of one length (only the last window may be shorter)
        length = windows[i][1] - windows[i][0]
        batch = [windows[i]]
        while (len(batch) < batch_size and i + len(batch) < len(windows)
               and windows[i + len(batch)][1] - windows[i + len(batch)][0] == length):
            batch.append(windows[i + len(batch)])
        x = torch.stack([ids[b:e] for b, e, _ in batch])  # (B, T)
        logits, _ = model(x.to(device))
        # position t predicts token t + 1 of the window
        losses = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), x[:, 1:].to(device),
                                 reduction="none").cpu()  # (B, T-1)
        for row, (b, e, first) in enumerate(batch):
            keep = slice(first - b - 1, e - b - 1)
            nll += losses[row, keep].double().sum().item()
            scored += e - first
            if byte_lengths is not None:
                n_bytes += int(byte_lengths[ids[first:e]].sum())
        i += len(batch)
        bar.update(len(batch))
        bar.set_postfix(loss=f"{nll / scored:.4f}")
    bar.close()
    model.train(was_training)
    loss = nll / scored
    return EvalResult(
        tokens=len(ids), scored=scored, bytes=n_bytes, windows=len(windows), block_size=block_size,
        stride=stride, nll=nll, loss=loss, perplexity=math.exp(loss),
        bits_per_byte=nll / math.log(2) / n_bytes if n_bytes else float("nan"),
    )


def evaluate_text(model: nn.Module, tokenizer: Tokenizer, text: str, stride: int | None = None,
                  batch_size: int = 8, max_tokens: int | None = None, progress: bool = True,
                  unknown: str = "error") -> EvalResult:
    """Loss, perplexity, bits per byte and word perplexity of `model` on `text`.

    With `max_tokens`, words are counted in the text those tokens decode to."""
    if max_tokens is not None and max_tokens < 2:
        raise QuillError(f"max_tokens must be at least 2, got {max_tokens}")
    ids, dropped = encode_text(tokenizer, text, unknown)
    if max_tokens is not None and len(ids) > max_tokens:
        ids = ids[:max_tokens]
        text = tokenizer.decode(ids)
    result = evaluate_ids(model, ids, stride, batch_size, token_byte_lengths(tokenizer), progress)
    result.words = count_words(text)
    result.word_perplexity = safe_exp(result.nll / result.words)
    result.dropped = dropped
    return result


def format_result(r: EvalResult) -> str:
    rows = [
        ("tokens scored", f"{r.scored:,} of {r.tokens:,} ({r.windows:,} windows of {r.block_size}, "
                          f"stride {r.stride})"),
        ("bytes scored", f"{r.bytes:,}"),
        ("loss", f"{r.loss:.4f} nats/token"),
        ("perplexity", f"{r.perplexity:.3f}"),
        ("bits per byte", f"{r.bits_per_byte:.4f}"),
        ("word perplexity", f"{r.word_perplexity:.3f} ({r.words:,} words)"),
    ]
    if r.dropped:
        rows.append(("dropped", f"{r.dropped:,} characters outside the vocabulary"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
