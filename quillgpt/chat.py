"""Conversations: the chat template, and replies from a model that has learnt it.

A conversation is a list of messages in OpenAI's shape, `{"role": ..., "content": "..."}`: an
optional system message first, then user and assistant turns taking turns, the user first.
`render` turns it into token ids and a loss mask; it is the one place that knows the template,
and it feeds training (`quill sft`), `quill chat`, the server and the exported Hugging Face
`chat_template` (`jinja_template`, which gives the same ids).

The template uses four special tokens (Phi-3's names): a start token per role and one end of
turn.

    <|system|>You reverse words.<|end|><|user|>reverse: quill<|end|><|assistant|>lliuq<|end|>

A reply is asked for by ending the ids with `<|assistant|>` (`add_generation_prompt`), and it
ends when the model writes `<|end|>`. The loss is on what the assistant writes: the content of
each assistant turn and its `<|end|>`; system and user turns and the role tokens are context.
The special tokens are special tokens of the run's tokenizer: message text is encoded with
`encode_ordinary`, so a user who types "<|end|>" gets ordinary tokens. A tokenizer without them
gets them appended (`add_chat_tokens`); the model's embedding grows to match (`quill sft`).

    ids, mask = render(tokenizer, messages)              # training
    prompt = render(tokenizer, messages[:2], add_generation_prompt=True).ids
    replies(model, tokenizer, [messages[:2]], temperature=0)   # ["lliuq"]
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch.nn as nn

from .errors import QuillError
from .generate import Sampling, check_sampling_args, stream_texts
from .tokenizers import Tokenizer

ROLES = ("system", "user", "assistant")
ROLE_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
END_TOKEN = "<|end|>"
CHAT_TOKENS = (*ROLE_TOKENS.values(), END_TOKEN)


class ConversationError(QuillError):
    """A conversation that breaks the template's rules (role order, content type, ...)."""


@dataclass
class Message:
    role: str
    content: str


@dataclass
class Rendered:
    """A conversation as token ids; `mask[i]` is true where ids[i] is a training target."""

    ids: list[int]
    mask: list[bool]


# --- messages -------------------------------------------------------------------------------

def check_messages(messages: Any, for_training: bool = False) -> list[Message]:
    """The messages as `Message`s, or ConversationError naming the first problem.

    An optional system message first, then user and assistant in turn, the user first. For
    training at least one assistant turn; for a prompt (`for_training=False`) the last message
    is the user's, since the reply comes next."""
    if not isinstance(messages, list) or not messages:
        raise ConversationError("messages must be a non-empty list")
    out: list[Message] = []
    for i, m in enumerate(messages):
        if isinstance(m, Message):
            m = {"role": m.role, "content": m.content}
        if not isinstance(m, Mapping):
            raise ConversationError(f"message {i} is not an object with role and content")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise ConversationError(f"message {i}: unknown role {role!r} (system, user or assistant)")
        if not isinstance(content, str):
            raise ConversationError(f"message {i} ({role}): content must be a string, "
                                    f"got {type(content).__name__}")
        out.append(Message(role, content))
    first = 1 if out[0].role == "system" else 0
    for i, m in enumerate(out[first:], start=first):
        expected = "user" if (i - first) % 2 == 0 else "assistant"
        if m.role != expected:
            where = "only as the first message" if m.role == "system" else f"a {expected} message"
            raise ConversationError(f"message {i}: roles out of order: {m.role} where the template "
                                    f"expects {where} (system first, then user and assistant in turn)")
    if len(out) == first:
        raise ConversationError("a system message alone: the conversation needs a user message")
    if for_training and not any(m.role == "assistant" for m in out):
        raise ConversationError("no assistant turn: nothing to learn from")
    if not for_training and out[-1].role != "user":
        raise ConversationError("the last message must be the user's: the reply comes next")
    return out


# --- the template ---------------------------------------------------------------------------

def has_chat_template(tokenizer: Tokenizer) -> bool:
    """Whether the tokenizer has the template's special tokens (a model trained by quill sft)."""
    return all(t in tokenizer.special_tokens for t in CHAT_TOKENS)


def add_chat_tokens(tokenizer: Tokenizer) -> Tokenizer:
    """The tokenizer with the template's special tokens (appended where it lacks them)."""
    return tokenizer.with_special_tokens(CHAT_TOKENS)


def chat_token_ids(tokenizer: Tokenizer) -> dict[str, int]:
    """The ids of the template's special tokens, or QuillError for a model without a template."""
    specials = tokenizer.special_tokens
    missing = [t for t in CHAT_TOKENS if t not in specials]
    if missing:
        raise QuillError(f"this model has no chat template (its tokenizer lacks {', '.join(missing)}); "
                         f"fine-tune it on conversations with quill sft first")
    return {t: specials[t] for t in CHAT_TOKENS}


def end_ids(tokenizer: Tokenizer) -> set[int]:
    """Tokens that end a reply: <|end|>, and any role token or <|endoftext|> should the model
    write one."""
    ids = set(chat_token_ids(tokenizer).values())
    if tokenizer.eot_id is not None:
        ids.add(tokenizer.eot_id)
    return ids


def render(tokenizer: Tokenizer, messages: Sequence[Message | Mapping[str, Any]],
           add_generation_prompt: bool = False) -> Rendered:
    """Token ids and loss mask of a conversation (module docstring). With
    `add_generation_prompt` the ids end with <|assistant|>, where the reply starts."""
    special = chat_token_ids(tokenizer)
    ids: list[int] = []
    mask: list[bool] = []

    def add(tokens: list[int], learnt: bool) -> None:
        ids.extend(tokens)
        mask.extend([learnt] * len(tokens))

    for m in messages:
        role, content = (m.role, m.content) if isinstance(m, Message) else (m["role"], m["content"])
        learnt = role == "assistant"
        add([special[ROLE_TOKENS[role]]], False)
        add(tokenizer.encode_ordinary(content), learnt)
        add([special[END_TOKEN]], learnt)
    if add_generation_prompt:
        add([special[ROLE_TOKENS["assistant"]]], False)
    return Rendered(ids, mask)


def jinja_template() -> str:
    """The template for Hugging Face tokenizers (`tokenizer_config.json`'s `chat_template`):
    `apply_chat_template(messages, add_generation_prompt=True)` gives `render`'s ids. It
    checks the roles as `check_messages` does."""
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


# --- replies --------------------------------------------------------------------------------

def prompt_ids(tokenizer: Tokenizer, messages: Sequence[Message], block_size: int) -> list[int]:
    """The ids that ask for the next reply, or QuillError when they exceed the context."""
    ids = render(tokenizer, messages, add_generation_prompt=True).ids
    if len(ids) > block_size:
        raise QuillError(f"the conversation is {len(ids)} tokens long, longer than the model's "
                         f"context of {block_size}")
    return ids


def stream_replies(model: nn.Module, tokenizer: Tokenizer, conversations: Sequence[Any],
                   max_new_tokens: int = 256, temperature: float = 1.0, top_k: int | None = None,
                   top_p: float | None = None, min_p: float | None = None,
                   repetition_penalty: float = 1.0, stop: list[str] | None = None,
                   seed: int | None = None) -> Iterator[list[str]]:
    """The assistant's next reply to each conversation (one batch), in pieces as they are
    produced: each step, one text piece per conversation. Conversation b samples with seed + b."""
    check_sampling_args(temperature, top_k, top_p, min_p, repetition_penalty, max_new_tokens, stop)
    sampling = Sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                        min_p=min_p, repetition_penalty=repetition_penalty, stop=tuple(stop or ()), seed=seed)
    block_size = model.config.block_size
    ids = [prompt_ids(tokenizer, check_messages(list(c)), block_size) for c in conversations]
    yield from stream_texts(model, tokenizer, ids, sampling, end_ids=end_ids(tokenizer))


def replies(model: nn.Module, tokenizer: Tokenizer, conversations: Sequence[Any], **sampling: Any) -> list[str]:
    """The assistant's next reply to each conversation (see `stream_replies`)."""
    out = [""] * len(conversations)
    for pieces in stream_replies(model, tokenizer, conversations, **sampling):
        out = [o + p for o, p in zip(out, pieces)]
    return out


def fit_history(tokenizer: Tokenizer, messages: list[Message], budget: int) -> tuple[list[Message], int]:
    """`messages` with the oldest user/assistant exchanges dropped (the system message kept)
    until the prompt takes at most `budget` tokens; returns them and how many turns went."""
    system = messages[:1] if messages and messages[0].role == "system" else []
    turns = messages[len(system):]
    dropped = 0
    while len(render(tokenizer, system + turns, add_generation_prompt=True).ids) > budget and len(turns) > 1:
        turns = turns[2:]  # a user message and the reply to it
        dropped += 2
    return system + turns, dropped


@dataclass
class ChatSession:
    """A conversation with a model in the terminal (`quill chat`): history, system prompt,
    streamed replies. History that no longer fits the context loses its oldest turns."""

    model: nn.Module
    tokenizer: Tokenizer
    system: str | None = None
    sampling: dict[str, Any] = field(default_factory=dict)
    history: list[Message] = field(default_factory=list)
    dropped: int = 0  # turns dropped from the history by the last `send`
    turn: int = 0

    def __post_init__(self) -> None:
        chat_token_ids(self.tokenizer)  # a model without the template: say so before any input

    def reset(self) -> None:
        self.history, self.turn = [], 0

    def messages(self) -> list[Message]:
        return ([Message("system", self.system)] if self.system else []) + self.history

    def send(self, text: str) -> Iterator[str]:
        """Add the user's message and stream the reply; the reply joins the history at the end."""
        block_size = self.model.config.block_size
        max_new = int(self.sampling.get("max_new_tokens", 256))
        budget = max(1, block_size - min(max_new, block_size // 2))  # room left for the reply
        user = Message("user", text)
        self.tokenizer.encode_ordinary(text)  # a character outside the vocabulary fails here
        fitted, self.dropped = fit_history(self.tokenizer, self.messages() + [user], budget)
        if self.dropped:  # keep what fits, in the history too
            self.history = fitted[1:] if self.system else fitted
            self.history = self.history[:-1]
        seed = self.sampling.get("seed")
        settings = {**self.sampling, "seed": None if seed is None else seed + self.turn}
        reply = ""
        for pieces in stream_replies(self.model, self.tokenizer, [fitted], **settings):
            reply += pieces[0]
            if pieces[0]:
                yield pieces[0]
        self.history += [user, Message("assistant", reply)]
        self.turn += 1


# --- scoring replies --------------------------------------------------------------------------

def last_reply(messages: Sequence[Message]) -> tuple[list[Message], str]:
    """(the messages before the last assistant turn, that turn's content): a prompt and its
    reference answer."""
    for i in range(len(messages) - 1, -1, -1):
        if messages[i].role == "assistant":
            return list(messages[:i]), messages[i].content
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
