"""How one row decodes: its settings (`Sampling`), how a token is drawn from the logits, and how
its ids become text (`TextStream`).

- `Sampling`: one row's settings, one frozen dataclass passed by name everywhere (the engine,
  the server, the CLI, lm-eval, RL): temperature, top-k, top-p, min-p, repetition penalty,
  max_new_tokens, stop strings, seed (the row's own generator), logprobs.
- `RowSampler`: the settings of a batch of rows as tensors; `draw(logits, uniforms, seen)`
  draws one token per row, every row with its own settings, in one set of tensor operations.
  Each row draws from one uniform number of its own generator (inverse transform sampling), so
  a row draws exactly as it would alone, whatever else is in the batch.
- `sample_next`: the same draw for a batch that shares one setting (tests, scripts).
- `token_logprobs`: the drawn tokens' log-probabilities under the model's own distribution
  (temperature 1, no filtering) and the most likely alternatives.
- `TextStream`: one row's ids -> text pieces that are safe to show (whole UTF-8 characters, no
  stop string, no special token's spelling).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

import torch
from torch.nn import functional as F

from .errors import QuillError, shown
from .tokenizers import Tokenizer

FLOAT_MAX = torch.finfo(torch.float32).max
# Stop strings are checked at every token: their number and length bound that work.
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
SEED_LIMIT = 2**63  # seeds are in 0 .. 2**63 - 1
# a uniform draw u in [0, 1) picks the first token whose cumulative probability exceeds
# u * total; scaled a hair below 1 so rounding never walks past the last likely token
BELOW_ONE = 1.0 - 2.0**-40


# --- one row's settings -----------------------------------------------------------------------

def check_sampling_args(temperature: float = 1.0, top_k: int | None = None,
                        top_p: float | None = None, min_p: float | None = None,
                        repetition_penalty: float = 1.0, max_new_tokens: int = 0,
                        stop: Sequence[str] | None = None) -> None:
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


@dataclass(frozen=True)
class Sampling:
    """How one row decodes. Every field has a default; pass them by name.

    temperature 0 is greedy (nothing else applies then). top_k 0 or None: no limit. stop: the
    row ends just before the first of these strings. seed: the row's own generator (None: a
    random seed). logprobs: None for none, 0 for the drawn token's log-probability, k for that
    and the k most likely tokens at its place. `check()` raises QuillError for nonsense.
    """

    max_new_tokens: int = 200
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    logprobs: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, list):  # a list is accepted and kept as a tuple (hashable)
            object.__setattr__(self, "stop", tuple(self.stop))
        elif self.stop is None:
            object.__setattr__(self, "stop", ())

    def check(self) -> Sampling:
        """Self, or QuillError naming the first setting that makes no sense."""
        check_sampling_args(self.temperature, self.top_k, self.top_p, self.min_p,
                            self.repetition_penalty, self.max_new_tokens, list(self.stop))
        check_seed(self.seed)
        if self.logprobs is not None and (not isinstance(self.logprobs, int) or self.logprobs < 0):
            raise QuillError(f"logprobs must be None or an integer >= 0, got {shown(self.logprobs)}")
        return self


# --- drawing tokens -----------------------------------------------------------------------------

@dataclass
class RowSampler:
    """The settings of R rows as tensors, built once for a set of rows and reused every step."""

    greedy: torch.Tensor  # (R,) bool: temperature 0
    temperature: torch.Tensor  # (R, 1), 1 where greedy
    top_k: torch.Tensor | None  # (R,) long, 0 where no limit; None when no row has one
    top_k_max: int
    top_p: torch.Tensor | None  # (R, 1), 1 where none
    min_p: torch.Tensor | None  # (R, 1), 0 where none
    penalty: torch.Tensor | None  # (R, 1), 1 where none
    all_greedy: bool = field(default=False)

    @classmethod
    def of(cls, settings: Sequence[Sampling], vocab_size: int, device: torch.device | str = "cpu") -> RowSampler:
        def col(values: list[float]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.float32, device=device)[:, None]

        greedy = [s.temperature == 0 for s in settings]
        ks = [s.top_k if s.top_k and 0 < s.top_k < vocab_size else 0 for s in settings]
        ps = [s.top_p if s.top_p is not None and s.top_p < 1 else 1.0 for s in settings]
        mins = [s.min_p or 0.0 for s in settings]
        pens = [s.repetition_penalty for s in settings]
        sampled = [not g for g in greedy]

        def used(values: list, neutral) -> bool:  # does any sampled row need this filter?
            return any(v != neutral and s for v, s in zip(values, sampled))

        return cls(
            greedy=torch.tensor(greedy, device=device),
            temperature=col([1.0 if g else s.temperature for g, s in zip(greedy, settings)]),
            top_k=torch.tensor(ks, device=device) if used(ks, 0) else None,
            top_k_max=max(ks),
            top_p=col(ps) if used(ps, 1.0) else None,
            min_p=col(mins) if used(mins, 0.0) else None,
            penalty=col(pens) if any(p != 1.0 for p in pens) else None,
            all_greedy=all(greedy),
        )

    def draw(self, logits: torch.Tensor, uniforms: torch.Tensor | None,
             seen: torch.Tensor | None = None) -> torch.Tensor:
        """One token id per row of `logits` (R, vocab) -> (R,).

        Applied in this order: repetition penalty (CTRL-style: logits of the tokens in `seen`, a
        (R, vocab) bool tensor, are divided by the penalty when positive and multiplied when
        negative), temperature, top-k (keep the k most likely), top-p (keep the smallest set of
        most likely tokens whose probability reaches p), min-p (drop tokens less likely than
        min_p times the most likely one), then the token where the cumulative probability passes
        the row's uniform number in [0, 1) (`uniforms`, (R,) float64; unused by greedy rows)."""
        logits = logits.float()
        if self.penalty is not None and seen is not None:
            penalized = torch.where(logits > 0, logits / self.penalty, logits * self.penalty)
            # an extreme penalty overflows to infinity: stay finite, keep the order
            logits = torch.where(seen, penalized, logits).clamp(-FLOAT_MAX, FLOAT_MAX)
        best = logits.argmax(dim=-1)
        if self.all_greedy or uniforms is None:
            return best
        # the most likely token at 0 before dividing: a tiny temperature sends the others to
        # -inf, never the best one to +inf (inf - inf would be NaN)
        logits = (logits - logits.amax(dim=-1, keepdim=True)) / self.temperature
        if self.top_k is not None:
            values = torch.topk(logits, self.top_k_max).values  # (R, kmax), descending
            kth = values.gather(1, (self.top_k.clamp(min=1) - 1)[:, None])
            kth = torch.where(self.top_k[:, None] > 0, kth, float("-inf"))
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if self.top_p is not None:
            sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
            probs = sorted_logits.softmax(dim=-1)
            # drop a token when the ones before it already reach top_p (the first always stays)
            drop_sorted = (probs.cumsum(dim=-1) - probs) >= self.top_p
            drop_sorted[:, 0] = False  # even when top_p is below float32's smallest number
            drop_sorted &= self.top_p < 1.0  # rows without top-p drop nothing
            logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
        probs = F.softmax(logits, dim=-1)
        if self.min_p is not None:
            probs = probs.masked_fill(probs < self.min_p * probs.amax(dim=-1, keepdim=True), 0.0)
        cdf = probs.double().cumsum(dim=-1)
        target = (uniforms.to(cdf.device) * BELOW_ONE)[:, None] * cdf[:, -1:]
        drawn = torch.searchsorted(cdf, target, right=True)[:, 0].clamp_(max=logits.size(-1) - 1)
        return torch.where(self.greedy, best, drawn)


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                generator: torch.Generator | Sequence[torch.Generator] | None = None,
                top_p: float | None = None, min_p: float | None = None,
                repetition_penalty: float = 1.0, seen: torch.Tensor | None = None) -> torch.Tensor:
    """One token id per row of `logits` (B, vocab) -> (B, 1), every row with the same settings
    (`RowSampler.draw` gives the order they apply in); greedy at temperature 0. `generator` is
    one torch generator for all rows, or one per row (row b then draws as it would alone)."""
    settings = Sampling(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                        repetition_penalty=repetition_penalty)
    sampler = RowSampler.of([settings] * logits.size(0), logits.size(-1), logits.device)
    if generator is None or isinstance(generator, torch.Generator):
        uniforms = torch.rand(logits.size(0), generator=generator, dtype=torch.float64)
    else:
        uniforms = torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in generator])
    return sampler.draw(logits, uniforms, seen)[:, None]


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, top: int
                   ) -> tuple[list[float], list[list[tuple[int, float]]]]:
    """The log-probability of each row's token (R,) under its logits (R, vocab), as the model
    gives it (log-softmax: no temperature, no filtering), and the `top` most likely tokens as
    (id, log-probability), most likely first."""
    logp = F.log_softmax(logits.float(), dim=-1)
    chosen = logp.gather(1, tokens[:, None])[:, 0].tolist()
    if not top:
        return chosen, [[] for _ in chosen]
    values, ids = logp.topk(min(top, logp.size(-1)), dim=-1)
    return chosen, [list(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]


# --- ids to text ------------------------------------------------------------------------------

class TextStream:
    """Turns one row's new token ids into text pieces that are safe to show.

    Decodes the new ids and emits only what is new and stable: a trailing U+FFFD (half
    of a UTF-8 character from a byte-level BPE token) and a tail that could be the start of a
    stop string are held back until the next token settles them. When a stop string appears,
    the text ends just before it. A token of `end_ids` ends the text (it is not shown); any
    other special token (a chat role token, say) is not text either, and adds nothing unless
    `show_special`. `add(token, forced=True)` takes a token the caller put in (a tool's
    result): it never ends the text, and no stop string is looked for in it.
    """

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] | None = None,
                 end_ids: Collection[int] | None = None, show_special: bool = False,
                 special_ids: Collection[int] | None = None):
        self.tokenizer = tokenizer
        self.stop = [s for s in (stop or []) if s]
        self.longest_stop = max((len(s) for s in self.stop), default=0)
        # tokens that end the text (not shown): <|endoftext|>, or a chat turn's end tokens
        self.end_ids = set(end_ids) if end_ids is not None else {tokenizer.eot_id}
        if special_ids is None:
            special_ids = () if show_special else tokenizer.special_tokens.values()
        self.hidden = frozenset(special_ids)
        self.ids: list[int] = []
        self.text = ""  # the decoded text so far
        self.emitted = 0  # characters of it already given out
        self.stop_from = 0  # stop strings are looked for from here on (not in forced text)
        self.done = False
        # ids[:clean_ids] decode to clean_text, ending on a whole character: later steps decode
        # only the ids after it, so a step costs the same at token 10 and at token 10,000
        self.clean_ids = 0
        self.clean_text = ""

    def add(self, token: int, forced: bool = False) -> str:
        """Take one token; return the text that can be shown now ("" if none yet)."""
        if self.done:
            return ""
        if token in self.end_ids and not forced:
            return self._emit(final=True)  # end of text: stop there (the token is not shown)
        if token not in self.hidden:
            self.ids.append(token)
            tail = self.tokenizer.decode(self.ids[self.clean_ids :])
            self.text = self.clean_text + tail
            if not tail.endswith("\ufffd"):
                self.clean_ids, self.clean_text = len(self.ids), self.text
        if forced:  # shown as it is, and the next stop string is looked for after it
            piece = self.text[self.emitted :]
            self.emitted = self.stop_from = len(self.text)
            return piece
        return self._emit(final=False)

    def finish(self) -> str:
        """Everything still held back, at the end of generation."""
        return "" if self.done else self._emit(final=True)

    def _emit(self, final: bool) -> str:
        text = self.text
        end = len(text)
        if self.stop:
            # a stop string may straddle what was already emitted: search from a little before
            lo = max(self.stop_from, self.emitted - self.longest_stop)
            hits = [i for i in (text.find(s, lo) for s in self.stop) if i >= 0]
            if hits:
                end = min(hits)
                final = True
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
