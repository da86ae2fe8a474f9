"""`quill serve`: an OpenAI-compatible completions API and a web playground for one run.

    GET  /                  the playground (quillgpt/web/: plain HTML, CSS and JS)
    POST /v1/completions    OpenAI's legacy completions API, streamed as Server-Sent Events
    GET  /v1/models         the one model served
    GET  /v1/model-card     config, parameter count, final losses (metrics.csv), server limits
    GET  /health            liveness and queue length

How a request flows: the handler reads and checks the body (size, UTF-8, JSON, types, ranges),
encodes the prompts and puts a `Job` on the `Engine`'s queue. One worker thread takes jobs in
order and runs the KV-cached decoding loop of `quillgpt.generate`; the `n` choices (and a list of
prompts) of one request decode together as one batch. Every step's text pieces go back to the
event loop (`call_soon_threadsafe`), so the loop never waits on the model. A job whose client
went away is cancelled: the worker stops it at the next token (or skips it if not yet started).
Errors are JSON in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, 4xx for
anything the client did.
"""

import asyncio
import collections
import contextlib
import csv
import json
import os
import queue
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .checkpoint import METRICS_FILE, MODEL_FILE, Run, load_run
from .errors import QuillError
from .generate import TextStream, check_sampling_args, encode_prompt, start_ids, stream_ids
from .model import count_params

WEB_DIR = Path(__file__).resolve().parent / "web"


@dataclass
class ServeSettings:
    """Server limits: what one request may ask for and how many may wait."""

    max_tokens_cap: int = 2048  # largest max_tokens a request may ask for
    max_batch: int = 16  # largest n x len(prompts) of one request
    max_body_bytes: int = 1 << 20  # larger request bodies get 413
    max_queue: int = 256  # requests waiting or running; more get 503
    default_max_tokens: int = 16  # OpenAI's default for max_tokens


# --- errors ---------------------------------------------------------------------------------

class APIError(Exception):
    """An error answered as JSON: `status` 4xx/5xx, OpenAI's error `type`, the `param` at fault."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 type: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# --- the generation worker ------------------------------------------------------------------

@dataclass
class Sampling:
    max_tokens: int
    temperature: float
    top_k: int | None
    top_p: float | None
    min_p: float | None
    repetition_penalty: float
    stop: list[str] | None

    def batch_key(self) -> tuple:
        """Requests with equal keys can decode in one batch (max_tokens may differ)."""
        return (self.temperature, self.top_k, self.top_p, self.min_p, self.repetition_penalty,
                tuple(self.stop or ()))


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

    def emit(self, *event: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop is gone: nobody is listening any more
            self.cancelled.set()


class ServerBusy(Exception):
    pass


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
        streams = [TextStream(self.tokenizer, jobs[0].sampling.stop) for _ in rows]
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


# --- requests -------------------------------------------------------------------------------

def _pydantic_model():
    """The request schema (built lazily: pydantic comes with the serve extra)."""
    from pydantic import BaseModel, ConfigDict, Field

    class StreamOptions(BaseModel):
        model_config = ConfigDict(strict=True, extra="ignore")
        include_usage: bool = False

    class CompletionRequest(BaseModel):
        """OpenAI's completion parameters (plus top_k, min_p, repetition_penalty); others ignored.
        Strict: no strings for numbers, no booleans for integers, no NaN or infinity."""

        model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)
        model: str | None = None
        prompt: str | list[str]
        max_tokens: int | None = Field(default=None, ge=1)
        temperature: float | None = Field(default=None, ge=0)
        top_p: float | None = Field(default=None, gt=0, le=1)
        top_k: int | None = Field(default=None, ge=0)
        min_p: float | None = Field(default=None, ge=0, le=1)
        repetition_penalty: float | None = Field(default=None, gt=0)
        stop: str | list[str] | None = None
        seed: int | None = Field(default=None, ge=0, le=2**62)
        n: int | None = Field(default=None, ge=1)
        stream: bool | None = None
        stream_options: StreamOptions | None = None
        echo: bool | None = None
        logprobs: int | None = None
        best_of: int | None = None
        user: str | None = None

    return CompletionRequest


def _validation_message(err: Any) -> APIError:
    """The first pydantic error as one readable line, naming the parameter."""
    e = err.errors()[0]
    param = str(e["loc"][0]) if e["loc"] else None
    msg = e["msg"]
    if e["type"] == "missing":
        msg = "is required"
    return APIError(400, f"{param}: {msg}" if param else msg, param=param)


def parse_body(raw: bytes, schema: Any) -> Any:
    """Bytes -> a validated request, or APIError(400) saying what is wrong."""
    from pydantic import ValidationError

    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise APIError(400, f"request body is not valid UTF-8 (byte {e.start})") from None
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise APIError(400, f"request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise APIError(400, f"request body must be a JSON object, got {type(data).__name__}")
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        raise _validation_message(e) from None
    except RecursionError:
        raise APIError(400, "request body is nested too deeply") from None


# --- the model card -------------------------------------------------------------------------

def final_losses(run_dir: Path) -> dict[str, float | int | None]:
    """From metrics.csv: the last step, its train loss, the last and the best val loss."""
    out: dict[str, float | int | None] = {"step": None, "train_loss": None, "val_loss": None,
                                          "best_val_loss": None}
    try:
        with open(run_dir / METRICS_FILE, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error):
        return out
    vals = []
    for row in rows:
        with contextlib.suppress(TypeError, ValueError):
            out["step"] = int(row["step"])
        with contextlib.suppress(TypeError, ValueError, KeyError):
            out["train_loss"] = float(row["train_loss"])
        with contextlib.suppress(TypeError, ValueError, KeyError):
            vals.append(float(row["val_loss"]))
    if vals:
        out["val_loss"], out["best_val_loss"] = vals[-1], min(vals)
    return out


def model_card(run: Run, model_id: str, settings: ServeSettings) -> dict[str, Any]:
    m, t = run.config.model, run.config.train
    return {
        "id": model_id,
        "path": str(run.path),
        "parameters": count_params(run.model),
        "device": str(next(run.model.parameters()).device),
        "model": {k: getattr(m, k) for k in ("kind", "vocab_size", "block_size", "n_layer", "n_head",
                                             "n_embd", "dropout", "bias")},
        "tokenizer": t.tokenizer,
        "data": t.data,
        "losses": final_losses(run.path),
        "limits": {"max_tokens": settings.max_tokens_cap, "max_batch": settings.max_batch,
                   "max_body_bytes": settings.max_body_bytes, "max_queue": settings.max_queue},
    }


# --- the app --------------------------------------------------------------------------------

def create_app(run: Run | str | Path, settings: ServeSettings | None = None, device: str = "cpu",
               weights: str = MODEL_FILE, model_id: str | None = None, dtype: str = "float32",
               warn: Any = None):
    """The FastAPI app serving `run` (a loaded Run, or a run directory loaded in `dtype`)."""
    try:
        from fastapi import FastAPI, Request
        from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
        from fastapi.staticfiles import StaticFiles
        from starlette.exceptions import HTTPException
    except ImportError:
        raise QuillError("quill serve needs the serve extra: pip install 'quillgpt[serve]'") from None

    if not isinstance(run, Run):
        run = load_run(run, device, weights, dtype=dtype, warn=warn)
    settings = settings or ServeSettings()
    model_id = model_id or run.path.resolve().name
    engine = Engine(run, settings.max_queue, settings.max_batch)
    card = model_card(run, model_id, settings)
    schema = _pydantic_model()
    block_size = run.config.model.block_size
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        engine.close()

    app = FastAPI(title="quill serve", version="1", lifespan=lifespan)
    app.state.engine = engine
    app.state.settings = settings

    def error(e: APIError) -> JSONResponse:
        headers = {"Retry-After": "1"} if e.status == 503 else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError) -> JSONResponse:
        return error(e)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, e: HTTPException) -> JSONResponse:
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return error(APIError(e.status_code, str(e.detail), type=kind))

    @app.exception_handler(Exception)
    async def _server_error(request: Request, e: Exception) -> JSONResponse:
        return error(APIError(500, f"internal error: {type(e).__name__}", type="server_error"))

    # --- pages and metadata ---

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(WEB_DIR / "index.html", headers={
            "Content-Security-Policy": "default-src 'self'; style-src 'self'; script-src 'self'"})

    app.mount("/static", StaticFiles(directory=WEB_DIR), name="static")

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok" if engine.alive() else "worker stopped", "model": model_id,
                "queue": engine.pending, "completed": engine.completed, "cancelled": engine.cancelled,
                "batches": engine.batches, "tokens_generated": engine.tokens}

    def model_object() -> dict[str, Any]:
        return {"id": model_id, "object": "model", "created": created, "owned_by": "quillgpt"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_object()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> dict[str, Any]:
        if name != model_id:
            raise APIError(404, f"model {name!r} not found; this server serves {model_id!r}",
                           param="model", type="not_found_error", code="model_not_found")
        return model_object()

    @app.get("/v1/model-card")
    async def model_card_route() -> dict[str, Any]:
        return card

    # --- completions ---

    async def read_body(request: Request) -> bytes:
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > settings.max_body_bytes):
            raise APIError(413, f"request body is larger than {settings.max_body_bytes} bytes")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > settings.max_body_bytes:
                raise APIError(413, f"request body is larger than {settings.max_body_bytes} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    def make_job(req: Any, loop: asyncio.AbstractEventLoop) -> tuple[Job, list[int]]:
        """Check the request against the model and the limits; encode the prompts."""
        if req.model not in (None, model_id):
            raise APIError(404, f"model {req.model!r} not found; this server serves {model_id!r}",
                           param="model", type="not_found_error", code="model_not_found")
        if req.logprobs is not None:
            raise APIError(400, "logprobs is not supported", param="logprobs")
        if req.best_of not in (None, 1):
            raise APIError(400, "best_of is not supported", param="best_of")
        max_tokens = req.max_tokens if req.max_tokens is not None else settings.default_max_tokens
        if max_tokens > settings.max_tokens_cap:
            raise APIError(400, f"max_tokens: at most {settings.max_tokens_cap} on this server, "
                                f"got {max_tokens}", param="max_tokens")
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if not prompts:
            raise APIError(400, "prompt: an empty list", param="prompt")
        n = req.n or 1
        if n * len(prompts) > settings.max_batch:
            raise APIError(400, f"n x prompts is {n * len(prompts)}, at most {settings.max_batch} "
                                "on this server", param="n")
        stop = [req.stop] if isinstance(req.stop, str) else req.stop
        sampling = Sampling(max_tokens, 1.0 if req.temperature is None else req.temperature,
                            req.top_k or None, req.top_p, req.min_p, req.repetition_penalty or 1.0,
                            stop or None)
        try:
            check_sampling_args(sampling.temperature, sampling.top_k, sampling.top_p, sampling.min_p,
                                sampling.repetition_penalty, max_tokens, sampling.stop)
            encoded = [encode_prompt(run.tokenizer, p, block_size) for p in prompts]
        except QuillError as e:
            param = "prompt" if "prompt" in str(e) or "character" in str(e) else "stop"
            raise APIError(400, str(e), param=param) from None
        rows = [ids or start_ids(run.tokenizer) for ids in encoded for _ in range(n)]
        seed = req.seed if req.seed is not None else int.from_bytes(os.urandom(7), "little")
        job = Job(rows, [seed + i for i in range(len(rows))], sampling, loop)
        return job, [len(ids) for ids in encoded]

    def submit(job: Job) -> None:
        try:
            engine.submit(job)
        except ServerBusy as e:
            raise APIError(503, str(e), type="server_busy") from None

    def usage(prompt_tokens: list[int], tokens: list[int]) -> dict[str, int]:
        p, c = sum(prompt_tokens), sum(tokens)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = parse_body(await read_body(request), schema)
        # encoding a long prompt takes a while: not on the event loop
        job, prompt_tokens = await asyncio.to_thread(make_job, req, asyncio.get_running_loop())
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        n = req.n or 1
        echo = [prompts[i // n] if req.echo else "" for i in range(len(job.rows))]
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion",
                "created": int(time.time()), "model": model_id}
        submit(job)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(sse(job, head, echo, prompt_tokens, include_usage),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await complete(request, job, head, echo, prompt_tokens)

    async def complete(request: Request, job: Job, head: dict, echo: list[str],
                       prompt_tokens: list[int]) -> JSONResponse:
        texts = list(echo)
        finish, tokens, failed = ["length"] * len(texts), [0] * len(texts), None

        async def collect() -> None:
            nonlocal finish, tokens, failed
            while (event := await job.events.get())[0] != "end":
                if event[0] == "pieces":
                    for b, piece in enumerate(event[1]):
                        texts[b] += piece
                elif event[0] == "finish":
                    finish, tokens = event[1], event[2]
                elif event[0] == "error":
                    failed = event[1]

        async def disconnected() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass

        collecting = asyncio.ensure_future(collect())
        watching = asyncio.ensure_future(disconnected())
        try:
            await asyncio.wait({collecting, watching}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watching.cancel()
            if not collecting.done():  # the client left (or we were cancelled): free the slot
                job.cancelled.set()
                collecting.cancel()
        if not collecting.done() or collecting.cancelled():
            raise APIError(499, "client closed the request", type="client_closed")
        if failed:
            raise APIError(500, failed, type="server_error")
        choices = [{"text": t, "index": i, "logprobs": None, "finish_reason": f}
                   for i, (t, f) in enumerate(zip(texts, finish))]
        return JSONResponse({**head, "choices": choices, "usage": usage(prompt_tokens, tokens)})

    async def sse(job: Job, head: dict, echo: list[str], prompt_tokens: list[int],
                  include_usage: bool) -> AsyncIterator[str]:
        def chunk(choices: list[dict], **extra: Any) -> str:
            return f"data: {json.dumps({**head, 'choices': choices, **extra})}\n\n"

        def choice(i: int, text: str, finish: str | None = None) -> dict:
            return {"text": text, "index": i, "logprobs": None, "finish_reason": finish}

        try:
            if any(echo):
                yield chunk([choice(i, e) for i, e in enumerate(echo) if e])
            while (event := await job.events.get())[0] != "end":
                if event[0] == "pieces":
                    yield chunk([choice(i, p) for i, p in enumerate(event[1]) if p])
                elif event[0] == "finish":
                    yield chunk([choice(i, "", f) for i, f in enumerate(event[1])])
                    if include_usage:
                        yield chunk([], usage=usage(prompt_tokens, event[2]))
                elif event[0] == "error":
                    yield f"data: {json.dumps(APIError(500, event[1], type='server_error').body())}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            job.cancelled.set()  # a no-op when finished; stops the worker when the client left

    return app


# --- running it -----------------------------------------------------------------------------

def bind_socket(host: str, port: int) -> socket.socket:
    """A listening socket, or QuillError (port in use, bad host) as one line."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise QuillError(f"cannot resolve host {host!r}: {e.strerror}") from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        raise QuillError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    sock.listen(2048)
    sock.setblocking(False)
    return sock


def serve(run_dir: str | Path, host: str = "127.0.0.1", port: int = 8000, device: str = "cpu",
          weights: str = MODEL_FILE, settings: ServeSettings | None = None,
          log: Any = print, log_level: str = "warning", dtype: str = "float32") -> None:
    """Load `run_dir` (weights in `dtype`) and serve it until interrupted (what `quill serve` does)."""
    try:
        import uvicorn
    except ImportError:
        raise QuillError("quill serve needs the serve extra: pip install 'quillgpt[serve]'") from None
    sock = bind_socket(host, port)
    app = create_app(run_dir, settings, device, weights, dtype=dtype, warn=lambda m: log(f"warning: {m}"))
    card = app.state.engine.run
    actual_port = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    log(f"serving {Path(run_dir)} ({count_params(card.model) / 1e6:.2f}M parameters) on "
        f"http://{shown}:{actual_port}/  (API: /v1/completions; Ctrl-C stops)")
    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=2)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn shut down cleanly, then passed Ctrl-C on
        pass
    log("server stopped")


class BackgroundServer:
    """Serve an app on a background thread (a notebook, tests): `with BackgroundServer(app) as url:`.

    `port=0` picks a free port; `url` is then the address actually listened on.
    """

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0):
        import uvicorn

        self.sock = bind_socket(host, port)
        self.url = f"http://{host}:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       name="quill-serve", daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        return self.url

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()
