"""The generation engine: the loaded model, a queue of jobs, and one worker thread that decodes.

Owns everything that touches the model while serving. `load` reads a run directory; an `Engine`
takes `Job`s (a request's rows of prompt ids, their seeds, their `Sampling`) in order of arrival
and runs the KV-cached decoding loop of `quillgpt.generate` on its worker thread, so the event
loop never runs the model. Waiting jobs with the same sampling settings decode together as one
batch. Every step's text pieces go back to the job's event loop (`call_soon_threadsafe`). A job
whose client went away is cancelled: the worker stops it at the next token (or skips it if it
has not started), which frees its slot in the queue.
"""

import asyncio
import collections
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import MODEL_FILE, Run, load_run
from ..generate import TextStream, start_ids, stream_ids
from ..scoring import prompt_logprobs
from .logprobs import TokenLogprob, prompt_entries, step_logprobs
from .schemas import Sampling


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
    gets ("logprobs", [TokenLogprob or None per row]) before each step's pieces, and one that
    scores its prompts (`score_rows`: the prompt ids of each row) ("prompt_logprobs",
    [TokenLogprob list per row]) first.
    """

    rows: list[list[int]]
    seeds: list[int]
    sampling: Sampling
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    ended: bool = False
    end_ids: frozenset[int] | None = None  # tokens that end a row (None: <|endoftext|>); chat: <|end|>, ...
    logprobs: int | None = None
    score_rows: list[list[int]] | None = None

    def emit(self, *event: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop is gone: nobody is listening any more
            self.cancelled.set()


class ServerBusy(Exception):
    """The queue is full: `Engine.submit` refuses the job (the API answers 503)."""


class Engine:
    """Runs queued jobs on one worker thread, in order of arrival.

    Waiting jobs with the same sampling settings (see `Sampling.batch_key`) are taken together,
    up to `max_batch` rows, and decoded as one batch: each row keeps its own generator, so its
    text is the same as it would be alone; a job ends (and its client gets its answer) as soon as
    its own rows are done, while the rest of the batch goes on.
    """

    def __init__(self, run: Run, max_queue: int = 256, max_batch: int = 16):
        self.run = run
        self.model, self.tokenizer = run.model, run.tokenizer
        self.device = next(self.model.parameters()).device
        self.max_queue, self.max_batch = max_queue, max_batch
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._backlog: collections.deque[Job | None] = collections.deque()  # taken, not yet run
        self._lock = threading.Lock()
        self._pending = 0  # submitted and not yet ended
        self.completed = 0  # jobs ended, cancelled ones included
        self.cancelled = 0  # jobs stopped (or skipped) because their client went away
        self.tokens = 0  # tokens generated in all
        self.batches = 0  # decoding batches run
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
                raise ServerBusy(f"{self._pending} requests are already waiting; try again later")
            self._pending += 1
        self._jobs.put(job)

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join(timeout=10)

    def _end(self, job: Job) -> None:
        if job.ended:
            return
        job.ended = True
        with self._lock:
            self._pending -= 1
            self.completed += 1
        job.emit("end")

    def _next_batch(self) -> list[Job] | None:
        """The oldest job and the waiting ones that can decode with it; None to stop."""
        first = self._backlog.popleft() if self._backlog else self._jobs.get()
        if first is None:
            return None
        while True:
            try:
                self._backlog.append(self._jobs.get_nowait())
            except queue.Empty:
                break
        batch, rows, rest = [first], len(first.rows), collections.deque()
        key = first.sampling.batch_key()
        for job in self._backlog:
            if (job is not None and not job.cancelled.is_set() and job.sampling.batch_key() == key
                    and rows + len(job.rows) <= self.max_batch):
                batch.append(job)
                rows += len(job.rows)
            else:
                rest.append(job)
        self._backlog = rest
        return batch

    def _work(self) -> None:
        while (batch := self._next_batch()) is not None:
            try:
                self._run(batch)
            except Exception as e:  # a bug or a device error: report it, keep serving
                for job in batch:
                    if not job.ended:
                        job.emit("error", f"generation failed: {type(e).__name__}: {e}")
            finally:
                for job in batch:
                    self._end(job)

    def _run(self, batch: list[Job]) -> None:
        jobs = []
        for job in batch:
            if job.cancelled.is_set():  # its client left while it waited
                self.cancelled += 1
                self._end(job)
            else:
                jobs.append(job)
        if not jobs:
            return
        self.batches += 1
        self._score_prompts(jobs)
        for job in jobs:
            if job.sampling.max_tokens == 0:  # scoring only (echo with logprobs): done
                job.emit("finish", ["length"] * len(job.rows), [0] * len(job.rows))
                self._end(job)
        jobs = [job for job in jobs if not job.ended]
        if jobs:
            self._decode(jobs)

    def _score_prompts(self, jobs: list[Job]) -> None:
        """The prompts of the jobs that echo them with logprobs, all scored in one batched pass."""
        scoring = [job for job in jobs if job.score_rows is not None]
        if not scoring:
            return
        unique = list(dict.fromkeys(tuple(r) for job in scoring for r in job.score_rows or [] if r))
        top = max(job.logprobs or 0 for job in scoring)
        scores = dict(zip(unique, prompt_logprobs(self.model, unique, top))) if unique else {}
        for job in scoring:
            job.emit("prompt_logprobs", [prompt_entries(r, scores[tuple(r)]) if r else []
                                         for r in job.score_rows or []])

    def _decode(self, jobs: list[Job]) -> None:
        # the batch's rows, and for each row: its job, its place in the job, its token limit
        rows = [r for job in jobs for r in job.rows]
        owner = [(job, i) for job in jobs for i in range(len(job.rows))]
        limit = [job.sampling.max_tokens for job in jobs for _ in job.rows]
        generators = [torch.Generator(device=self.device).manual_seed(seed) for job in jobs for seed in job.seeds]
        streams = [TextStream(self.tokenizer, job.sampling.stop, job.end_ids) for job in jobs for _ in job.rows]
        tokens = [0] * len(rows)
        finish: list[str | None] = [None] * len(rows)
        top = max((job.logprobs for job in jobs if job.logprobs is not None), default=None)
        step_lp: list[TokenLogprob] = []  # this step's logprobs of every row, when asked for

        def on_logits(logits: torch.Tensor, nxt: torch.Tensor) -> None:
            step_lp[:] = step_logprobs(logits, nxt, top or 0)

        s = jobs[0].sampling
        steps = stream_ids(self.model, rows, max(limit), s.temperature, s.top_k, s.top_p, s.min_p,
                           s.repetition_penalty, generators, on_logits=on_logits if top is not None else None)
        try:
            for nxt in steps:
                pieces: dict[int, list[str]] = {id(job): [""] * len(job.rows) for job in jobs}
                lps: dict[int, list[TokenLogprob | None]] = {id(job): [None] * len(job.rows) for job in jobs}
                for b, t in enumerate(nxt.tolist()):
                    job, i = owner[b]
                    if finish[b] or job.ended:
                        continue  # this row is done; the batch goes on for the others
                    if job.cancelled.is_set():
                        self.cancelled += 1
                        self._end(job)
                        continue
                    tokens[b] += 1
                    self.tokens += 1
                    piece = streams[b].add(t)
                    if streams[b].done:
                        finish[b] = "stop"
                    elif tokens[b] == limit[b]:
                        piece += streams[b].finish()
                        finish[b] = "length"
                    pieces[id(job)][i] = piece
                    if job.logprobs is not None:
                        lps[id(job)][i] = step_lp[b]
                for job in jobs:
                    if job.ended:
                        continue
                    if job.logprobs is not None:
                        job.emit("logprobs", lps[id(job)])
                    if any(pieces[id(job)]):
                        job.emit("pieces", pieces[id(job)])
                    mine = [b for b in range(len(rows)) if owner[b][0] is job]
                    if all(finish[b] for b in mine):
                        job.emit("finish", [finish[b] for b in mine], [tokens[b] for b in mine])
                        self._end(job)
                if all(job.ended for job in jobs):
                    break
        finally:
            steps.close()
