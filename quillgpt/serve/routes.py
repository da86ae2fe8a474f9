"""The FastAPI app: the routes, the error handlers, and `create_app` wiring them to an engine.

    GET  /                  the playground (quillgpt/web/: plain HTML, CSS and JS; /static/...)
    POST /v1/completions    OpenAI's legacy completions API, streamed as Server-Sent Events
    POST /v1/chat/completions  OpenAI's chat API (models with a chat template: quill sft)
    GET  /v1/models         the one model served (and /v1/models/{id})
    GET  /v1/model-card     config, parameter count, final losses (metrics.csv), server limits
    GET  /health            liveness and queue length
    GET  /metrics           the server's figures in Prometheus' text format (docs/serve.md)

Each route is a short method of `Routes`, which holds what they share (the engine, the limits,
the model's id and card). A route reads the request, lets `schemas` check it, hands a job to
the `engine` and shapes the engine's events into OpenAI's answer: one JSON body, or an SSE
stream. Every error, ours or the framework's, is answered as JSON in OpenAI's shape.
"""

from __future__ import annotations  # the route signatures name fastapi's types, an optional extra

import asyncio
import contextlib
import html
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from ..chat import chat_token_ids, has_chat_template
from ..checkpoint import MODEL_FILE, Run
from ..errors import QuillError
from ..model import count_params
from ..plot import read_metrics
from ..tools import builtin_tools
from .engine import Engine, Job, ServerBusy, load
from .guard import RequestGuard
from .logprobs import LogprobsCollector
from .prometheus import CONTENT_TYPE
from .schemas import (
    APIError,
    ServeSettings,
    chat_request_schema,
    check_chat,
    check_completion,
    check_model,
    completion_request_schema,
    parse_body,
)

try:
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
    from fastapi.staticfiles import StaticFiles
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect
except ImportError:  # without the serve extra the package still imports; create_app says what is missing
    FastAPI = None

WEB_DIR = Path(__file__).resolve().parent.parent / "web"


# --- the model card -------------------------------------------------------------------------

def final_losses(run_dir: Path) -> dict[str, float | int | None]:
    """From metrics.csv: the last step, its train loss, the last and the best val loss."""
    out: dict[str, float | int | None] = {"step": None, "train_loss": None, "val_loss": None,
                                          "best_val_loss": None}
    try:
        rows = read_metrics(run_dir)
    except QuillError:
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
        "parameters": count_params(run.model),
        "device": str(next(run.model.parameters()).device),
        "model": {k: getattr(m, k) for k in ("kind", "vocab_size", "block_size", "n_layer", "n_head",
                                             "n_embd", "dropout", "bias")},
        "tokenizer": name_only(t.tokenizer),
        "chat": has_chat_template(run.tokenizer),
        "tools": list(settings.tools),  # built-in tools run here (quill serve --tools)
        "data": name_only(t.data),
        "losses": final_losses(run.path),
        "sampling": {"temperature": t.sample_temperature},  # what the run recommends (None: no advice)
        "limits": {"max_tokens": settings.max_tokens_cap, "max_batch": settings.max_batch,
                   "max_body_bytes": settings.max_body_bytes, "max_queue": settings.max_queue,
                   "max_stop": settings.max_stop},
    }


def name_only(value: str | None) -> str | None:
    """A file, directory or URL by its last name: the card never shows where things are on disk."""
    if value is None:
        return None
    return value.rstrip("/").replace("\\", "/").rsplit("/", 1)[-1].split("?", 1)[0] or value


# --- errors ---------------------------------------------------------------------------------

def error_response(e: APIError) -> JSONResponse:
    headers = {"Retry-After": "1"} if e.status == 503 else None
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


async def api_error(request: Request, e: APIError) -> JSONResponse:
    return error_response(e)


async def http_error(request: Request, e: HTTPException) -> JSONResponse:
    kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
    return error_response(APIError(e.status_code, str(e.detail), type=kind))


async def server_error(request: Request, e: Exception) -> JSONResponse:
    return error_response(APIError(500, f"internal error: {type(e).__name__}", type="server_error"))


# --- reading requests, shaping answers ------------------------------------------------------

async def read_body(request: Request, max_bytes: int) -> bytes:
    """The request body, or APIError(413) as soon as it is known to exceed `max_bytes`."""
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > max_bytes):
        raise APIError(413, f"request body is larger than {max_bytes} bytes")
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_bytes:
                raise APIError(413, f"request body is larger than {max_bytes} bytes")
            chunks.append(chunk)
    except ClientDisconnect:  # the client left mid-upload: one line in the log, nobody to answer
        peer = f"{request.client.host}:{request.client.port}" if request.client else "a client"
        logging.getLogger("uvicorn.error").info("%s closed the connection during its upload", peer)
        raise APIError(499, "client closed the request", type="client_closed") from None
    return b"".join(chunks)


def usage(prompt_tokens: list[int], tokens: list[int]) -> dict[str, int]:
    p, c = sum(prompt_tokens), sum(tokens)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


async def complete(request: Request, job: Job, head: dict, echo: list[str],
                   prompt_tokens: list[int], logprobs: LogprobsCollector | None = None) -> JSONResponse:
    """Wait for the whole job; if the client disconnects first, cancel it (frees its slot)."""
    texts, finish, tokens = await wait_for_job(request, job, len(echo), logprobs)
    choices = [{"text": e + t, "index": i, "logprobs": logprobs.choices[i].openai() if logprobs else None,
                "finish_reason": f} for i, (e, t, f) in enumerate(zip(echo, texts, finish))]
    return JSONResponse({**head, "choices": choices, "usage": usage(prompt_tokens, tokens)})


async def sse(job: Job, head: dict, echo: list[str], prompt_tokens: list[int],
              include_usage: bool, logprobs: LogprobsCollector | None = None) -> AsyncIterator[str]:
    """The job's events as Server-Sent Events; a stream closed early cancels the job. With
    logprobs, a choice's chunk carries those of the tokens since its previous chunk."""
    def chunk(choices: list[dict], **extra: Any) -> str:
        return f"data: {json.dumps({**head, 'choices': choices, **extra})}\n\n"

    def choice(i: int, text: str, finish: str | None = None) -> dict:
        lp = logprobs.choices[i].take() if logprobs else None
        return {"text": text, "index": i, "logprobs": lp, "finish_reason": finish}

    try:
        echo_waits = any(echo) and job.score_rows is not None  # for the prompts' logprobs
        if any(echo) and not echo_waits:
            yield chunk([choice(i, e) for i, e in enumerate(echo) if e])
        while (event := await job.events.get())[0] != "end":
            if logprobs is not None and logprobs.consume(event):
                if echo_waits and event[0] == "prompt_logprobs":
                    yield chunk([choice(i, e) for i, e in enumerate(echo) if e])
                    echo_waits = False
                continue
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


# --- whole answers (completions and chat) -------------------------------------------------

async def wait_for_job(request: Request, job: Job, rows: int, logprobs: LogprobsCollector | None = None,
                       calls: list | None = None, rounds: list | None = None
                       ) -> tuple[list[str], list[str], list[int]]:
    """The texts, finish reasons and token counts of a whole job (its logprobs go to `logprobs`,
    each row's tool calls to `calls`, its built-in tools' calls and results to `rounds`); a
    client that disconnects first cancels it (APIError 499), a failed generation is APIError 500."""
    texts, finish, tokens, failed = [""] * rows, ["length"] * rows, [0] * rows, None

    async def collect() -> None:
        nonlocal finish, tokens, failed
        while (event := await job.events.get())[0] != "end":
            if logprobs is not None and logprobs.consume(event):
                continue
            if event[0] == "pieces":
                for b, piece in enumerate(event[1]):
                    texts[b] += piece
            elif event[0] == "finish":
                finish, tokens = event[1], event[2]
            elif event[0] == "tool_calls" and calls is not None:
                calls[:] = [c or old for c, old in zip(event[1], calls)]
            elif event[0] == "tool_parts" and rounds is not None:
                for row, parts in zip(rounds, event[1]):
                    row += tool_parts(parts)
            elif event[0] == "error":
                failed = event[1]

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    collecting, watching = asyncio.ensure_future(collect()), asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({collecting, watching}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watching.cancel()
        if not collecting.done():
            job.cancelled.set()
            collecting.cancel()
    if not collecting.done() or collecting.cancelled():
        raise APIError(499, "client closed the request", type="client_closed")
    if failed:
        raise APIError(500, failed, type="server_error")
    return texts, finish, tokens


async def chat_answer(request: Request, job: Job, head: dict, prompt_tokens: int,
                      logprobs: LogprobsCollector | None = None) -> JSONResponse:
    """A whole chat completion: one assistant message per choice (with its logprobs if asked, and
    the calls it ends with: OpenAI's `tool_calls`, content null when it says nothing else)."""
    calls: list = [None] * len(job.rows)
    rounds: list[list] = [[] for _ in job.rows]
    texts, finish, tokens = await wait_for_job(request, job, len(job.rows), logprobs, calls, rounds)
    choices = [{"index": i, "message": chat_message(t, c, r),
                "logprobs": logprobs.choices[i].openai() if logprobs else None,
                "finish_reason": f} for i, (t, f, c, r) in enumerate(zip(texts, finish, calls, rounds))]
    return JSONResponse({**head, "object": "chat.completion", "choices": choices,
                         "usage": usage([prompt_tokens] * len(texts), tokens)})


def chat_message(text: str, calls: list | None, rounds: list | None = None) -> dict[str, Any]:
    """A choice's message; `rounds`: the server's built-in calls and results (`quill_tools`,
    quill's own field: the playground shows them)."""
    out: dict[str, Any] = {"role": "assistant", "content": text}
    if calls:
        out = {"role": "assistant", "content": text or None, "tool_calls": [c.openai() for c in calls]}
    if rounds:
        out["quill_tools"] = rounds
    return out


def tool_parts(parts: list) -> list[dict[str, str]]:
    """Built-in tool calls and results as `quill_tools` entries: {"type": "call" | "result", "text"}."""
    return [{"type": p.kind, "text": p.text} for p in parts]


def call_deltas(calls: list) -> list[dict[str, Any]]:
    """A choice's calls in OpenAI's stream shape: each with its index, whole in one delta."""
    return [{"index": k, **c.openai()} for k, c in enumerate(calls)]


async def chat_sse(job: Job, head: dict, prompt_tokens: int, include_usage: bool,
                   logprobs: LogprobsCollector | None = None) -> AsyncIterator[str]:
    """OpenAI's chat stream: a first chunk with the role, `delta` chunks with content, a last
    chunk per choice with its finish_reason, the usage if asked, then `data: [DONE]`. With
    logprobs, a choice's chunk carries those of the tokens since its previous chunk."""
    extra = {"usage": None} if include_usage else {}

    def chunk(choices: list[dict], **fields: Any) -> str:
        body = {**head, "object": "chat.completion.chunk", "choices": choices, **extra, **fields}
        return f"data: {json.dumps(body)}\n\n"

    def choice(i: int, delta: dict, finish: str | None = None) -> dict:
        lp = logprobs.choices[i].take() if logprobs else None
        return {"index": i, "delta": delta, "logprobs": lp, "finish_reason": finish}

    try:
        yield chunk([choice(i, {"role": "assistant", "content": ""}) for i in range(len(job.rows))])
        while (event := await job.events.get())[0] != "end":
            if logprobs is not None and logprobs.consume(event):
                continue
            if event[0] == "pieces":
                yield chunk([choice(i, {"content": p}) for i, p in enumerate(event[1]) if p])
            elif event[0] == "tool_calls":
                yield chunk([choice(i, {"tool_calls": call_deltas(c)}) for i, c in enumerate(event[1]) if c])
            elif event[0] == "tool_parts":
                yield chunk([choice(i, {"quill_tools": tool_parts(p)}) for i, p in enumerate(event[1]) if p])
            elif event[0] == "finish":
                yield chunk([choice(i, {}, f) for i, f in enumerate(event[1])])
                if include_usage:
                    yield chunk([], usage=usage([prompt_tokens] * len(event[2]), event[2]))
            elif event[0] == "error":
                yield f"data: {json.dumps(APIError(500, event[1], type='server_error').body())}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        job.cancelled.set()


# --- the routes -----------------------------------------------------------------------------

PAGE_CSP = "default-src 'self'; style-src 'self'; script-src 'self'"


def card_rows(card: dict[str, Any]) -> list[tuple[str, str]]:
    """The model card as the page shows it: (what, value) rows."""
    m, losses, temperature = card["model"], card["losses"], card["sampling"]["temperature"]

    def fmt(x: float | None) -> str:
        return "–" if x is None else f"{x:.4f}"

    def plural(n: int, word: str) -> str:
        return f"{n} {word}{'' if n == 1 else 's'}"

    return [
        ("model", card["id"]),
        ("parameters", f"{card['parameters'] / 1e6:.2f}M ({card['parameters']:,})"),
        ("architecture", f"{m['kind']}: {plural(m['n_layer'], 'layer')}, {plural(m['n_head'], 'head')}, "
                         f"n_embd {m['n_embd']}"),
        ("context", f"{m['block_size']} tokens"),
        ("vocabulary", f"{m['vocab_size']} ({card['tokenizer']})"),
        ("chat template", "yes" if card["chat"] else "no"),
    ] + ([("tools run here", ", ".join(card["tools"]))] if card["tools"] else []) + [
        ("dropout", f"{m['dropout']:g}" if m["dropout"] else "none"),
        ("biases", "yes" if m["bias"] else "no"),
        ("steps trained", "–" if losses["step"] is None else str(losses["step"])),
        ("train loss", fmt(losses["train_loss"])),
        ("val loss", fmt(losses["val_loss"])),
        ("best val loss", fmt(losses["best_val_loss"])),
        ("data", card["data"] or "–"),
        ("device", card["device"]),
        ("longest reply", f"{card['limits']['max_tokens']:,} tokens (the server's cap)"),
    ] + ([("recommended", "greedy (temperature 0)" if temperature == 0 else f"temperature {temperature:g}")]
         if temperature is not None else [])


def page_html(card: dict[str, Any]) -> str:
    """The playground with the model card filled in on the server: the first paint already
    shows the model (no request, no "loading" state)."""
    rows = "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(v)}</dd>" for k, v in card_rows(card))
    fields = {"MODEL_ID": html.escape(card["id"]), "CHAT": "true" if card["chat"] else "false",
              "MAX_TOKENS": str(card["limits"]["max_tokens"]), "CONTEXT": str(card["model"]["block_size"]),
              "TEMPERATURE": "" if card["sampling"]["temperature"] is None else f"{card['sampling']['temperature']:g}",
              "CARD": rows}
    text = (WEB_DIR / "index.html").read_text(encoding="utf-8")
    for name, value in fields.items():
        text = text.replace("{{" + name + "}}", value)
    return text


class Routes:
    """The API's routes over one engine; their names are the OpenAPI operation names."""

    def __init__(self, engine: Engine, settings: ServeSettings, model_id: str):
        self.engine, self.settings, self.model_id = engine, settings, model_id
        self.card = model_card(engine.run, model_id, settings)
        self.schema = completion_request_schema()
        self.chat_schema = chat_request_schema()
        self.page_text = page_html(self.card)
        self.block_size = engine.run.config.model.block_size
        self.created = int(time.time())

    async def page(self) -> HTMLResponse:
        return HTMLResponse(self.page_text, headers={"Content-Security-Policy": PAGE_CSP})

    async def health(self) -> dict[str, Any]:
        e = self.engine
        return {"status": "ok" if e.alive() else "worker stopped", "model": self.model_id,
                "queue": e.pending, "completed": e.completed, "cancelled": e.cancelled,
                "steps": e.steps, "tokens_generated": e.tokens}

    async def metrics(self) -> PlainTextResponse:
        return PlainTextResponse(self.engine.metrics(), media_type=CONTENT_TYPE)

    def model_object(self) -> dict[str, Any]:
        return {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "quillgpt"}

    async def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [self.model_object()]}

    async def model(self, name: str) -> dict[str, Any]:
        check_model(name, self.model_id)
        return self.model_object()

    async def model_card_route(self) -> dict[str, Any]:
        return self.card

    def submit(self, job: Job) -> None:
        try:
            self.engine.submit(job)
        except ServerBusy as e:
            raise APIError(503, str(e), type="server_busy") from None

    async def completions(self, request: Request):
        req = parse_body(await read_body(request, self.settings.max_body_bytes), self.schema)
        # encoding a long prompt takes a while: not on the event loop
        checked = await asyncio.to_thread(check_completion, req, self.settings, self.model_id,
                                          self.engine.tokenizer, self.block_size)
        job = self.engine.new_job(checked.prompt_ids, checked.n, checked.sampling, checked.seed,
                                  asyncio.get_running_loop(), checked.logprobs,
                                  score_prompts=checked.echo and checked.logprobs is not None)
        lp = None
        if checked.logprobs is not None:
            lp = LogprobsCollector(self.engine.tokenizer, len(job.rows), checked.logprobs)
        prompt_tokens = [len(ids) for ids in checked.prompt_ids]
        echo = [checked.prompts[i // checked.n] if req.echo else "" for i in range(len(job.rows))]
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion",
                "created": int(time.time()), "model": self.model_id}
        self.submit(job)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(sse(job, head, echo, prompt_tokens, include_usage, lp),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await complete(request, job, head, echo, prompt_tokens, lp)


    async def chat_completions(self, request: Request):
        req = parse_body(await read_body(request, self.settings.max_body_bytes), self.chat_schema)
        checked = await asyncio.to_thread(check_chat, req, self.settings, self.model_id,
                                          self.engine.tokenizer, self.block_size)
        job = self.engine.new_job([checked.prompt_ids], checked.n, checked.sampling, checked.seed,
                                  asyncio.get_running_loop(), checked.logprobs)
        job.end_ids, job.tools = checked.end_ids, checked.tools
        lp = None
        if checked.logprobs is not None:
            lp = LogprobsCollector(self.engine.tokenizer, len(job.rows), checked.logprobs, chat=True,
                                   end_ids=checked.end_ids)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": self.model_id,
                "system_fingerprint": None}
        self.submit(job)
        prompt_tokens = len(checked.prompt_ids)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(chat_sse(job, head, prompt_tokens, include_usage, lp),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await chat_answer(request, job, head, prompt_tokens, lp)


# --- the app --------------------------------------------------------------------------------

def create_app(run: Run | str | Path, settings: ServeSettings | None = None, device: str = "cpu",
               weights: str = MODEL_FILE, model_id: str | None = None, dtype: str = "float32",
               warn: Callable[[str], None] | None = None):
    """The FastAPI app serving `run` (a loaded Run, or a run directory loaded in `dtype`)."""
    if FastAPI is None:
        raise QuillError("quill serve needs the serve extra: pip install 'quillgpt[serve]'")
    run = load(run, device, weights, dtype, warn)
    settings = settings or ServeSettings()
    if settings.tools:  # a misspelt tool, or a model that never learnt tools: refused before serving
        settings.tools = tuple(builtin_tools(settings.tools))
        chat_token_ids(run.tokenizer, tools=True)
    engine = Engine(run, settings.max_queue, settings.max_batch, settings.kv_cache_mb)
    routes = Routes(engine, settings, model_id or run.path.resolve().name)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        engine.close()

    app = FastAPI(title="quill serve", version="1", lifespan=lifespan)
    app.state.engine = engine
    app.state.settings = settings
    app.add_middleware(RequestGuard, allowed_hosts=settings.allowed_hosts)
    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(Exception, server_error)
    app.get("/", include_in_schema=False)(routes.page)
    app.mount("/static", StaticFiles(directory=WEB_DIR), name="static")
    app.get("/health")(routes.health)
    app.get("/metrics", include_in_schema=False)(routes.metrics)
    app.get("/v1/models")(routes.models)
    app.get("/v1/models/{name:path}")(routes.model)
    app.get("/v1/model-card")(routes.model_card_route)
    app.post("/v1/completions")(routes.completions)
    app.post("/v1/chat/completions")(routes.chat_completions)
    return app
