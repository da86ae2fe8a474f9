"""`quill serve`: an OpenAI-compatible completions API and a web playground for one run.

How a request flows: a route (`routes`) reads the body; `schemas` checks it (size, UTF-8, JSON,
types, ranges, the server's limits) and encodes the prompts; the route puts a `Job` on the
`Engine`'s queue (`engine`). One worker thread takes jobs in order and runs the KV-cached
decoding loop of `quillgpt.generate`; the `n` choices (and a list of prompts) of one request,
and waiting requests with the same sampling settings, decode together as one batch. Every step's
text pieces go back to the event loop, so the loop never waits on the model. A job whose client
went away is cancelled. Errors are JSON in OpenAI's shape, 4xx for anything the client did.
`server` runs the app with uvicorn: `serve` until Ctrl-C, or `BackgroundServer` on a thread.

    schemas.py   limits (ServeSettings), request schemas, checks, APIError
    engine.py    model loading, the job queue and the batching worker thread
    routes.py    the FastAPI app: routes, error handlers, create_app
    server.py    bind_socket, serve, BackgroundServer
"""

from .engine import Engine, Job, ServerBusy, load
from .routes import WEB_DIR, create_app, final_losses, model_card
from .schemas import APIError, CompletionInput, Sampling, ServeSettings, parse_body
from .server import BackgroundServer, bind_socket, serve

__all__ = [
    "WEB_DIR", "APIError", "BackgroundServer", "CompletionInput", "Engine", "Job", "Sampling",
    "ServeSettings", "ServerBusy", "bind_socket", "create_app", "final_losses", "load", "model_card",
    "parse_body", "serve",
]
