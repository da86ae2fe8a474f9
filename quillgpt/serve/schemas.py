"""What a request may say: the server's limits, the request schemas, and their checks.

Owns the way from raw request bytes to settings the engine can run: the body is decoded (UTF-8,
JSON, an object), validated against a pydantic schema (strict types and ranges), then checked
against the served model and the server's limits (`ServeSettings`), and its prompts are encoded.
Anything wrong becomes an `APIError`: a 4xx answered as JSON in OpenAI's shape,
`{"error": {"message", "type", "param", "code"}}`. pydantic comes with the serve extra, so the
schemas are built on first use.
"""

import json
import os
from dataclasses import dataclass
from typing import Any

from ..errors import QuillError
from ..generate import check_sampling_args, encode_prompt
from ..tokenizers import Tokenizer
from .logprobs import MAX_LOGPROBS


@dataclass
class ServeSettings:
    """Server limits: what one request may ask for and how many may wait."""

    max_tokens_cap: int = 2048  # largest max_tokens a request may ask for
    max_batch: int = 16  # largest n x len(prompts) of one request
    max_body_bytes: int = 1 << 20  # larger request bodies get 413
    max_queue: int = 256  # requests waiting or running; more get 503
    default_max_tokens: int = 16  # OpenAI's default for max_tokens


class APIError(Exception):
    """An error answered as JSON: `status` 4xx/5xx, OpenAI's error `type`, the `param` at fault."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 type: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class Sampling:
    """How a request's rows are decoded: one setting for all its choices."""

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
class CompletionInput:
    """A checked completion request: what the engine needs to run it."""

    prompts: list[str]
    prompt_ids: list[list[int]]  # one per prompt, in order
    n: int  # choices per prompt
    sampling: Sampling
    seed: int  # of the first row; row i uses seed + i
    logprobs: int | None = None  # alternatives per token (serve/logprobs.py); None: no logprobs
    echo: bool = False  # the prompt is part of each choice's text (and scored, with logprobs)


# --- the request schema ---------------------------------------------------------------------

def completion_request_schema() -> Any:
    """The /v1/completions request schema (built lazily: pydantic comes with the serve extra)."""
    from pydantic import BaseModel, ConfigDict, Field

    class StreamOptions(BaseModel):
        model_config = ConfigDict(strict=True, extra="ignore")
        include_usage: bool = False

    class CompletionRequest(BaseModel):
        """OpenAI's completion parameters (plus top_k, min_p, repetition_penalty); others ignored.
        Strict: no strings for numbers, no booleans for integers, no NaN or infinity."""

        model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)
        model: str | None = None
        prompt: str | list[str] | list[int] | list[list[int]]  # text, or token ids
        max_tokens: int | None = Field(default=None, ge=0)
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
        logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
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


# --- checks against the model and the limits ------------------------------------------------

def check_model(name: str | None, model_id: str) -> None:
    """APIError(404) unless `name` is the served model (or not given)."""
    if name not in (None, model_id):
        raise APIError(404, f"model {name!r} not found; this server serves {model_id!r}",
                       param="model", type="not_found_error", code="model_not_found")


def check_completion(req: Any, settings: ServeSettings, model_id: str, tokenizer: Tokenizer,
                     block_size: int) -> CompletionInput:
    """Check a parsed completion request against the model and the limits; encode the prompts."""
    check_model(req.model, model_id)
    if req.best_of not in (None, 1):
        raise APIError(400, "best_of is not supported", param="best_of")
    max_tokens = req.max_tokens if req.max_tokens is not None else settings.default_max_tokens
    if max_tokens == 0 and not req.echo:
        raise APIError(400, "max_tokens: 0 generates nothing; it is for echo (with logprobs: score the "
                            "prompt)", param="max_tokens")
    if max_tokens > settings.max_tokens_cap:
        raise APIError(400, f"max_tokens: at most {settings.max_tokens_cap} on this server, "
                            f"got {max_tokens}", param="max_tokens")
    if isinstance(req.prompt, list) and not req.prompt:
        raise APIError(400, "prompt: an empty list", param="prompt")
    prompts, encoded = prompt_texts_and_ids(req.prompt, tokenizer, block_size)
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
        if encoded is None:
            encoded = [encode_prompt(tokenizer, p, block_size) for p in prompts]
    except QuillError as e:
        param = "prompt" if "prompt" in str(e) or "character" in str(e) else "stop"
        raise APIError(400, str(e), param=param) from None
    seed = req.seed if req.seed is not None else int.from_bytes(os.urandom(7), "little")
    return CompletionInput(prompts, encoded, n, sampling, seed, req.logprobs, bool(req.echo))


def prompt_texts_and_ids(prompt: Any, tokenizer: Tokenizer, block_size: int
                         ) -> tuple[list[str], list[list[int]] | None]:
    """The prompts as texts, and as token ids when they came as ids ([int] or [[int]]; checked
    against the vocabulary and the context); text prompts are encoded later (None)."""
    if isinstance(prompt, str):
        return [prompt], None
    if all(isinstance(p, str) for p in prompt):
        return list(prompt), None
    rows = [prompt] if all(isinstance(t, int) for t in prompt) else prompt
    for ids in rows:
        bad = [t for t in ids if not 0 <= t < tokenizer.vocab_size]
        if bad:
            raise APIError(400, f"prompt: token id {bad[0]} is outside the vocabulary of {tokenizer.vocab_size}",
                           param="prompt")
        if len(ids) > block_size:
            raise APIError(400, f"prompt is {len(ids)} tokens long, longer than the model's context of "
                                f"{block_size}", param="prompt")
    return [tokenizer.decode(ids) for ids in rows], [list(ids) for ids in rows]
