"""Conversations: the chat template, and replies from a model that has learnt it.

A conversation is a list of messages in OpenAI's shape, `{"role": ..., "content": "..."}`: an
optional system message first, then user and assistant turns taking turns, the user first. An
assistant message may instead (or as well) carry `tool_calls` (`id`, `type: "function"`,
`function.name`, `function.arguments` as JSON text); the `role: "tool"` messages that follow
answer them, each naming its call's `tool_call_id`, and the assistant speaks next. A
conversation may come with `tools` (OpenAI's definitions; quillgpt.tools). `render` turns it
into token ids and a loss mask; it is the one place that knows the template, and it feeds
training (`quill sft`), `quill chat`, the server and the exported Hugging Face `chat_template`
(`jinja_template`, which gives the same ids).

The template uses four special tokens (Phi-3's names): a start token per role and one end of
turn.

    <|system|>You reverse words.<|end|><|user|>reverse: quill<|end|><|assistant|>lliuq<|end|>

A model that learns tools has four more (`add_chat_tokens(tok, tools=True)`): the tool list
first, each definition as one line of JSON; each call as `<|tool_call|>NAME ARGUMENTS`; an
assistant message of calls ends with `<|end_calls|>` (where the tools run) instead of `<|end|>`;
each result as a `<|tool|>` turn.

    <|tools|>{"type": "function", "function": {"name": "calculator", ...}}<|end|>
    <|user|>What is 4821 times 37?<|end|>
    <|assistant|><|tool_call|>calculator {"expression": "4821*37"}<|end_calls|>
    <|tool|>178377<|end|><|assistant|>178377<|end|>

A reply is asked for by ending the ids with `<|assistant|>` (`add_generation_prompt`), and it
ends when the model writes `<|end|>` (or `<|end_calls|>`). The loss is on what the assistant
writes: the content of each assistant turn, its calls and the token that ends it; system, user
and tool turns, the tool list and the role tokens are context. The special tokens are special
tokens of the run's tokenizer: message text is encoded with `encode_ordinary`, so a user who
types "<|end|>" gets ordinary tokens. A tokenizer without them gets them appended
(`add_chat_tokens`); the model's embedding grows to match (`quill sft`).

    ids, mask = render(tokenizer, messages)              # training
    prompt = render(tokenizer, messages[:2], add_generation_prompt=True).ids
    replies(model, tokenizer, [messages[:2]], temperature=0)   # ["lliuq"]

Replies with tools (`ReplyStream`, `tool_replies`, `ChatSession(tools=...)`): each row of a
batch has its own `ToolRunner`, the decode engine's tool hook, asked when the model writes
`<|end_calls|>`. A call of a built-in tool the caller enabled (`tools="calculator,python"`)
runs here; its result is forced into the row as the template renders a tool message, and the
reply goes on (at most `ToolUse.max_rounds` rounds; later calls get an error result). A call
of a client's tool (the conversation's own `tools`) ends the row with finish "tool_calls" and
the parsed call. A malformed call is an error result for built-ins, and text with finish
"stop" for a client. `ReplyReader` turns a row's events into content, calls and results.

    tool_replies(model, tokenizer, [[{"role": "user", "content": "4821*37?"}]], tools="calculator")
    # [Reply(content="178377", finish="stop", tool_calls=[], messages=[call, result, answer])]
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch.nn as nn

from .engine import Event, Request, decode
from .errors import QuillError, shown
from .generate import Sampling, check_sampling_args, row_seeds
from .tokenizers import Tokenizer
from .tools import (
    NAME,
    BuiltinTool,
    ToolError,
    builtin_tools,
    check_tool_definitions,
    parse_arguments,
    run_builtin,
    tool_names,
)

ROLES = ("system", "user", "assistant", "tool")
ROLE_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
END_TOKEN = "<|end|>"
CHAT_TOKENS = (*ROLE_TOKENS.values(), END_TOKEN)
TOOLS_TOKEN = "<|tools|>"  # the tool list: one JSON definition a line
TOOL_TOKEN = "<|tool|>"  # a tool's result (role "tool")
CALL_TOKEN = "<|tool_call|>"  # starts one call: NAME ARGUMENTS
CALLS_END_TOKEN = "<|end_calls|>"  # ends an assistant message of calls: the tools run here
TOOL_TOKENS = (TOOLS_TOKEN, TOOL_TOKEN, CALL_TOKEN, CALLS_END_TOKEN)


class ConversationError(QuillError):
    """A conversation that breaks the template's rules (role order, content type, ...)."""


@dataclass
class ToolCall:
    """One call of an assistant message: its id, the function's name, its arguments (JSON text)."""

    id: str
    name: str
    arguments: str

    def text(self) -> str:
        """How the template writes it after <|tool_call|>."""
        return f"{self.name} {self.arguments}"

    def openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class Message:
    role: str
    content: str | None  # None: an assistant message of tool calls alone
    tool_calls: list[ToolCall] | None = None  # assistant
    tool_call_id: str | None = None  # tool: the call it answers

    def openai(self) -> dict[str, Any]:
        out: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.tool_calls:
            out["tool_calls"] = [c.openai() for c in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out


class Conversation(list):
    """A list of `Message`s with the tool definitions that come with it (`tools`, or None)."""

    def __init__(self, messages: Sequence[Message] = (), tools: list[dict[str, Any]] | None = None):
        super().__init__(messages)
        self.tools = tools


@dataclass
class Rendered:
    """A conversation as token ids; `mask[i]` is true where ids[i] is a training target."""

    ids: list[int]
    mask: list[bool]


# --- messages -------------------------------------------------------------------------------

def _tool_call(obj: Any, where: str) -> ToolCall:
    """One entry of an assistant message's tool_calls, checked."""
    if isinstance(obj, ToolCall):
        return obj
    if not isinstance(obj, Mapping):
        raise ConversationError(f"{where} must be an object with id, type and function")
    call_id, fn = obj.get("id"), obj.get("function")
    if not isinstance(call_id, str) or not call_id:
        raise ConversationError(f"{where}: missing id (a non-empty string)")
    if obj.get("type", "function") != "function":
        raise ConversationError(f"{where}: type must be \"function\", got {shown(obj.get('type'))}")
    if not isinstance(fn, Mapping):
        raise ConversationError(f"{where}: missing function (an object with name and arguments)")
    name, arguments = fn.get("name"), fn.get("arguments")
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise ConversationError(f"{where}.function.name must be 1-64 letters, digits, _ or -, got {shown(name)}")
    try:
        parsed = parse_arguments(arguments, f"{where}.function.arguments")
    except ToolError as e:
        raise ConversationError(str(e)) from None
    text = arguments if isinstance(arguments, str) else json.dumps(parsed, ensure_ascii=False)
    return ToolCall(call_id, name, text)


def _message(m: Any, i: int) -> Message:
    """One message as a `Message`, its fields checked (the order is checked by check_messages)."""
    if isinstance(m, Message):
        m = m.openai() | ({"tool_calls": m.tool_calls} if m.tool_calls else {})
    if not isinstance(m, Mapping):
        raise ConversationError(f"message {i} is not an object with role and content")
    role, content, calls = m.get("role"), m.get("content"), m.get("tool_calls")
    if role not in ROLES:
        raise ConversationError(f"message {i}: unknown role {shown(role)} (system, user, assistant or tool)")
    if calls is not None and role != "assistant":
        raise ConversationError(f"message {i} ({role}): only assistant messages carry tool_calls")
    if calls is not None and (not isinstance(calls, list) or not calls):
        raise ConversationError(f"message {i}: tool_calls must be a non-empty list")
    tool_calls = [_tool_call(c, f"message {i}: tool_calls[{j}]") for j, c in enumerate(calls or [])] or None
    if tool_calls and len({c.id for c in tool_calls}) != len(tool_calls):
        raise ConversationError(f"message {i}: two tool calls share an id")
    if not isinstance(content, str) and not (content is None and tool_calls):
        raise ConversationError(f"message {i} ({role}): content must be a string, "
                                f"got {type(content).__name__}")
    call_id = m.get("tool_call_id")
    if role == "tool" and (not isinstance(call_id, str) or not call_id):
        raise ConversationError(f"message {i} (tool): missing tool_call_id (the id of the call it answers)")
    return Message(role, content, tool_calls, call_id if role == "tool" else None)


def _check_order(out: list[Message], for_training: bool) -> None:
    """System first if at all; user and assistant in turn; the tool messages after an assistant
    message of calls answer each of its calls once, and the assistant speaks next."""
    first = 1 if out[0].role == "system" else 0
    expected, pending, caller = "user", {}, 0
    for i, m in enumerate(out[first:], start=first):
        if m.role == "tool":
            if m.tool_call_id not in pending:
                answered = f" of message {caller}" if pending else ""
                raise ConversationError(f"message {i}: a tool message answering no call{answered} "
                                        f"(tool_call_id {shown(m.tool_call_id)})")
            del pending[m.tool_call_id]
            continue
        if pending:
            raise ConversationError(f"message {i}: {m.role} before every call of message {caller} is answered "
                                    f"(no tool message for {', '.join(map(repr, pending))})")
        if m.role != expected:
            where = "only as the first message" if m.role == "system" else f"a {expected} message"
            raise ConversationError(f"message {i}: roles out of order: {m.role} where the template "
                                    f"expects {where} (system first, then user and assistant in turn)")
        if m.role == "assistant" and m.tool_calls:
            pending, caller, expected = {c.id: c for c in m.tool_calls}, i, "assistant"
        else:
            expected = "assistant" if m.role == "user" else "user"
    if pending and (out[-1].role == "tool" or not for_training):
        raise ConversationError(f"the calls of message {caller} are not all answered "
                                f"(no tool message for {', '.join(map(repr, pending))})")


def check_messages(messages: Any, for_training: bool = False, tools: Any = None) -> Conversation:
    """The messages as a `Conversation` of `Message`s (with `tools`, checked), or
    ConversationError naming the first problem.

    An optional system message first, then user and assistant in turn, the user first; tool
    messages answer the calls of the assistant message before them. For training at least one
    assistant turn; for a prompt (`for_training=False`) the last message is the user's or a tool's,
    since the reply comes next."""
    if not isinstance(messages, list) or not messages:
        raise ConversationError("messages must be a non-empty list")
    out = [_message(m, i) for i, m in enumerate(messages)]
    if len(out) == (1 if out[0].role == "system" else 0):
        raise ConversationError("a system message alone: the conversation needs a user message")
    _check_order(out, for_training)
    if for_training and not any(m.role == "assistant" for m in out):
        raise ConversationError("no assistant turn: nothing to learn from")
    if not for_training and out[-1].role not in ("user", "tool"):
        raise ConversationError("the last message must be the user's (or a tool's): the reply comes next")
    if tools is not None:
        try:
            tools = check_tool_definitions(tools)
        except ToolError as e:
            raise ConversationError(str(e)) from None
    return Conversation(out, tools)


# --- the template ---------------------------------------------------------------------------

def has_chat_template(tokenizer: Tokenizer) -> bool:
    """Whether the tokenizer has the template's special tokens (a model trained by quill sft)."""
    return all(t in tokenizer.special_tokens for t in CHAT_TOKENS)


def has_tool_template(tokenizer: Tokenizer) -> bool:
    """Whether the tokenizer has the tool tokens too (a model fine-tuned on tool conversations)."""
    return has_chat_template(tokenizer) and all(t in tokenizer.special_tokens for t in TOOL_TOKENS)


def add_chat_tokens(tokenizer: Tokenizer, tools: bool = False) -> Tokenizer:
    """The tokenizer with the template's special tokens (appended where it lacks them); with
    `tools`, the tool tokens too."""
    return tokenizer.with_special_tokens(CHAT_TOKENS + (TOOL_TOKENS if tools else ()))


def chat_token_ids(tokenizer: Tokenizer, tools: bool = False) -> dict[str, int]:
    """The ids of the template's special tokens (and the tool tokens, with `tools`), or
    QuillError for a model without them."""
    specials = tokenizer.special_tokens
    missing = [t for t in CHAT_TOKENS if t not in specials]
    if missing:
        raise QuillError(f"this model has no chat template (its tokenizer lacks {', '.join(missing)}); "
                         f"fine-tune it on conversations with quill sft first")
    if tools and not all(t in specials for t in TOOL_TOKENS):
        raise QuillError("this model has not learnt tools (its tokenizer lacks the tool tokens); fine-tune it "
                         "on conversations with tool_calls with quill sft first (docs/tools.md)")
    return {t: specials[t] for t in CHAT_TOKENS + (TOOL_TOKENS if tools else ())}


def end_ids(tokenizer: Tokenizer, tools: bool = False) -> set[int]:
    """Tokens that end a reply: <|end|>, and any role token or <|endoftext|> should the model
    write one. <|tool_call|> is never one; <|end_calls|> is one unless `tools` (then the
    calls it closes are run or handed to the client)."""
    specials = tokenizer.special_tokens
    ids = set(chat_token_ids(tokenizer).values())
    ids |= {specials[t] for t in (TOOLS_TOKEN, TOOL_TOKEN, CALLS_END_TOKEN) if t in specials}
    if tools:
        ids.discard(specials.get(CALLS_END_TOKEN, -1))
    if tokenizer.eot_id is not None:
        ids.add(tokenizer.eot_id)
    return ids


def tools_text(tools: Sequence[Mapping[str, Any]]) -> str:
    """The tool list as the template writes it: one definition a line, as JSON (the text of
    Jinja's `tojson` in transformers: non-ASCII kept, ", " and ": " separators)."""
    return "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)


def uses_tools(messages: Sequence[Any], tools: Any = None) -> bool:
    """Whether a conversation needs the tool tokens: a tool list, a call or a tool message."""
    tools = tools if tools is not None else getattr(messages, "tools", None)
    return bool(tools) or any(
        (m.role == "tool" or m.tool_calls) if isinstance(m, Message)
        else (m.get("role") == "tool" or m.get("tool_calls")) for m in messages)


def render(tokenizer: Tokenizer, messages: Sequence[Message | Mapping[str, Any]],
           add_generation_prompt: bool = False, tools: Sequence[Mapping[str, Any]] | None = None) -> Rendered:
    """Token ids and loss mask of a conversation (module docstring). `tools` (default: the
    conversation's own, for a `Conversation`) are listed first. With `add_generation_prompt`
    the ids end with <|assistant|>, where the reply starts."""
    tools = tools if tools is not None else getattr(messages, "tools", None)
    special = chat_token_ids(tokenizer, tools=uses_tools(messages, tools))
    ids: list[int] = []
    mask: list[bool] = []

    def add(tokens: list[int], learnt: bool) -> None:
        ids.extend(tokens)
        mask.extend([learnt] * len(tokens))

    if tools:
        add([special[TOOLS_TOKEN], *tokenizer.encode_ordinary(tools_text(tools)), special[END_TOKEN]], False)
    for i, m in enumerate(messages):
        m = m if isinstance(m, Message) else _message(m, i)
        learnt = m.role == "assistant"
        add([special[TOOL_TOKEN if m.role == "tool" else ROLE_TOKENS[m.role]]], False)
        add(tokenizer.encode_ordinary(m.content or ""), learnt)
        for call in m.tool_calls or []:
            add([special[CALL_TOKEN], *tokenizer.encode_ordinary(call.text())], True)
        add([special[CALLS_END_TOKEN if m.tool_calls else END_TOKEN]], learnt)
    if add_generation_prompt:
        add([special[ROLE_TOKENS["assistant"]]], False)
    return Rendered(ids, mask)


def jinja_template(tools: bool = False) -> str:
    """The template for Hugging Face tokenizers (`tokenizer_config.json`'s `chat_template`):
    `apply_chat_template(messages, add_generation_prompt=True)` gives `render`'s ids. It
    checks the roles as `check_messages` does. With `tools`, the template of a model that has
    learnt tools: `apply_chat_template(messages, tools=tools)` lists them, and tool_calls and
    tool messages render as `render` renders them."""
    if tools:
        return _jinja_tools_template()
    r = ROLE_TOKENS
    return (
        "{%- for message in messages -%}"
        "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
        "{{- raise_exception('unknown role: ' + message['role']) -}}"
        "{%- endif -%}"
        "{%- set offset = 1 if messages[0]['role'] == 'system' else 0 -%}"
        "{%- if message['role'] == 'system' and loop.index0 != 0 -%}"
        "{{- raise_exception('a system message may only come first') -}}"
        "{%- endif -%}"
        "{%- if message['role'] != 'system' and (message['role'] == 'user') != "
        "((loop.index0 - offset) % 2 == 0) -%}"
        "{{- raise_exception('roles must alternate: user, assistant, user, ...') -}}"
        "{%- endif -%}"
        f"{{{{- '{r['system']}' if message['role'] == 'system' else "
        f"('{r['user']}' if message['role'] == 'user' else '{r['assistant']}') -}}}}"
        f"{{{{- message['content'] -}}}}{{{{- '{END_TOKEN}' -}}}}"
        "{%- endfor -%}"
        f"{{%- if add_generation_prompt -%}}{{{{- '{r['assistant']}' -}}}}{{%- endif -%}}"
    )


def _jinja_tools_template() -> str:
    """`jinja_template(tools=True)`: the role order as a small state machine (`ns.expect`, the
    role the next user/assistant message must have; `ns.pending`, calls not yet answered)."""
    r, end = ROLE_TOKENS, END_TOKEN
    return (
        "{%- set ns = namespace(expect='user', pending=0) -%}"
        f"{{%- if tools -%}}{{{{- '{TOOLS_TOKEN}' -}}}}"
        "{%- for tool in tools -%}{{- tool | tojson -}}{%- if not loop.last -%}{{- '\n' -}}{%- endif -%}"
        f"{{%- endfor -%}}{{{{- '{end}' -}}}}{{%- endif -%}}"
        "{%- for message in messages -%}"
        "{%- set role = message['role'] -%}"
        "{%- if role not in ['system', 'user', 'assistant', 'tool'] -%}"
        "{{- raise_exception('unknown role: ' + role) -}}"
        "{%- elif role == 'system' -%}"
        "{%- if not loop.first -%}{{- raise_exception('a system message may only come first') -}}{%- endif -%}"
        f"{{{{- '{r['system']}' + message['content'] + '{end}' -}}}}"
        "{%- elif role == 'tool' -%}"
        "{%- if ns.pending == 0 -%}{{- raise_exception('a tool message answering no call') -}}{%- endif -%}"
        "{%- set ns.pending = ns.pending - 1 -%}"
        f"{{{{- '{TOOL_TOKEN}' + message['content'] + '{end}' -}}}}"
        "{%- else -%}"
        "{%- if ns.pending > 0 or role != ns.expect -%}"
        "{{- raise_exception('roles must alternate: user, assistant (tool messages answering its calls), "
        "user, ...') -}}"
        "{%- endif -%}"
        "{%- if role == 'user' -%}"
        f"{{%- set ns.expect = 'assistant' -%}}{{{{- '{r['user']}' + message['content'] + '{end}' -}}}}"
        "{%- else -%}"
        f"{{{{- '{r['assistant']}' -}}}}{{%- if message['content'] -%}}{{{{- message['content'] -}}}}{{%- endif -%}}"
        "{%- if message['tool_calls'] -%}"
        "{%- for call in message['tool_calls'] -%}"
        f"{{{{- '{CALL_TOKEN}' + call['function']['name'] + ' ' -}}}}"
        "{%- if call['function']['arguments'] is string -%}{{- call['function']['arguments'] -}}"
        "{%- else -%}{{- call['function']['arguments'] | tojson -}}{%- endif -%}"
        "{%- endfor -%}"
        f"{{%- set ns.pending = message['tool_calls'] | length -%}}{{{{- '{CALLS_END_TOKEN}' -}}}}"
        "{%- else -%}"
        f"{{%- set ns.expect = 'user' -%}}{{{{- '{end}' -}}}}"
        "{%- endif -%}"
        "{%- endif -%}"
        "{%- endif -%}"
        "{%- endfor -%}"
        f"{{%- if add_generation_prompt -%}}{{{{- '{r['assistant']}' -}}}}{{%- endif -%}}"
    )


# --- tools in replies -----------------------------------------------------------------------

MAX_TOOL_ROUNDS = 4  # rounds of built-in calls per reply; calls after them get an error result


@dataclass
class ToolUse:
    """What a reply may do with tools. `builtins` run here (quillgpt.tools): their results are
    forced into the reply and it goes on. `client`: definitions of tools the caller runs; a reply
    whose calls name one ends there, finish "tool_calls". Both are listed in the prompt.
    `max_rounds`: rounds of built-in calls per reply (later calls get an error result, so a
    reply that keeps calling ends at its max_new_tokens). `calls`: False (tool_choice "none")
    ends a reply where a call would start."""

    builtins: Mapping[str, BuiltinTool] = field(default_factory=dict)
    client: list[dict[str, Any]] = field(default_factory=list)
    max_rounds: int = MAX_TOOL_ROUNDS
    calls: bool = True

    @classmethod
    def of(cls, tools: Any, client: Sequence[Mapping[str, Any]] | None = None) -> ToolUse | None:
        """`tools` (None, built-in names as "calculator,python" or a list, or a ToolUse) with the
        conversation's own definitions `client`; None when there are neither."""
        if isinstance(tools, ToolUse):
            use = tools
        else:
            use = cls(builtin_tools(tools))
        if client:
            clash = [n for n in tool_names(client) if n in use.builtins]
            if clash:
                raise ToolError(f"tools: {clash[0]!r} is a built-in tool here; give client tools other names")
            use = ToolUse(use.builtins, [*use.client, *client], use.max_rounds, use.calls)
        return use if use.builtins or use.client else None

    def definitions(self) -> list[dict[str, Any]]:
        return [t.definition() for t in self.builtins.values()] + list(self.client)


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


def parse_call(text: str) -> ToolCall | str:
    """A call as the model wrote it after <|tool_call|> ("NAME ARGUMENTS", the arguments a
    JSON object) as a ToolCall with a new id, or what is wrong with it."""
    name, _, arguments = text.strip().partition(" ")
    if not NAME.fullmatch(name):
        return f"a tool call must start with the tool's name, got {shown(text)}"
    try:
        parse_arguments(arguments.strip(), f"the arguments of the {name} call")
    except ToolError as e:
        return str(e)
    return ToolCall(new_call_id(), name, arguments.strip())


def _encode_result(tokenizer: Tokenizer, text: str) -> list[int]:
    """A tool's result as ordinary tokens; characters outside the vocabulary (a character-level
    tokenizer) become "?" (or go)."""
    try:
        return tokenizer.encode_ordinary(text)
    except QuillError:
        out: list[int] = []
        for c in text:
            for attempt in (c, "?"):
                try:
                    out += tokenizer.encode_ordinary(attempt)
                    break
                except QuillError:
                    continue
        return out


def tool_result_ids(tokenizer: Tokenizer, results: Sequence[str]) -> list[int]:
    """What follows an assistant message of calls: each result as the template renders a tool
    message (`<|tool|>RESULT<|end|>`), then `<|assistant|>`, where the reply goes on."""
    special = chat_token_ids(tokenizer, tools=True)
    ids: list[int] = []
    for r in results:
        ids += [special[TOOL_TOKEN], *_encode_result(tokenizer, r), special[END_TOKEN]]
    return ids + [special[ROLE_TOKENS["assistant"]]]


def _split_calls(ids: Sequence[int], call_id: int) -> tuple[list[int], list[list[int]]]:
    """An assistant message's ids (without its <|end_calls|>): its content, and each call's."""
    if call_id not in ids:
        return list(ids), []
    first = list(ids).index(call_id)
    calls: list[list[int]] = []
    for t in ids[first:]:
        if t == call_id:
            calls.append([])
        else:
            calls[-1].append(t)
    return list(ids[:first]), calls


class ToolRunner:
    """One row's tool hook (`engine.Request.tool_hook`, asked after `<|end_calls|>`): the calls of
    the assistant message just closed either go to the caller (a client tool among them, or no
    built-ins at all: None, the row ends with finish "tool_calls"), or run here, each call's
    result (an "error: ..." for a malformed call or an unknown tool) forced in as the template
    renders tool messages, and the reply goes on."""

    def __init__(self, tokenizer: Tokenizer, use: ToolUse):
        self.tokenizer, self.use = tokenizer, use
        self.special = chat_token_ids(tokenizer, tools=True)
        self.rounds = 0

    @property
    def tool_ids(self) -> set[int]:
        return {self.special[CALLS_END_TOKEN]}

    def __call__(self, ids: list[int]) -> list[int] | None:
        start = max((i + 1 for i, t in enumerate(ids) if t == self.special[ROLE_TOKENS["assistant"]]), default=0)
        _, segments = _split_calls(ids[start:-1], self.special[CALL_TOKEN])
        texts = [self.tokenizer.decode(s) for s in segments]
        names = [t.strip().partition(" ")[0] for t in texts]
        client = set(tool_names(self.use.client))
        if not self.use.builtins or any(n in client for n in names):
            return None
        self.rounds += 1
        if self.rounds > self.use.max_rounds:
            results = [f"error: no more tool calls in this reply (at most {self.use.max_rounds} rounds)"] * len(texts)
        else:
            results = [self._run(t) for t in texts]
        return tool_result_ids(self.tokenizer, results or ["error: <|end_calls|> without a call"])

    def _run(self, text: str) -> str:
        call = parse_call(text)
        if isinstance(call, str):
            return f"error: {call}"
        return run_builtin(self.use.builtins, call.name, call.arguments).content


@dataclass
class ReplyPart:
    """A piece of a reply as it streams: "content" (text the assistant writes), "call" (a tool
    call: `call` is None for a malformed one, `text` is what the model wrote) or "result" (a
    built-in tool's result, forced in)."""

    kind: str
    text: str
    call: ToolCall | None = None


@dataclass
class Reply:
    """A whole reply: its content (all rounds'), its finish reason, the calls it ends with
    (finish "tool_calls": the caller runs them), and every message it adds to the conversation
    (assistant messages of calls and the tool messages answering them, then the last one)."""

    content: str
    finish: str | None
    tool_calls: list[ToolCall]
    messages: list[Message]


class ReplyReader:
    """One row's decode events as `ReplyPart`s, and the `Reply` they make.

    Call text is held back until `<|end_calls|>` closes the message; a call that does not parse
    is a "call" part with call None. A row that ends on calls (finish "tool_calls") with a
    malformed one among them (or one naming a tool `use` does not define), or that stops inside
    a call, gives the calls' text as content and finish "stop": the caller gets text, never a
    broken call."""

    def __init__(self, tokenizer: Tokenizer, use: ToolUse | None = None):
        self.tokenizer = tokenizer
        # the tools a call handed to the caller may name (None: any)
        self.names = None if use is None else set(use.builtins) | set(tool_names(use.client))
        s = tokenizer.special_tokens
        self.call_id, self.calls_end = s.get(CALL_TOKEN, -1), s.get(CALLS_END_TOKEN, -1)
        self.tool_id, self.end_id = s.get(TOOL_TOKEN, -1), s.get(END_TOKEN, -1)
        self.open: list[list[int]] | None = None  # the ids of the calls being written
        self.result: list[int] | None = None  # the ids of a result being forced in
        self.content = ""  # of the whole reply
        self.message = ""  # of the assistant message being written
        self.pending: list[ToolCall] = []  # calls waiting for their results
        self.calls: list[ReplyPart] = []  # the last message's calls
        self.messages: list[Message] = []
        self.finish: str | None = None

    def feed(self, event: Event) -> list[ReplyPart]:
        t, out = event.token, []
        if event.forced:
            out = self._forced(t)
        elif t == self.call_id:
            out = self._content(event.text)
            self.open = (self.open or []) + [[]]
        elif t == self.calls_end:
            out = self._close_calls()
        elif self.open is not None:
            if t is not None:
                self.open[-1].append(t)
        else:
            out = self._content(event.text)
        if event.finish is not None:
            out += self._finish(event.finish)
        return out

    def _content(self, text: str) -> list[ReplyPart]:
        self.content += text
        self.message += text
        return [ReplyPart("content", text)] if text else []

    def _close_calls(self) -> list[ReplyPart]:
        texts = [self.tokenizer.decode(ids) for ids in self.open or [[]]]
        self.open = None
        self.calls = []
        for text in texts:
            call = parse_call(text)
            self.calls.append(ReplyPart("call", text, None if isinstance(call, str) else call))
        self.pending = [p.call or _unparsed(p.text) for p in self.calls]
        self.messages.append(Message("assistant", self.message or None, list(self.pending)))
        self.message = ""
        return list(self.calls)

    def _forced(self, token: int | None) -> list[ReplyPart]:
        if token == self.tool_id:
            self.result = []
        elif token == self.end_id and self.result is not None:
            text, self.result = self.tokenizer.decode(self.result), None
            call = self.pending.pop(0) if self.pending else None
            self.messages.append(Message("tool", text, tool_call_id=call.id if call else new_call_id()))
            return [ReplyPart("result", text, call)]
        elif self.result is not None and token is not None:
            self.result.append(token)
        return []

    def _finish(self, reason: str) -> list[ReplyPart]:
        out: list[ReplyPart] = []
        if self.open is not None:  # stopped inside a call: what it wrote is text
            out = self._content("\n".join(self.tokenizer.decode(ids) for ids in self.open))
            self.open = None
        unanswered = bool(self.pending) and bool(self.messages) and bool(self.messages[-1].tool_calls)
        if unanswered and reason == "tool_calls" and all(p.call is not None and (
                self.names is None or p.call.name in self.names) for p in self.calls):
            self.finish = reason  # the calls go to the caller: the reply's last message
            return out
        if unanswered:  # calls nobody runs (a malformed one, or no tools): their text is the reply's
            self.message = self.messages.pop().content or ""
            out += self._content("\n".join(p.text for p in self.calls))
            self.calls, self.pending = [], []
            reason = "stop" if reason == "tool_calls" else reason
        self.finish = reason
        self.messages.append(Message("assistant", self.message))
        return out

    def reply(self) -> Reply:
        calls = [p.call for p in self.calls if p.call] if self.finish == "tool_calls" else []
        return Reply(self.content, self.finish, calls, list(self.messages))


def _unparsed(text: str) -> ToolCall:
    """A malformed call as a conversation can keep it: its name (or "invalid"), its text as
    {"unparsed": TEXT}."""
    name = text.strip().partition(" ")[0]
    return ToolCall(new_call_id(), name if NAME.fullmatch(name) else "invalid",
                    json.dumps({"unparsed": text}, ensure_ascii=False))


# --- replies --------------------------------------------------------------------------------

def prompt_ids(tokenizer: Tokenizer, messages: Sequence[Message], block_size: int,
               tools: Sequence[Mapping[str, Any]] | None = None) -> list[int]:
    """The ids that ask for the next reply, or QuillError when they exceed the context."""
    ids = render(tokenizer, messages, add_generation_prompt=True, tools=tools).ids
    if len(ids) > block_size:
        raise QuillError(f"the conversation is {len(ids)} tokens long, longer than the model's "
                         f"context of {block_size}")
    return ids


def tool_options(tokenizer: Tokenizer, use: ToolUse) -> dict[str, Any]:
    """A row's `engine.Request` options for `use`: its end ids and a `ToolRunner` of its own
    (each row needs its own: it counts the row's rounds). With `use.calls` False (tool_choice
    "none") there is no runner and the row ends where a call would start."""
    ends = end_ids(tokenizer, tools=True)
    if not use.calls:
        specials = tokenizer.special_tokens
        return {"end_ids": ends | {specials[CALL_TOKEN], specials[CALLS_END_TOKEN]}}
    runner = ToolRunner(tokenizer, use)
    return {"end_ids": ends, "tool_hook": runner, "tool_ids": runner.tool_ids}


def reply_request(tokenizer: Tokenizer, messages: Sequence[Message], sampling: Sampling, block_size: int,
                  use: ToolUse | None = None) -> Request:
    """The decode request for the next reply to `messages` (checked): with `use`, its tools are
    listed in the prompt and the row runs or hands over its calls (`tool_options`)."""
    if use is None:
        return Request(prompt_ids(tokenizer, messages, block_size), sampling, end_ids=end_ids(tokenizer))
    ids = prompt_ids(tokenizer, messages, block_size, tools=use.definitions() or None)
    return Request(ids, sampling, **tool_options(tokenizer, use))


class ReplyStream:
    """The next reply to each conversation (one batch), step by step: iterating gives, each
    step, the new `ReplyPart`s of every conversation's reply; `replies` are the whole replies
    once it is done. Conversation b samples with seed + b. `tools`: built-in names or a
    `ToolUse` (a conversation's own `tools` are the client's)."""

    def __init__(self, model: nn.Module, tokenizer: Tokenizer, conversations: Sequence[Any], tools: Any = None,
                 max_new_tokens: int = 256, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, min_p: float | None = None, repetition_penalty: float = 1.0,
                 stop: list[str] | None = None, seed: int | None = None):
        check_sampling_args(temperature, top_k, top_p, min_p, repetition_penalty, max_new_tokens, stop)
        self.model, self.tokenizer = model, tokenizer
        sampling = Sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                            min_p=min_p, repetition_penalty=repetition_penalty, stop=tuple(stop or ()))
        block_size = model.config.block_size
        self.requests, self.readers = [], []
        for c, s in zip(conversations, row_seeds(seed, len(conversations))):
            own = getattr(c, "tools", None)
            messages = check_messages(list(c), tools=own)
            use = ToolUse.of(tools, client=messages.tools)
            self.requests.append(reply_request(tokenizer, messages, replace(sampling, seed=s),
                                               block_size, use))
            self.readers.append(ReplyReader(tokenizer, use))

    def __iter__(self) -> Iterator[list[list[ReplyPart]]]:
        for events in decode(self.model, self.tokenizer, self.requests):
            parts: list[list[ReplyPart]] = [[] for _ in self.readers]
            for e in events:
                parts[e.row] += self.readers[e.row].feed(e)
            yield parts

    @property
    def replies(self) -> list[Reply]:
        return [r.reply() for r in self.readers]


def stream_replies(model: nn.Module, tokenizer: Tokenizer, conversations: Sequence[Any],
                   tools: Any = None, **sampling: Any) -> Iterator[list[str]]:
    """The assistant's next reply to each conversation (one batch), in pieces as they are
    produced: each step, one text piece per conversation (its content: calls and results are
    `ReplyStream`'s parts). Sampling settings as `ReplyStream`'s."""
    for parts in ReplyStream(model, tokenizer, conversations, tools, **sampling):
        yield ["".join(p.text for p in ps if p.kind == "content") for ps in parts]


def replies(model: nn.Module, tokenizer: Tokenizer, conversations: Sequence[Any], tools: Any = None,
            **sampling: Any) -> list[str]:
    """The assistant's next reply to each conversation (see `stream_replies`)."""
    out = [""] * len(conversations)
    for pieces in stream_replies(model, tokenizer, conversations, tools, **sampling):
        out = [o + p for o, p in zip(out, pieces)]
    return out


def tool_replies(model: nn.Module, tokenizer: Tokenizer, conversations: Sequence[Any], tools: Any = None,
                 **sampling: Any) -> list[Reply]:
    """The next reply to each conversation as a `Reply`: content, finish reason, the calls it
    ends with (client tools) and the messages it adds (built-in rounds included)."""
    stream = ReplyStream(model, tokenizer, conversations, tools, **sampling)
    for _ in stream:
        pass
    return stream.replies


def fit_history(tokenizer: Tokenizer, messages: list[Message], budget: int,
                tools: Sequence[Mapping[str, Any]] | None = None) -> tuple[list[Message], int]:
    """`messages` with the oldest exchanges dropped (a user message and everything up to the
    next one; the system message kept) until the prompt takes at most `budget` tokens; returns
    them and how many messages went."""
    system = messages[:1] if messages and messages[0].role == "system" else []
    turns = messages[len(system):]
    dropped = 0
    while len(render(tokenizer, system + turns, add_generation_prompt=True, tools=tools).ids) > budget:
        nxt = next((i for i, m in enumerate(turns[1:], 1) if m.role == "user"), len(turns))
        if nxt >= len(turns):
            break
        turns = turns[nxt:]
        dropped += nxt
    return system + turns, dropped


@dataclass
class ChatSession:
    """A conversation with a model in the terminal (`quill chat`): history, system prompt,
    streamed replies, built-in tools (`tools`: names or a `ToolUse`). History that no longer
    fits the context loses its oldest turns; it keeps the calls and results of each reply."""

    model: nn.Module
    tokenizer: Tokenizer
    system: str | None = None
    sampling: dict[str, Any] = field(default_factory=dict)
    history: list[Message] = field(default_factory=list)
    dropped: int = 0  # messages dropped from the history by the last `send`
    dropped_messages: list[Message] = field(default_factory=list)  # and which
    turn: int = 0
    tools: Any = None

    def __post_init__(self) -> None:
        self.tools = ToolUse.of(self.tools)
        # a model without the template (or the tool tokens): say so before any input
        chat_token_ids(self.tokenizer, tools=self.tools is not None)

    def reset(self) -> None:
        self.history, self.turn = [], 0

    def messages(self) -> list[Message]:
        return ([Message("system", self.system)] if self.system else []) + self.history

    def send(self, text: str) -> Iterator[str | ReplyPart]:
        """Add the user's message and stream the reply: text pieces, and `ReplyPart`s for tool
        calls and results. The reply joins the history at the end or, when the caller stops the
        stream early (closes it, Ctrl-C), as far as it was given out."""
        block_size = self.model.config.block_size
        max_new = int(self.sampling.get("max_new_tokens", 256))
        budget = max(1, block_size - min(max_new, block_size // 2))  # room left for the reply
        user = Message("user", text)
        self.tokenizer.encode_ordinary(text)  # a character outside the vocabulary fails here
        before = self.messages() + [user]
        tools = self.tools.definitions() if self.tools else None
        fitted, self.dropped = fit_history(self.tokenizer, before, budget, tools)
        first = 1 if self.system else 0
        self.dropped_messages = before[first:first + self.dropped]
        if self.dropped:  # keep what fits, in the history too
            self.history = fitted[first:-1]
        seed = self.sampling.get("seed")
        settings = {**self.sampling, "seed": None if seed is None else seed + self.turn}
        stream = ReplyStream(self.model, self.tokenizer, [fitted], self.tools, **settings)
        reader = stream.readers[0]
        try:
            for parts in stream:
                for part in parts[0]:
                    yield part.text if part.kind == "content" else part
        except (GeneratorExit, KeyboardInterrupt):  # stopped early: keep what was given out
            if reader.finish is None:
                reader.feed(Event(0, None, "", finish="stop"))
            if reader.content or len(reader.messages) > 1:
                self._keep(user, reader.messages)
            raise
        self._keep(user, reader.messages)

    def _keep(self, user: Message, reply: list[Message]) -> None:
        self.history += [user, *reply]
        self.turn += 1


# --- scoring replies --------------------------------------------------------------------------

def last_reply(messages: Sequence[Message]) -> tuple[list[Message], str]:
    """(the messages before the last assistant turn, that turn's content): a prompt and its
    reference answer."""
    for i in range(len(messages) - 1, -1, -1):
        if messages[i].role == "assistant":
            return Conversation(messages[:i], getattr(messages, "tools", None)), messages[i].content or ""
    raise ConversationError("no assistant turn to compare with")


def exact_match(model: nn.Module, tokenizer: Tokenizer, conversations: Sequence[Sequence[Message]],
                batch_size: int = 32, max_new_tokens: int | None = None) -> float:
    """The share of conversations whose last assistant turn the model reproduces exactly,
    greedily, from the messages before it. Replies are cut at the reference's length + 8 tokens
    (or `max_new_tokens`)."""
    hits = 0
    for start in range(0, len(conversations), batch_size):
        pairs = [last_reply(c) for c in conversations[start:start + batch_size]]
        limit = max_new_tokens or max(len(tokenizer.encode_ordinary(ref)) for _, ref in pairs) + 8
        got = replies(model, tokenizer, [p for p, _ in pairs], max_new_tokens=limit, temperature=0.0)
        hits += sum(g == ref for g, (_, ref) in zip(got, pairs))
    return hits / max(1, len(conversations))
