"""How likely each token was, in OpenAI's two shapes: the legacy `logprobs` of /v1/completions
and the newer one of /v1/chat/completions. One way of computing them, two ways of writing them.

/v1/completions:

    "logprobs": {"tokens": ["Hello", ","], "token_logprobs": [null, -2.31],
                 "top_logprobs": [null, {",": -2.31, " world": -2.9}], "text_offset": [0, 5]}

`logprobs: N` (0 to 5) asks, for every generated token, its log-probability and the N most
likely tokens at its place (the chosen one is always among them, so up to N + 1). With `echo`
the prompt's tokens are scored as well (its first token has nothing before it: null), and
`max_tokens: 0` with `echo` scores a text without generating anything: how lm-evaluation-harness's
`local-completions` model asks for log-likelihoods. Log-probabilities are the model's own
distribution (log-softmax of its logits), before temperature, top-k or any other sampling
setting. `tokens` are the tokens decoded one by one; a byte-level token that is not UTF-8 on its
own (a piece of a character) is written as OpenAI writes it, "bytes:\\xe2\\x80". `text_offset` is
where each token starts in the choice's text (the echoed prompt included), counting the
characters of the tokens before it.

/v1/chat/completions: `logprobs: true` and `top_logprobs: N` (0 to 20) ask for

    "logprobs": {"content": [{"token": "Hel", "logprob": -0.12, "bytes": [72, 101, 108],
                              "top_logprobs": [{"token": "Hel", "logprob": -0.12, "bytes": [...]}, ...]}],
                 "refusal": null}

one entry per token of the reply: its text, log-probability and UTF-8 bytes, and exactly the N
most likely tokens at its place, most likely first (a sampled token need not be among them). A
piece of a UTF-8 character is written as its bytes escaped ("\\xe2\\x80", without the legacy
"bytes:" prefix); `bytes` has the exact bytes, so a client joins the pieces of a character.
The token that ends the reply (<|end|>) is not part of the content and is not listed.

The engine reports them to a request as events: ("prompt_logprobs", [TokenLogprob list per row])
once, before generating, and ("logprobs", [TokenLogprob or None per row]) at every step.
`LogprobsCollector` turns those into each choice's `logprobs` object (`ChoiceLogprobs`, legacy;
`ChatChoiceLogprobs`, chat), whole or (streaming) in the pieces produced since the last chunk.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch.nn import functional as F

from ..scoring import PositionScores
from ..tokenizers import Tokenizer

MAX_LOGPROBS = 5  # OpenAI's limit for the legacy completions API
MAX_TOP_LOGPROBS = 20  # OpenAI's limit for chat completions' top_logprobs


@dataclass
class TokenLogprob:
    """One token of a choice: its log-probability (None: a prompt's first token) and the most
    likely tokens at its place, as (id, log-probability), most likely first."""

    token: int
    logprob: float | None
    top: list[tuple[int, float]] = field(default_factory=list)


def step_logprobs(logits: torch.Tensor, tokens: torch.Tensor, top: int) -> list[TokenLogprob]:
    """Each row's drawn token (B,) under the step's logits (B, vocab), and its `top` alternatives."""
    logp = F.log_softmax(logits.float(), dim=-1)
    chosen = logp.gather(1, tokens[:, None])[:, 0].tolist()
    out = [TokenLogprob(t, lp) for t, lp in zip(tokens.tolist(), chosen)]
    if top:
        values, ids = logp.topk(min(top, logp.size(-1)), dim=-1)
        for entry, row_ids, row_values in zip(out, ids.tolist(), values.tolist()):
            entry.top = list(zip(row_ids, row_values))
    return out


def prompt_entries(ids: list[int], scores: PositionScores) -> list[TokenLogprob]:
    """A scored prompt as entries: the first token null, then each token given those before it."""
    if not ids:
        return []
    out = [TokenLogprob(ids[0], None)]
    top_ids = scores.top_ids.tolist() if scores.top_ids is not None else [[] for _ in ids[1:]]
    top_lps = scores.top_logprobs.tolist() if scores.top_logprobs is not None else [[] for _ in ids[1:]]
    for token, lp, ti, tl in zip(ids[1:], scores.logprobs.tolist(), top_ids, top_lps):
        out.append(TokenLogprob(token, lp, list(zip(ti, tl))))
    return out


def token_bytes(tokenizer: Tokenizer, token: int) -> bytes:
    """One token's bytes: a byte-level BPE token's own, else its text in UTF-8."""
    decode_bytes = getattr(tokenizer, "decode_bytes", None)
    return decode_bytes([token]) if callable(decode_bytes) else tokenizer.decode([token]).encode("utf-8")


def escaped(raw: bytes) -> str:
    return "".join(f"\\x{b:02x}" for b in raw)


def token_text(tokenizer: Tokenizer, token: int) -> str:
    """One token as text; a piece of a UTF-8 character as "bytes:\\xNN..." (OpenAI's legacy way)."""
    text = tokenizer.decode([token])
    if "\ufffd" in text:
        raw = token_bytes(tokenizer, token)
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + escaped(raw)
    return text


class ChoiceLogprobs:
    """The `logprobs` object of one choice, built token by token."""

    def __init__(self, tokenizer: Tokenizer, top: int):
        self.tokenizer, self.top = tokenizer, top
        self.tokens: list[str] = []
        self.token_logprobs: list[float | None] = []
        self.top_logprobs: list[dict[str, float] | None] = []
        self.text_offset: list[int] = []
        self.offset = 0  # characters of the choice's text so far
        self.sent = 0  # entries already streamed

    def add(self, entry: TokenLogprob) -> None:
        self.tokens.append(token_text(self.tokenizer, entry.token))
        self.token_logprobs.append(entry.logprob)
        self.text_offset.append(self.offset)
        self.offset += len(self.tokenizer.decode([entry.token]))
        if entry.logprob is None:
            self.top_logprobs.append(None)
            return
        alternatives: dict[str, float] = {}
        for token, lp in [*entry.top[: self.top], (entry.token, entry.logprob)]:
            key = token_text(self.tokenizer, token)
            alternatives[key] = max(lp, alternatives.get(key, float("-inf")))  # two ids, one text
        self.top_logprobs.append(alternatives)

    def openai(self, start: int = 0) -> dict[str, Any]:
        """OpenAI's object for the entries from `start` on."""
        return {"tokens": self.tokens[start:], "token_logprobs": self.token_logprobs[start:],
                "top_logprobs": self.top_logprobs[start:], "text_offset": self.text_offset[start:]}

    def take(self) -> dict[str, Any] | None:
        """The entries not yet streamed (None if there are none), marked as streamed."""
        if self.sent == len(self.tokens):
            return None
        start, self.sent = self.sent, len(self.tokens)
        return self.openai(start)


class ChatChoiceLogprobs:
    """The `logprobs` object of one chat choice (OpenAI's newer shape), built token by token;
    the tokens in `skip` (those that end a reply) are left out."""

    def __init__(self, tokenizer: Tokenizer, top: int, skip: frozenset[int] = frozenset()):
        self.tokenizer, self.top, self.skip = tokenizer, top, skip
        self.content: list[dict[str, Any]] = []
        self.sent = 0  # entries already streamed
        self._described: dict[int, tuple[str, list[int]]] = {}  # token id -> (text, bytes)

    def describe(self, token: int, logprob: float) -> dict[str, Any]:
        """{token, logprob, bytes} of one token: its text (a piece of a character: its bytes escaped)."""
        if token not in self._described:
            raw = token_bytes(self.tokenizer, token)
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = escaped(raw)
            self._described[token] = (text, list(raw))
        text, raw_list = self._described[token]
        return {"token": text, "logprob": logprob, "bytes": list(raw_list)}

    def add(self, entry: TokenLogprob) -> None:
        if entry.token in self.skip or entry.logprob is None:
            return
        top = [self.describe(t, lp) for t, lp in entry.top[: self.top]]
        self.content.append({**self.describe(entry.token, entry.logprob), "top_logprobs": top})

    def openai(self, start: int = 0) -> dict[str, Any]:
        """OpenAI's object for the entries from `start` on."""
        return {"content": self.content[start:], "refusal": None}

    def take(self) -> dict[str, Any] | None:
        """The entries not yet streamed (None if there are none), marked as streamed."""
        if self.sent == len(self.content):
            return None
        start, self.sent = self.sent, len(self.content)
        return self.openai(start)


class LogprobsCollector:
    """Every choice's logprobs of one request, from the engine's events: the legacy shape, or
    (`chat`) the chat shape without the tokens in `end_ids`."""

    def __init__(self, tokenizer: Tokenizer, rows: int, top: int, chat: bool = False,
                 end_ids: frozenset[int] = frozenset()):
        self.choices: list[ChoiceLogprobs] | list[ChatChoiceLogprobs] = (
            [ChatChoiceLogprobs(tokenizer, top, end_ids) for _ in range(rows)] if chat
            else [ChoiceLogprobs(tokenizer, top) for _ in range(rows)])

    def consume(self, event: tuple) -> bool:
        """Take a "prompt_logprobs" or "logprobs" event; False for any other event."""
        if event[0] not in ("prompt_logprobs", "logprobs"):
            return False
        for choice, entries in zip(self.choices, event[1]):
            if entries is None:
                continue
            for entry in entries if isinstance(entries, list) else [entries]:
                choice.add(entry)
        return True
