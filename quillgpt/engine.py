"""The decode engine: rows with their own prompts and settings, decoded together, one token per
step; rows join and leave between any two steps (continuous batching).

Everything in the package that generates text decodes here: `generate`, `quill sample`,
`quill chat`, `quill serve`, lm-eval's `generate_until` and RL rollouts.

    from quillgpt.engine import Completion, Engine, Event, Request, complete, decode
    from quillgpt.sampling import Sampling

    Sampling(max_new_tokens=200, temperature=1.0, top_k=None, top_p=None, min_p=None,
             repetition_penalty=1.0, stop=(), seed=None, logprobs=None)     # frozen; by name
    Request(prompt: Sequence[int], sampling: Sampling = Sampling(),
            end_ids: Collection[int] | None = None,      # None: <|endoftext|> and <|end|>
            tool_hook: ToolHook | None = None, tool_ids: Collection[int] | None = None,
            show_special: bool = False)
    ToolHook = Callable[[list[int]], Sequence[int] | None]

    engine = Engine(model, tokenizer, max_rows=16, kv_cache_mb=None, prefill_chunk=128,
                    overflow="shift", use_cache=True)
    row = engine.add(request)          # -> int, the row's id (0, 1, 2, ... in order of adding)
    events = engine.step()             # -> list[Event]: this step's token of every ready row
    engine.cancel(row)                 # the row leaves at once, frees its cache, says nothing more
    engine.running, engine.waiting, engine.idle

    Event(row: int, token: int | None, text: str, logprob: float | None,
          top: list[tuple[int, float]], forced: bool, finish: str | None)
    for events in decode(model, tokenizer, requests, **engine_options): ...   # step by step
    complete(model, tokenizer, requests, **engine_options) -> list[Completion]  # row i = request i
    Completion(prompt, ids, text, logprobs, top, forced, finish)

A row's life: `add` puts it in the queue; at the next step with a free slot (`max_rows`, and
the KV-cache budget `kv_cache_mb`) it joins: its prompt is prefilled into its own slot of a
static cache (`model.SlotCache`), in chunks of `prefill_chunk` tokens while other rows are
decoding, so they are never stalled for a long prompt (all at once when nobody else is
waiting). A chunk goes through the model in the same forward as the decoding rows' tokens
(`model.StepView`): one forward per step, whoever joins. Identical prompts that join together (the `n` choices of a request) are run once.
Then every step decodes one token for every running row in one batched forward, whatever
their lengths and settings, and samples every row with its own settings (`sampling.RowSampler`)
and its own generator (a `random.Random(seed)` that draws one number per sampled token): a row's
tokens are exactly those it would get alone. A row leaves when it is done - an end token
("stop"), a stop string ("stop"), `max_new_tokens` sampled ("length"), its tool hook ending it
("tool_calls") - or cancelled; its slot is freed at once (the last slot's row moves into it).

Each step yields one `Event` per row that produced a token: the token id, the text it adds
(whole characters, never a stop string or a special token's spelling: `sampling.TextStream`),
its log-probability under the model's raw distribution (temperature 1, no filtering; when
`Sampling.logprobs` is not None) with the `logprobs` most likely alternatives, `forced` (a
token the tool hook put in: no log-probability) and the finish reason on the row's last event
(None while it runs). A row with max_new_tokens 0 ends at once with one event, token None.

The tool hook: after a sampled token that is in the row's `tool_ids` (after every token when
`tool_ids` is None) the engine calls `tool_hook(ids)` with the row's ids after its prompt so
far. It returns ids to force into the row (their events come at once, marked `forced`; they are
prefilled and decoding goes on; an empty list: go on as if nothing happened), or None to end the
row with finish "tool_calls" (a client-side tool). Forced tokens do not count towards
max_new_tokens, never end the row, and no stop string is looked for in their text.

Past block_size the context is a window over the last tokens (`overflow`, docs/generation.md):
"shift" keeps the last block_size // 2 tokens and re-prefills them; "slide" re-prefills the last
block_size tokens at every step. `use_cache=False` (and any model whose forward takes no cache)
recomputes every window at every step: the same tokens, slower; the reference in tests.

Not thread-safe: one thread owns an engine (the server's worker). The weights must not change
while rows are running (their cached keys and values would be stale).
"""

from __future__ import annotations

import math
import os
import random
from collections import deque
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .errors import QuillError, shown
from .inference import activation_dtype
from .model import SlotCache
from .sampling import RowSampler, Sampling, TextStream, token_logprobs
from .tokenizers import Tokenizer

ToolHook = Callable[[list[int]], Sequence[int] | None]
OVERFLOW_STRATEGIES = ("shift", "slide")
TURN_END_TOKENS = ("<|end|>",)  # chat.END_TOKEN: a chat model's turn ends there, in any mode


@dataclass(frozen=True)
class Request:
    """One row to decode: prompt ids (non-empty, at most block_size) and how to go on."""

    prompt: Sequence[int]
    sampling: Sampling = field(default_factory=Sampling)
    end_ids: Collection[int] | None = None  # tokens that end the row; None: default_end_ids
    tool_hook: ToolHook | None = None
    tool_ids: Collection[int] | None = None  # tokens after which tool_hook is asked (None: all)
    show_special: bool = False  # special tokens' spellings in the text


@dataclass
class Event:
    """What one row did in one step (see the module docstring)."""

    row: int
    token: int | None
    text: str
    logprob: float | None = None
    top: list[tuple[int, float]] = field(default_factory=list)
    forced: bool = False
    finish: str | None = None


@dataclass
class Completion:
    """A row decoded to its end: every id after the prompt (forced ones and an end token
    included), the text, and per id its log-probability (None: not asked, or forced),
    alternatives and whether it was forced."""

    prompt: list[int]
    ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[float | None] = field(default_factory=list)
    top: list[list[tuple[int, float]]] = field(default_factory=list)
    forced: list[bool] = field(default_factory=list)
    finish: str | None = None

    def add(self, event: Event) -> None:
        if event.token is not None:
            self.ids.append(event.token)
            self.logprobs.append(event.logprob)
            self.top.append(event.top)
            self.forced.append(event.forced)
        self.text += event.text
        self.finish = event.finish or self.finish


def default_end_ids(tokenizer: Tokenizer) -> frozenset[int]:
    """What ends a row unless its request says otherwise: <|endoftext|>, and a chat model's
    end of turn (<|end|>): special tokens are not text."""
    specials = tokenizer.special_tokens
    ids = {specials[t] for t in TURN_END_TOKENS if t in specials}
    if tokenizer.eot_id is not None:
        ids.add(tokenizer.eot_id)
    return frozenset(ids)


def supports_cache(model: nn.Module) -> bool:
    """Whether `model.forward` takes a KV cache (the GPT does; the ladder's rungs do not).

    A `torch.compile`d model is asked about the model it wraps (its own forward takes *args)."""
    import inspect

    model = getattr(model, "_orig_mod", model)
    return "cache" in inspect.signature(model.forward).parameters


@dataclass(eq=False)
class _Row:
    id: int
    request: Request
    seq: list[int]  # the prompt, then every token after it
    rng: random.Random
    stream: TextStream
    end_ids: frozenset[int]
    start: int = 0  # seq[start:] is the window the model sees
    cached: int = 0  # tokens of the window in the cache
    slot: int = -1
    generated: int = 0  # sampled tokens

    @property
    def pending(self) -> int:
        """Tokens of the window not yet through the model."""
        return len(self.seq) - self.start - self.cached

    def window(self) -> list[int]:
        return self.seq[self.start :]


class Engine:
    """Decodes rows with their own prompts and settings together (module docstring)."""

    def __init__(self, model: nn.Module, tokenizer: Tokenizer, max_rows: int = 16,
                 kv_cache_mb: float | None = None, prefill_chunk: int = 128, overflow: str = "shift",
                 use_cache: bool = True):
        if overflow not in OVERFLOW_STRATEGIES:
            raise QuillError(f"overflow must be one of {', '.join(OVERFLOW_STRATEGIES)}, got {shown(overflow)}")
        if max_rows < 1 or prefill_chunk < 1:
            raise QuillError(f"max_rows and prefill_chunk must be >= 1, got {max_rows} and {prefill_chunk}")
        self.model, self.tokenizer = model, tokenizer
        self.config = model.config
        self.device = next(model.parameters()).device
        self.dtype = activation_dtype(model)
        self.use_cache = use_cache and supports_cache(model)
        self.max_rows = max_rows
        if kv_cache_mb is not None and self.use_cache:
            self.max_rows = min(max_rows, self.rows_in_budget(kv_cache_mb))
        self.prefill_chunk = prefill_chunk
        block = self.config.block_size
        self.keep = max(1, block // 2) if overflow == "shift" else block
        self.vocab_size = self.config.vocab_size
        self.cache: SlotCache | None = None
        self._seen: torch.Tensor | None = None  # (slots, vocab) bool: rows with a repetition penalty
        self._slots: list[_Row] = []  # running rows, row i in slot i
        self._waiting: deque[_Row] = deque()
        self._rows: dict[int, _Row] = {}
        self._next_id = 0
        self._sampler: tuple[tuple[int, ...], RowSampler] | None = None
        self._followers: dict[int, list[_Row]] = {}  # a prefilling row's id -> rows sharing its prompt
        self._specials = frozenset(tokenizer.special_tokens.values())
        self._default_end = default_end_ids(tokenizer)

    # --- the public side ----------------------------------------------------------------------

    def rows_in_budget(self, kv_cache_mb: float) -> int:
        """Rows whose keys and values fit in `kv_cache_mb` MiB at full length; QuillError if none."""
        per_row = SlotCache.bytes_per_slot(self.config, self.dtype)
        rows = int(kv_cache_mb * 2**20 // per_row)
        if rows < 1:
            raise QuillError(f"a KV cache of {shown(kv_cache_mb)} MB holds no row of this model: one row "
                             f"at full length takes {per_row / 2**20:.2f} MB")
        return rows

    @property
    def running(self) -> int:
        return len(self._slots)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def idle(self) -> bool:
        return not self._slots and not self._waiting

    def add(self, request: Request) -> int:
        """Queue a row; it joins at the next step with room. Returns its id; QuillError for a
        prompt or settings that cannot run."""
        prompt = list(request.prompt)
        if not prompt:
            raise QuillError("the prompt is empty: give at least one token (generate.start_ids)")
        if len(prompt) > self.config.block_size:
            raise QuillError(f"prompt is {len(prompt)} tokens long, longer than the model's context of "
                             f"{self.config.block_size}")
        if not all(isinstance(t, int) and 0 <= t < self.vocab_size for t in prompt):
            raise QuillError(f"prompt ids must be integers in 0..{self.vocab_size - 1}")
        s = request.sampling.check()
        end_ids = self._default_end if request.end_ids is None else frozenset(request.end_ids)
        seed = s.seed if s.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
        stream = TextStream(self.tokenizer, s.stop, end_ids, request.show_special,
                            () if request.show_special else self._specials)
        row = _Row(self._next_id, request, prompt, random.Random(seed), stream, end_ids)
        self._next_id += 1
        self._rows[row.id] = row
        self._waiting.append(row)
        return row.id

    @torch.inference_mode()
    def cancel(self, row_id: int) -> None:
        """Stop a row now (a client went away): it frees its slot and yields no more events."""
        row = self._rows.pop(row_id, None)
        if row is None:
            return
        if row.slot < 0:
            self._waiting.remove(row)
        else:
            self._release(row)

    @torch.inference_mode()
    def step(self) -> list[Event]:
        """Admit waiting rows, prefill (chunks of) new prompts, decode one token for every
        running row; the events of the rows that produced a token, in the order of their ids."""
        if self.idle:
            return []
        was_training = self.model.training
        if was_training:
            self.model.eval()
        try:
            events = self._admit()
            ready, logits = self._forward() if self.use_cache else self._recompute()
            if ready:
                events += self._sample(ready, logits)
            for row in [r for r in self._slots if r.id not in self._rows]:
                self._release(row)  # finished this step
        finally:
            if was_training:
                self.model.train()
        events.sort(key=lambda e: e.row)
        return events

    # --- joining and leaving ------------------------------------------------------------------

    def _admit(self) -> list[Event]:
        events: list[Event] = []
        while self._waiting and len(self._slots) < self.max_rows:
            row = self._waiting.popleft()
            if row.request.sampling.max_new_tokens == 0:
                del self._rows[row.id]
                events.append(Event(row.id, None, "", finish="length"))
                continue
            row.slot = len(self._slots)
            self._slots.append(row)
            self._make_room(len(self._slots))
            if row.request.sampling.repetition_penalty != 1.0:
                self._seen[row.slot].zero_()
                self._seen[row.slot, row.seq] = True
        return events

    def _make_room(self, rows: int) -> None:
        """Cache (and repetition-penalty) slots for `rows` rows, doubling as rows come."""
        def size(have: int) -> int:
            return min(self.max_rows, max(rows, 2 * have))

        if self.use_cache and (self.cache is None or self.cache.slots < rows):
            if self.cache is None:
                self.cache = SlotCache(self.config, size(0), self.device, self.dtype)
            else:
                self.cache.grow(size(self.cache.slots))
        # once one row wanted it, every slot keeps its seen tokens (a later penalty row may land anywhere)
        wants_seen = self._seen is not None or any(r.request.sampling.repetition_penalty != 1.0
                                                   for r in self._slots)
        if wants_seen and (self._seen is None or self._seen.size(0) < rows):
            have = 0 if self._seen is None else self._seen.size(0)
            seen = torch.zeros(size(have), self.vocab_size, dtype=torch.bool, device=self.device)
            if have:
                seen[:have] = self._seen
            self._seen = seen

    def _release(self, row: _Row) -> None:
        """Free the row's slot: the last slot's row moves into it, so slots stay 0..n-1."""
        self._rows.pop(row.id, None)
        last = self._slots.pop()
        if last is not row:
            hole = row.slot
            if self.cache is not None:
                self.cache.copy(last.slot, hole, last.cached)
            if self._seen is not None:
                self._seen[hole] = self._seen[last.slot]
            last.slot = hole
            self._slots[hole] = last
        row.slot = -1

    # --- the model ----------------------------------------------------------------------------

    def _forward(self) -> tuple[list[_Row], torch.Tensor | None]:
        """With the cache: the decoding rows' tokens and the prefill chunks in one forward
        (`_step_forward`) while rows decode, else prefill forwards of the rows' chunks."""
        decoding = [r for r in self._slots if r.pending == 1]
        budget = self.prefill_chunk if decoding else math.inf
        plan = self._prefill_plan([r for r in self._slots if r.pending > 1], budget)
        if decoding and not plan:
            return decoding, self._decode_forward(decoding)
        if decoding:
            return self._step_forward(decoding, [(r, T) for rows, T in plan for r in rows])
        ready: list[_Row] = []
        parts: list[torch.Tensor] = []
        for rows, T in plan:
            logits = self._prefill_forward(rows, T)
            done = [i for i, r in enumerate(rows) if r.pending == 0]
            if done:
                ready += [rows[i] for i in done]
                parts.append(logits[done])
        if not ready:
            return [], None
        return ready, parts[0] if len(parts) == 1 else torch.cat(parts)

    def _step_forward(self, decoding: list[_Row], chunks: list[tuple[_Row, int]]) -> tuple[list[_Row], torch.Tensor]:
        """One forward (`model.StepView`) for a token of every decoding row and the next chunk
        of each row being prefilled: every slot takes part (a row being prefilled writes a
        filler at its next position, which its chunk overwrites); logits of the decoding rows
        and of the rows whose prompt is done."""
        ids = [0] * len(self._slots)
        for r in decoding:
            ids[r.slot] = r.seq[-1]
        for r, T in chunks:
            ids += r.seq[r.start + r.cached : r.start + r.cached + T]
        view = self.cache.step([r.cached for r in self._slots], [(r.slot, T) for r, T in chunks])
        logits = self.model(torch.tensor(ids, device=self.device)[None], cache=view)[0][:, -1]
        for r in decoding:
            r.cached += 1
        ready, at = list(decoding), [r.slot for r in decoding]
        for i, (r, T) in enumerate(chunks):
            r.cached += T
            followers = self._followers.get(r.id, [])
            for f in followers:  # the same prompt: its cache copied, not computed again
                self.cache.copy(r.slot, f.slot, r.cached)
                f.cached = r.cached
            if r.pending == 0:
                ready += [r, *followers]
                at += [len(self._slots) + i] * (1 + len(followers))
        return ready, logits[torch.tensor(at, device=self.device)]

    def _decode_forward(self, decoding: list[_Row]) -> torch.Tensor:
        """Logits (len(decoding), vocab) of one new token per decoding row. The batch is every
        slot: a row still being prefilled writes a filler at its next position, which its next
        chunk overwrites."""
        ids = [0] * len(self._slots)
        for r in decoding:
            ids[r.slot] = r.seq[-1]
        view = self.cache.decode([r.cached for r in self._slots])
        logits = self.model(torch.tensor(ids, device=self.device)[:, None], cache=view)[0][:, -1]
        for r in decoding:
            r.cached += 1
        if len(decoding) == len(self._slots):
            return logits
        return logits[torch.tensor([r.slot for r in decoding], device=self.device)]

    def _prefill_plan(self, rows: list[_Row], budget: float) -> list[tuple[list[_Row], int]]:
        """Groups of rows that prefill together, with the tokens each takes now: fresh rows
        with the same chunk length in one forward; a fresh row whose window equals an earlier
        one's copies its cache (`_share`); rows that continue go one by one."""
        groups: dict[int, list[_Row]] = {}
        plan: list[tuple[list[_Row], int]] = []
        firsts: dict[tuple[int, ...], _Row] = {}
        self._followers: dict[int, list[_Row]] = {}
        for r in rows:
            if budget <= 0:
                break
            if r.cached == 0:
                key = tuple(r.window())
                if key in firsts:  # the same prompt as a row before it: computed once
                    self._followers.setdefault(firsts[key].id, []).append(r)
                    continue
                firsts[key] = r
            T = int(min(r.pending, budget))
            budget -= T
            if r.cached == 0:
                groups.setdefault(T, []).append(r)
            else:
                plan.append(([r], T))
        return [(g, T) for T, g in groups.items()] + plan

    def _prefill_forward(self, rows: list[_Row], T: int) -> torch.Tensor:
        """Logits (len(rows), vocab) after the next T tokens of each row's window."""
        L = rows[0].cached
        ids = torch.tensor([r.seq[r.start + L : r.start + L + T] for r in rows], device=self.device)
        view = self.cache.prefill([r.slot for r in rows], L)
        logits = self.model(ids, cache=view)[0][:, -1]
        for r in rows:
            r.cached += T
        followers = [(i, f) for i, r in enumerate(rows) for f in self._followers.get(r.id, [])]
        if not followers:
            return logits
        for i, f in followers:
            self.cache.copy(rows[i].slot, f.slot, rows[i].cached)
            f.cached = rows[i].cached
        rows += [f for _, f in followers]  # the caller reads which rows are ready from `rows`
        return torch.cat([logits, logits[[i for i, _ in followers]]])

    def _recompute(self) -> tuple[list[_Row], torch.Tensor | None]:
        """Without the cache: every row's whole window through the model, rows of one length
        together."""
        by_length: dict[int, list[_Row]] = {}
        for r in self._slots:
            by_length.setdefault(len(r.seq) - r.start, []).append(r)
        ready: list[_Row] = []
        parts = []
        for rows in by_length.values():
            idx = torch.tensor([r.window() for r in rows], device=self.device)
            parts.append(self.model(idx)[0][:, -1])
            for r in rows:
                r.cached = len(r.seq) - r.start
            ready += rows
        if not ready:
            return [], None
        return ready, torch.cat(parts)

    # --- sampling and what follows ------------------------------------------------------------

    def _sample(self, ready: list[_Row], logits: torch.Tensor) -> list[Event]:
        key = tuple(r.id for r in ready)
        if self._sampler is None or self._sampler[0] != key:
            self._sampler = (key, RowSampler.of([r.request.sampling for r in ready], self.vocab_size,
                                                self.device))
        sampler = self._sampler[1]
        uniforms = None
        if not sampler.all_greedy:
            uniforms = torch.tensor([r.rng.random() if r.request.sampling.temperature > 0 else 0.0
                                     for r in ready], dtype=torch.float64)
        seen = None
        slots = None
        if self._seen is not None:
            slots = torch.tensor([r.slot for r in ready], device=self.device)
            if sampler.penalty is not None:
                seen = self._seen[slots]
        tokens = sampler.draw(logits, uniforms, seen)
        if slots is not None:
            self._seen[slots, tokens] = True
        asked = [r.request.sampling.logprobs for r in ready]
        if any(a is not None for a in asked):
            chosen, tops = token_logprobs(logits, tokens, max(a or 0 for a in asked))
        else:
            chosen, tops = [None] * len(ready), [[]] * len(ready)
        events: list[Event] = []
        for r, t, lp, top, a in zip(ready, tokens.tolist(), chosen, tops, asked):
            events += self._after_token(r, t, None if a is None else lp, top[: a or 0])
        return events

    def _after_token(self, row: _Row, token: int, logprob: float | None,
                     top: list[tuple[int, float]]) -> list[Event]:
        """Take a row's sampled token: its event, then maybe its end or the tool hook's ids."""
        s = row.request.sampling
        row.seq.append(token)
        row.generated += 1
        event = Event(row.id, token, row.stream.add(token), logprob, top)
        events = [event]
        if token in row.end_ids or row.stream.done:
            event.finish = "stop"
        elif row.request.tool_hook is not None and (row.request.tool_ids is None or token in row.request.tool_ids):
            forced = row.request.tool_hook(row.seq[len(row.request.prompt):])
            if forced is None:
                event.text += row.stream.finish()
                event.finish = "tool_calls"
            else:
                events += self._force(row, list(forced))
        if event.finish is None and row.generated >= s.max_new_tokens:
            last = events[-1]
            last.text += row.stream.finish()
            last.finish = "length"
        if events[-1].finish is not None:
            self._rows.pop(row.id, None)  # released at the end of the step
        elif len(row.seq) - row.start > self.config.block_size:
            row.start, row.cached = len(row.seq) - self.keep, 0  # move the window: re-prefill it
        return events

    def _force(self, row: _Row, ids: list[int]) -> list[Event]:
        if not all(isinstance(t, int) and 0 <= t < self.vocab_size for t in ids):
            raise QuillError(f"a tool hook returned ids outside 0..{self.vocab_size - 1}")
        row.seq += ids
        if self._seen is not None and row.slot >= 0 and ids:
            self._seen[row.slot, ids] = True
        return [Event(row.id, t, row.stream.add(t, forced=True), forced=True) for t in ids]


# --- running a list of rows -------------------------------------------------------------------

def decode(model: nn.Module, tokenizer: Tokenizer, requests: Sequence[Request],
           **engine_options) -> Iterator[list[Event]]:
    """Decode `requests` to their ends in one engine: each step's events (row i is
    requests[i]). `engine_options` are Engine's (max_rows defaults to every row at once)."""
    engine_options.setdefault("max_rows", max(1, len(requests)))
    engine = Engine(model, tokenizer, **engine_options)
    for r in requests:
        engine.add(r)
    while not engine.idle:
        events = engine.step()
        if events:
            yield events


def complete(model: nn.Module, tokenizer: Tokenizer, requests: Sequence[Request],
             **engine_options) -> list[Completion]:
    """Decode `requests` to their ends; one Completion per request, in order."""
    out = [Completion(list(r.prompt)) for r in requests]
    for events in decode(model, tokenizer, requests, **engine_options):
        for e in events:
            out[e.row].add(e)
    return out
