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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import MODEL_FILE, Run, load_run
from ..generate import TextStream, start_ids, stream_ids
from .schemas import Sampling


def load(run: Run | str | Path, device: str = "cpu", weights: str = MODEL_FILE) -> Run:
    """The run to serve: `run` itself if already loaded, else loaded from its directory."""
    return run if isinstance(run, Run) else load_run(run, device, weights)


@dataclass
class Job:
    """One request: rows of prompt ids (one per choice), each with its own seed.

    The worker reports through `events` (an asyncio.Queue on `loop`):
    ("pieces", [text per row]) as text is produced, ("finish", [finish_reason per row],
    [tokens per row]) once at the end, ("error", message) if generation failed, and ("end",)
    last, always.
    """

    rows: list[list[int]]
    seeds: list[int]
    sampling: Sampling
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    ended: bool = False
    end_ids: frozenset[int] | None = None  # tokens that end a row (None: <|endoftext|>); chat: <|end|>, ...

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
                loop: asyncio.AbstractEventLoop) -> Job:
        """A job of `n` rows per prompt (an empty prompt starts from the tokenizer's start ids);
        row i is sampled with `seed + i`, and reports to `loop`."""
        rows = [ids or start_ids(self.tokenizer) for ids in prompt_ids for _ in range(n)]
        return Job(rows, [seed + i for i in range(len(rows))], sampling, loop)

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
        # the batch's rows, and for each row: its job, its place in the job, its token limit
        rows = [r for job in jobs for r in job.rows]
        owner = [(job, i) for job in jobs for i in range(len(job.rows))]
        limit = [job.sampling.max_tokens for job in jobs for _ in job.rows]
        generators = [torch.Generator(device=self.device).manual_seed(seed) for job in jobs for seed in job.seeds]
        streams = [TextStream(self.tokenizer, job.sampling.stop, job.end_ids) for job in jobs for _ in job.rows]
        tokens = [0] * len(rows)
        finish: list[str | None] = [None] * len(rows)
        s = jobs[0].sampling
        steps = stream_ids(self.model, rows, max(limit), s.temperature, s.top_k, s.top_p, s.min_p,
                           s.repetition_penalty, generators)
        try:
            for nxt in steps:
                pieces: dict[int, list[str]] = {id(job): [""] * len(job.rows) for job in jobs}
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
                for job in jobs:
                    if job.ended:
                        continue
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
