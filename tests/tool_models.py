"""A stand-in chat model for the tool tests: it writes a scripted reply to the conversation it
sees, token by token, through the real decode engine (no KV cache: the engine recomputes its
window, as for any model whose forward takes no cache). What it writes depends on the last user
message and the tool results after it, so a test knows exactly which calls each row makes:

    "12*34"            calls calculator {"expression": "12*34"}, then answers with the result
    "chain 12*34+5"    calls calculator twice (12*34, then RESULT+5), then answers
    "weather Oslo"     calls get_weather {"city": "Oslo"} (a client's tool), then "Oslo: RESULT"
    "bad"              a malformed call (arguments not JSON), then "got RESULT"
    "undefined"        calls get_time {}, a tool nobody defines, then "got RESULT"
    "loop"             calls calculator again after every result
    "python CODE"      calls python {"code": CODE}, then answers with the result
    anything else      "you said TEXT"
"""

from __future__ import annotations

import json
import re
import string
from types import SimpleNamespace

import torch
import torch.nn as nn

from quillgpt.chat import add_chat_tokens
from quillgpt.tokenizers.char import CharTokenizer

CHARS = string.printable.replace("\x0b", "").replace("\x0c", "") + "°ü"
SPECIAL = re.compile(r"(<\|[a-z_]+\|>)")


def tool_tokenizer() -> CharTokenizer:
    return add_chat_tokens(CharTokenizer(list(CHARS)), tools=True)


def call(name: str, **arguments: str) -> str:
    return f"<|tool_call|>{name} {json.dumps(arguments)}"


def script(user: str, results: list[str]) -> str:
    """The reply (special tokens spelled out) to the user's message after `results`."""
    if re.fullmatch(r"\d+\*\d+", user):
        return f"{call('calculator', expression=user)}<|end_calls|>" if not results else f"{results[-1]}<|end|>"
    if m := re.fullmatch(r"chain (\d+\*\d+)\+(\d+)", user):
        if len(results) < 2:
            expression = m[1] if not results else f"{results[0]}+{m[2]}"
            return f"{call('calculator', expression=expression)}<|end_calls|>"
        return f"{results[-1]}<|end|>"
    if m := re.fullmatch(r"weather (\w+)", user):
        return f"{call('get_weather', city=m[1])}<|end_calls|>" if not results else f"{m[1]}: {results[-1]}<|end|>"
    if user == "bad":
        return "<|tool_call|>calculator {expression: 1}<|end_calls|>" if not results else f"got {results[-1]}<|end|>"
    if user == "undefined":
        return "<|tool_call|>get_time {}<|end_calls|>" if not results else f"got {results[-1]}<|end|>"
    if user == "loop":
        return f"{call('calculator', expression='1+1')}<|end_calls|>"
    if user.startswith("python "):
        return f"{call('python', code=user[7:])}<|end_calls|>" if not results else f"{results[-1].strip()}<|end|>"
    return f"you said {user}<|end|>"


def encode(tok: CharTokenizer, text: str) -> list[int]:
    """Text with special tokens spelled out, as ids."""
    out: list[int] = []
    for piece in SPECIAL.split(text):
        out += [tok.special_tokens[piece]] if piece in tok.special_tokens else tok.encode_ordinary(piece)
    return out


class ScriptedChat(nn.Module):
    """A model whose next token is the next token of `script`'s reply (greedy or sampled: the
    other tokens' logits are -inf)."""

    def __init__(self, tok: CharTokenizer, block_size: int = 2048):
        super().__init__()
        self.tok = tok
        self.config = SimpleNamespace(block_size=block_size, vocab_size=tok.vocab_size)
        self.anchor = nn.Parameter(torch.zeros(1))  # a device and a dtype for the engine

    def next_token(self, ids: list[int]) -> int:
        s = self.tok.special_tokens
        end = s["<|end|>"]
        starts = [i for i, t in enumerate(ids) if t == s["<|assistant|>"]]
        users = [i for i, t in enumerate(ids) if t == s["<|user|>"]]
        if not starts or not users:
            return end
        context = self.tok.decode(ids[users[-1] + 1:starts[-1] + 1])
        user = context.split("<|end|>", 1)[0]
        results = re.findall(r"<\|tool\|>(.*?)<\|end\|>", context, flags=re.S)
        reply = encode(self.tok, script(user, results))
        done = len(ids) - starts[-1] - 1
        return reply[done] if done < len(reply) else end

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        logits = torch.full((idx.size(0), 1, self.config.vocab_size), -1e9)
        for b, row in enumerate(idx.tolist()):
            logits[b, 0, self.next_token(row)] = 0.0
        return logits, None
