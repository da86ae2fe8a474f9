"""The generation worker: the loaded model, a queue of jobs, and one thread that decodes them.

Owns everything that touches the model while serving. `load` reads a run directory; an `Engine`
takes `Job`s (a request's rows of prompt ids, their seeds, their `Sampling`) and hands every
row to one decode engine (`quillgpt.engine`) on its worker thread, so the event loop never runs
the model. Continuous batching: a request's rows join the running batch at the next token,
whatever their settings, and leave it when done; the worker steps the decode engine while any
row runs and sleeps on the queue when none does. Every step's text pieces go back to the job's
event loop (`call_soon_threadsafe`). A job whose client went away is cancelled: its rows leave
at the next step and free their cache. A failed step is logged with its traceback and reported
to the jobs it was decoding; the server goes on. The worker keeps the figures `/metrics`
shows (serve/prometheus.py).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import engine as decode_engine
from ..chat import ReplyReader, ToolUse, tool_options
from ..checkpoint import MODEL_FILE, Run, load_run
from ..generate import start_ids
from ..sampling import Sampling as RowSampling
from ..scoring import prompt_logprobs
from ..tokenizers import Tokenizer
from .logprobs import TokenLogprob, prompt_entries
from .prometheus import Histogram, render, sample
from .schemas import Sampling

log = logging.getLogger("quillgpt.serve")


def load(run: Run | str | Path, device: str = "cpu", weights: str = MODEL_FILE, dtype: str = "float32",
         warn: Callable[[str], None] | None = None) -> Run:
    """The run to serve: `run` itself if already loaded, else loaded from its directory with its
    weights in `dtype` (float32, bfloat16, int8, auto: quillgpt.inference)."""
    return run if isinstance(run, Run) else load_run(run, device, weights, dtype=dtype, warn=warn)


@dataclass
class Job:
    """One request: rows of prompt ids (one per choice), each with its own seed.

    The worker reports through `events` (an asyncio.Queue on `loop`):
    ("pieces", [text per row]) as text is produced, ("finish", [finish_reason per row],
    [tokens per row]) once at the end, ("error", message) if generation failed, and ("end",)
    last, always. A job that asks for `logprobs` (alternatives per token, serve/logprobs.py) also
    gets ("logprobs", [list of TokenLogprob per row]) before each step's pieces, and one that
    scores its prompts (`score_rows`: the prompt ids of each row) ("prompt_logprobs",
    [TokenLogprob list per row]) first. `end_ids`: the tokens that end a row (None: the decode
    engine's default, <|endoftext|> and a chat model's <|end|>). A chat job with `tools` has a
    `chat.ToolRunner` per row (built-ins run on the worker; a client's calls end the row) and a
    `chat.ReplyReader` per row: its pieces are the replies' content, the built-ins' calls and
    results come as ("tool_parts", [list of chat.ReplyPart per row]), and a row that ends on a
    client's calls reports ("tool_calls", [list of chat.ToolCall or None per row]) before the finish.
    """

    rows: list[list[int]]
    seeds: list[int]
    sampling: Sampling
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    ended: bool = False
    end_ids: frozenset[int] | None = None
    logprobs: int | None = None
    score_rows: list[list[int]] | None = None
    tools: ToolUse | None = None
    submitted: float = field(default_factory=time.monotonic)
    # the worker's bookkeeping
    row_ids: list[int] = field(default_factory=list)
    finish: list[str | None] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    last_token: list[float] = field(default_factory=list)
    readers: list[ReplyReader] = field(default_factory=list)

    def emit(self, *event: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop is gone: nobody is listening any more
            self.cancelled.set()

    def requests(self, tokenizer: Tokenizer) -> list[decode_engine.Request]:
        s = self.sampling
        out = []
        for ids, seed in zip(self.rows, self.seeds):
            sampling = RowSampling(max_new_tokens=s.max_tokens, temperature=s.temperature, top_k=s.top_k,
                                   top_p=s.top_p, min_p=s.min_p, repetition_penalty=s.repetition_penalty,
                                   stop=tuple(s.stop or ()), seed=seed, logprobs=self.logprobs)
            if self.tools is None:
                out.append(decode_engine.Request(ids, sampling, end_ids=self.end_ids))
            else:  # each row its own tool runner
                out.append(decode_engine.Request(ids, sampling, **tool_options(tokenizer, self.tools)))
        return out


class ServerBusy(Exception):
    """The queue is full: `Engine.submit` refuses the job (the API answers 503)."""


class Engine:
    """Runs jobs on one worker thread through one decode engine (continuous batching).

    `max_batch` rows decode at once (fewer if `kv_cache_mb`, the KV cache's budget in MiB, holds
    fewer); more wait for a slot. At most `max_queue` jobs are in the server at once (waiting or
    running); `submit` refuses more (ServerBusy, answered 503)."""

    def __init__(self, run: Run, max_queue: int = 256, max_batch: int = 16,
                 kv_cache_mb: float | None = None, prefill_chunk: int = 128):
        self.run = run
        self.model, self.tokenizer = run.model, run.tokenizer
        self.max_queue, self.max_batch = max_queue, max_batch
        self._decoder_options = dict(max_rows=max_batch, kv_cache_mb=kv_cache_mb, prefill_chunk=prefill_chunk)
        self.decoder = decode_engine.Engine(self.model, self.tokenizer, **self._decoder_options)
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._lock = threading.Lock()
        self._pending = 0  # submitted and not yet ended
        self._running: dict[int, Job] = {}  # id(job) -> job, for jobs with rows in the decoder
        self._owner: dict[int, tuple[Job, int]] = {}  # decoder row id -> (job, row of the job)
        self.completed = 0  # jobs ended, cancelled ones included
        self.cancelled = 0  # jobs stopped (or skipped) because their client went away
        self.rejected = 0  # jobs refused: the queue was full
        self.failures = 0  # decode steps that raised
        self.tokens = 0  # tokens generated in all
        self.steps = 0  # decode steps run
        self.ttft = Histogram("quill_time_to_first_token_seconds",
                              "Seconds from a request's arrival to its first generated token.")
        self.tpot = Histogram("quill_time_per_output_token_seconds",
                              "Seconds between two generated tokens of one choice.")
        self._thread = threading.Thread(target=self._work, name="quill-generate", daemon=True)
        self._thread.start()

    @property
    def pending(self) -> int:
        return self._pending

    def alive(self) -> bool:
        return self._thread.is_alive()

    def new_job(self, prompt_ids: list[list[int]], n: int, sampling: Sampling, seed: int,
                loop: asyncio.AbstractEventLoop, logprobs: int | None = None,
                score_prompts: bool = False) -> Job:
        """A job of `n` rows per prompt (an empty prompt starts from the tokenizer's start ids);
        row i is sampled with `seed + i`, and reports to `loop`. `logprobs`: alternatives per
        token to report; `score_prompts`: report the prompts' own logprobs too (echo)."""
        rows = [ids or start_ids(self.tokenizer) for ids in prompt_ids for _ in range(n)]
        score_rows = [list(ids) for ids in prompt_ids for _ in range(n)] if score_prompts else None
        return Job(rows, [seed + i for i in range(len(rows))], sampling, loop, logprobs=logprobs,
                   score_rows=score_rows)

    def submit(self, job: Job) -> None:
        with self._lock:
            if self._pending >= self.max_queue:
                self.rejected += 1
                raise ServerBusy(f"{self._pending} requests are already waiting; try again later")
            self._pending += 1
        self._jobs.put(job)

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join(timeout=10)

    def metrics(self) -> str:
        """The server's figures in Prometheus' text format (GET /metrics)."""
        d = self.decoder
        return render([
            sample("gauge", "quill_queue_depth", "Rows waiting for a slot in the running batch.",
                   d.waiting + self._jobs.qsize()),
            sample("gauge", "quill_running_rows", "Rows decoding in the running batch.", d.running),
            sample("gauge", "quill_requests_in_flight", "Requests accepted and not yet answered.", self._pending),
            sample("counter", "quill_generated_tokens_total", "Tokens generated.", self.tokens),
            sample("counter", "quill_requests_completed_total", "Requests ended, cancelled ones included.",
                   self.completed),
            sample("counter", "quill_requests_cancelled_total", "Requests whose client went away.",
                   self.cancelled),
            sample("counter", "quill_requests_rejected_total", "Requests refused with 503 (queue full).",
                   self.rejected),
            sample("counter", "quill_decode_failures_total", "Decode steps that failed.", self.failures),
            sample("counter", "quill_decode_steps_total", "Decode steps run.", self.steps),
            self.ttft.lines(), self.tpot.lines(),
        ])

    # --- the worker thread --------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            new = [self._jobs.get()] if self.decoder.idle else []  # nothing to decode: sleep here
            while True:
                try:
                    new.append(self._jobs.get_nowait())
                except queue.Empty:
                    break
            for job in new:
                if job is None:
                    return
                self._start(job)
            try:
                self._drop_cancelled()
                if self.decoder.idle:
                    continue
                events = self.decoder.step()
                self.steps += 1
                self._dispatch(events)
            except Exception as e:  # a bug or a device error: log it, tell the clients, keep serving
                log.exception("generation failed; the requests being decoded get an error")
                self._fail_running(f"generation failed: {type(e).__name__}: {e}")

    def _end(self, job: Job) -> None:
        if job.ended:
            return
        job.ended = True
        self._running.pop(id(job), None)
        for rid in job.row_ids:
            if self._owner.pop(rid, None) is not None:
                self.decoder.cancel(rid)
        with self._lock:
            self._pending -= 1
            self.completed += 1
        job.emit("end")

    def _start(self, job: Job) -> None:
        """A new job's prompts scored (echo with logprobs), then its rows into the decoder."""
        if job.cancelled.is_set():  # its client left while it waited
            self.cancelled += 1
            self._end(job)
            return
        try:
            self._score_prompts(job)
            if job.sampling.max_tokens == 0:  # scoring only (echo with logprobs): done
                job.emit("finish", ["length"] * len(job.rows), [0] * len(job.rows))
                self._end(job)
                return
            n = len(job.rows)
            job.finish, job.tokens, job.last_token = [None] * n, [0] * n, [0.0] * n
            if job.tools is not None:
                job.readers = [ReplyReader(self.tokenizer, job.tools) for _ in range(n)]
            for i, request in enumerate(job.requests(self.tokenizer)):
                rid = self.decoder.add(request)
                job.row_ids.append(rid)
                self._owner[rid] = (job, i)
            self._running[id(job)] = job
        except Exception as e:
            log.exception("a request could not start")
            job.emit("error", f"generation failed: {type(e).__name__}: {e}")
            self._end(job)

    def _score_prompts(self, job: Job) -> None:
        """The job's prompts' own logprobs (echo with logprobs), each distinct prompt once."""
        if job.score_rows is None:
            return
        unique = list(dict.fromkeys(tuple(r) for r in job.score_rows if r))
        scores = dict(zip(unique, prompt_logprobs(self.model, unique, job.logprobs or 0))) if unique else {}
        job.emit("prompt_logprobs", [prompt_entries(r, scores[tuple(r)]) if r else [] for r in job.score_rows])

    def _drop_cancelled(self) -> None:
        for job in [j for j in self._running.values() if j.cancelled.is_set()]:
            self.cancelled += 1
            self._end(job)

    def _fail_running(self, message: str) -> None:
        self.failures += 1
        jobs = list(self._running.values())
        # the failed step may have left the decoder half-way: start afresh
        self.decoder = decode_engine.Engine(self.model, self.tokenizer, **self._decoder_options)
        self._owner.clear()
        for job in jobs:
            job.emit("error", message)
            self._end(job)

    def _dispatch(self, events: list[decode_engine.Event]) -> None:
        """One step's events to their jobs: pieces (and logprobs) per job; a finished job ends."""
        now = time.monotonic()
        touched: dict[int, tuple[Job, list[str], list[list[TokenLogprob]], list, list[list]]] = {}
        for e in events:
            owner = self._owner.get(e.row)
            if owner is None:
                continue
            job, i = owner
            _, pieces, lps, calls, rounds = touched.setdefault(id(job), (
                job, [""] * len(job.rows), [[] for _ in job.rows], [None] * len(job.rows), [[] for _ in job.rows]))
            text, finish = e.text, e.finish
            if job.readers:  # tools: the content; a client's calls; the built-ins' calls and results
                reader = job.readers[i]
                parts = reader.feed(e)
                text = "".join(p.text for p in parts if p.kind == "content")
                finish = reader.finish if finish is not None else None
                calls[i] = reader.reply().tool_calls if finish == "tool_calls" else None
                if e.finish != "tool_calls":  # calls the engine ran (not the client's, nor text)
                    rounds[i] += [p for p in parts if p.kind != "content"]
            pieces[i] += text
            if e.token is not None and not e.forced:
                self._count_token(job, i, now)
                if job.logprobs is not None:
                    lps[i].append(TokenLogprob(e.token, e.logprob, e.top))
            if finish is not None:
                job.finish[i] = finish
                del self._owner[e.row]
        for job, pieces, lps, calls, rounds in touched.values():
            if job.logprobs is not None:
                job.emit("logprobs", lps)
            if any(pieces):
                job.emit("pieces", pieces)
            if any(rounds):
                job.emit("tool_parts", rounds)
            if any(calls):
                job.emit("tool_calls", calls)
            if all(job.finish):
                job.emit("finish", list(job.finish), list(job.tokens))
                self._end(job)

    def _count_token(self, job: Job, i: int, now: float) -> None:
        if not any(job.tokens):
            self.ttft.observe(now - job.submitted)
        if job.tokens[i]:
            self.tpot.observe(now - job.last_token[i])
        job.tokens[i] += 1
        job.last_token[i] = now
        self.tokens += 1
