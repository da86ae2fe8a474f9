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

from ..chat import (
    ConversationError,
    ToolUse,
    check_messages,
    end_ids,
    has_chat_template,
    has_tool_template,
    prompt_ids,
)
from ..errors import QuillError, lone_surrogate, shown
from ..generate import check_sampling_args, encode_prompt
from ..tokenizers import Tokenizer
from ..tools import ToolError, check_tool_definitions
from .logprobs import MAX_LOGPROBS, MAX_TOP_LOGPROBS


@dataclass
class ServeSettings:
    """Server limits: what one request may ask for and how many may wait."""

    max_tokens_cap: int = 2048  # largest max_tokens a request may ask for
    max_batch: int = 16  # largest n x len(prompts) of one request; rows decoding at once
    max_body_bytes: int = 1 << 20  # larger request bodies get 413
    max_queue: int = 256  # requests waiting or running; more get 503
    kv_cache_mb: float | None = None  # the KV cache's budget (MiB): fewer rows decode at once if it is small
    default_max_tokens: int = 16  # OpenAI's default for max_tokens
    max_stop: int = 4  # stop strings per request (OpenAI's limit): each is checked at every token
    max_stop_chars: int = 256  # characters per stop string
    read_timeout_s: float = 30.0  # a request (head and body) must arrive whole within this; else closed
    max_connections: int = 1000  # open connections; at the cap the longest idle one is closed (server.py)
    # Host headers answered besides IP addresses ("*": any); see guard.py
    allowed_hosts: tuple[str, ...] = ("localhost",)
    tools: tuple[str, ...] = ()  # built-in tools run here for every chat request (quill serve --tools)


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

def _sampling_request() -> Any:
    """The parameters both request schemas share (OpenAI's, plus top_k, min_p,
    repetition_penalty); parameters a schema does not know are ignored. Strict: no strings for
    numbers, no booleans for integers, no NaN or infinity. Built lazily: pydantic comes with the
    serve extra."""
    from pydantic import BaseModel, ConfigDict, Field

    class StreamOptions(BaseModel):
        model_config = ConfigDict(strict=True, extra="ignore")
        include_usage: bool = False

    class SamplingRequest(BaseModel):
        model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)
        model: str | None = None
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
        user: str | None = None

    return SamplingRequest


def completion_request_schema() -> Any:
    """The /v1/completions request schema."""
    from pydantic import Field

    class CompletionRequest(_sampling_request()):
        prompt: str | list[str] | list[int] | list[list[int]]  # text, or token ids
        max_tokens: int | None = Field(default=None, ge=0)
        echo: bool | None = None
        logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
        best_of: int | None = None

    return CompletionRequest


def _validation_message(err: Any) -> APIError:
    """The first pydantic error as one readable line, naming the parameter."""
    e = err.errors()[0]
    param = str(e["loc"][0])[:100] if e["loc"] else None
    msg = e["msg"][:200]
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
    for key, value in data.items():  # no tokenizer or answer can hold one (UTF-8 cannot)
        if (bad := lone_surrogate(key) or lone_surrogate(value)) is not None:
            param = shown(key) if lone_surrogate(key) else key
            raise APIError(400, f"{param}: holds a lone surrogate ({bad}), which is not valid Unicode", param=param)
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
        raise APIError(404, f"model {shown(name)} not found; this server serves {model_id!r}",
                       param="model", type="not_found_error", code="model_not_found")


def check_stop(stop: str | list[str] | None, settings: ServeSettings) -> list[str] | None:
    """The stop strings as a list, within the server's limits (each is checked at every token)."""
    stop = [stop] if isinstance(stop, str) else stop
    if stop and len(stop) > settings.max_stop:
        raise APIError(400, f"stop: at most {settings.max_stop} stop strings, got {len(stop)}", param="stop")
    if stop and any(len(s) > settings.max_stop_chars for s in stop):
        raise APIError(400, f"stop: at most {settings.max_stop_chars} characters per stop string",
                       param="stop")
    return stop


def checked_sampling(req: Any, max_tokens: int, settings: ServeSettings) -> Sampling:
    """The request's sampling settings (OpenAI's defaults where unset), checked as the CLI checks
    them; both completion routes use it."""
    stop = check_stop(req.stop, settings)
    sampling = Sampling(max_tokens, 1.0 if req.temperature is None else req.temperature,
                        req.top_k or None, req.top_p, req.min_p, req.repetition_penalty or 1.0,
                        stop or None)
    try:
        check_sampling_args(sampling.temperature, sampling.top_k, sampling.top_p, sampling.min_p,
                            sampling.repetition_penalty, max_tokens, sampling.stop)
    except QuillError as e:
        raise APIError(400, str(e), param="stop") from None
    return sampling


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
    sampling = checked_sampling(req, max_tokens, settings)
    try:
        if encoded is None:
            encoded = [encode_prompt(tokenizer, p, block_size) for p in prompts]
    except QuillError as e:
        param = "prompt" if "prompt" in str(e) or "character" in str(e) else "stop"
        raise APIError(400, str(e), param=param) from None
    seed = req.seed if req.seed is not None else int.from_bytes(os.urandom(7), "little")
    return CompletionInput(prompts, encoded, n, sampling, seed, req.logprobs, bool(req.echo))


# --- chat completions -----------------------------------------------------------------------

@dataclass
class ChatInput:
    """A checked chat request: the conversation's prompt ids and how to decode the reply."""

    prompt_ids: list[int]
    n: int
    sampling: Sampling
    seed: int
    end_ids: frozenset[int]  # tokens that end a reply
    logprobs: int | None = None  # alternatives per token (top_logprobs); None: no logprobs
    tools: ToolUse | None = None  # the server's built-ins and the request's tools (None: no tools)


def chat_request_schema() -> Any:
    """The /v1/chat/completions request schema."""
    from pydantic import BaseModel, ConfigDict, Field

    class ContentPart(BaseModel):
        model_config = ConfigDict(strict=True, extra="ignore")
        type: str
        text: str | None = None

    class ChatMessage(BaseModel):
        model_config = ConfigDict(strict=True, extra="ignore")
        role: str
        content: str | list[ContentPart] | None = None
        tool_calls: list[Any] | None = None  # checked by chat.check_messages
        tool_call_id: str | None = None

    class ChatRequest(_sampling_request()):
        messages: list[ChatMessage] = Field(min_length=1)
        max_tokens: int | None = Field(default=None, ge=1)
        max_completion_tokens: int | None = Field(default=None, ge=1)
        logprobs: bool | None = None
        top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
        tools: list[Any] | None = None  # checked by tools.check_tool_definitions
        tool_choice: str | dict[str, Any] | None = None
        functions: Any = None  # OpenAI's legacy form of tools: refused (check_legacy_fields)
        function_call: Any = None

    return ChatRequest


def check_legacy_fields(req: Any) -> None:
    """What the server cannot honour is refused, naming the field: OpenAI's legacy
    `functions` / `function_call` (`tools` and `tool_choice` are their current form)."""
    for field in ("functions", "function_call"):
        if getattr(req, field) is not None:
            raise APIError(400, f"{field} is not supported (the legacy form of tools; use tools and "
                                f"tool_choice)", param=field)


def chat_messages(req: Any) -> list[dict[str, Any]]:
    """The request's messages as {role, content} with text content (and their tool_calls or
    tool_call_id): a list of text parts is joined; OpenAI's "developer" role is the system prompt."""
    out = []
    for i, m in enumerate(req.messages):
        content = m.content
        if isinstance(content, list):
            if any(p.type != "text" or p.text is None for p in content):
                raise APIError(400, f"messages[{i}]: only text content parts are supported", param="messages")
            content = "".join(p.text for p in content)
        message = {"role": "system" if m.role == "developer" else m.role, "content": content}
        if m.tool_calls is not None:
            message["tool_calls"] = m.tool_calls
        if m.tool_call_id is not None:
            message["tool_call_id"] = m.tool_call_id
        out.append(message)
    return out


def chat_max_tokens(req: Any, settings: ServeSettings, block_size: int) -> int:
    """max_completion_tokens (or the older max_tokens); unset: a reply as long as the context."""
    max_tokens = req.max_completion_tokens or req.max_tokens or min(settings.max_tokens_cap, block_size)
    param = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
    if max_tokens > settings.max_tokens_cap:
        raise APIError(400, f"{param}: at most {settings.max_tokens_cap} on this server, got {max_tokens}",
                       param=param)
    return max_tokens


def check_chat(req: Any, settings: ServeSettings, model_id: str, tokenizer: Tokenizer,
               block_size: int) -> ChatInput:
    """Check a parsed chat request against the model (it needs a chat template) and the
    limits; render the conversation into prompt ids with `chat.render`."""
    check_model(req.model, model_id)
    check_legacy_fields(req)
    if not has_chat_template(tokenizer):
        raise APIError(400, f"model {model_id!r} has no chat template (its tokenizer lacks the chat "
                            f"tokens); fine-tune it with quill sft, or use /v1/completions",
                       param="messages", code="no_chat_template")
    logprobs = chat_logprobs(req, tokenizer)
    use = chat_tools(req, settings, tokenizer, model_id)
    n = req.n or 1
    if n > settings.max_batch:
        raise APIError(400, f"n is {n}, at most {settings.max_batch} on this server", param="n")
    max_tokens = chat_max_tokens(req, settings, block_size)
    sampling = checked_sampling(req, max_tokens, settings)
    try:
        messages = check_messages(chat_messages(req))
        ids = prompt_ids(tokenizer, messages, block_size, tools=use.definitions() or None if use else None)
    except (ConversationError, QuillError) as e:
        raise APIError(400, f"messages: {e}", param="messages") from None
    seed = req.seed if req.seed is not None else int.from_bytes(os.urandom(7), "little")
    return ChatInput(ids, n, sampling, seed, frozenset(end_ids(tokenizer, tools=use is not None)), logprobs, use)


def chat_tools(req: Any, settings: ServeSettings, tokenizer: Tokenizer, model_id: str) -> ToolUse | None:
    """The tools of a chat request: the server's built-ins (run here) and the request's own
    (`tools`, run by the client), listed in the prompt; `tool_choice` "auto" (the default) or
    "none" (no calls: the reply ends where one would start). None: no tools at all."""
    choice = req.tool_choice
    if choice not in (None, "auto", "none"):
        raise APIError(400, f"tool_choice: only \"auto\" and \"none\" are supported, got {shown(choice)}",
                       param="tool_choice")
    try:
        client = check_tool_definitions(req.tools) if req.tools else []
        use = ToolUse.of(list(settings.tools), client=client)
    except ToolError as e:
        raise APIError(400, str(e), param="tools") from None
    if use is None:
        return None
    if not has_tool_template(tokenizer):
        raise APIError(400, f"model {model_id!r} has not learnt tools (its tokenizer lacks the tool tokens); "
                            f"fine-tune it on conversations with tool_calls (docs/tools.md)", param="tools",
                       code="no_tool_template")
    use.calls = choice != "none"
    return use


def chat_logprobs(req: Any, tokenizer: Tokenizer) -> int | None:
    """Alternatives per token the request asks for (None: no logprobs). As OpenAI: top_logprobs
    needs logprobs true; it is also at most the model's vocabulary."""
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError(400, "top_logprobs: needs logprobs: true", param="top_logprobs")
    if not req.logprobs:
        return None
    top = req.top_logprobs or 0
    if top > tokenizer.vocab_size:
        raise APIError(400, f"top_logprobs: at most {tokenizer.vocab_size}, the size of this model's "
                            f"vocabulary, got {top}", param="top_logprobs")
    return top


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
