"""`quill sft`: supervised fine-tuning on conversations, through the ordinary training loop.

    from quillgpt import load_config
    from quillgpt.sft import sft
    cfg = load_config(None, {"init_from": "runs/base", "data": "chats.jsonl", "out": "runs/chat"})
    result = sft(cfg)                      # a TrainResult, as train() gives

What SFT adds to `quill train` is its data: `conversations.ConversationData` (whole
conversations, loss on the assistant's turns only) handed to `Trainer(cfg, data=...)`. The
tokenizer is the source model's (`init_from`: a run, an HF GPT-2 directory or a hub id) or,
without one, a new one built from the conversations (`tokenizer` key); either way it gets the
chat template's special tokens (`chat.add_chat_tokens`), and where they are new the Trainer
grows the embedding to match (`hf.grow_vocabulary`). Everything else (progress, metrics.csv,
loss.png, checkpoints, exact resume, bf16, DDP/FSDP, the time budget) is the loop's own.

`ReplyExactMatch` is an evaluation hook: the share of held-out conversations whose last
assistant turn the model reproduces exactly (greedy), as a metrics.csv column.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch.nn as nn

from . import checkpoint as ckpt
from .chat import Message, add_chat_tokens, exact_match, tools_text, uses_tools
from .config import Config
from .conversations import ConversationData, capped, log_skipped, read_conversations
from .errors import QuillError, shown
from .hf import resolve_init_run
from .tokenizers import Tokenizer, build_tokenizer, load_tokenizer
from .train import EvalHook, Trainer, TrainResult


@dataclass
class ReplyExactMatch:
    """EvalHook: `val_exact_match`, the share of (up to `limit`) held-out conversations whose
    last assistant turn the model reproduces exactly with greedy decoding."""

    tokenizer: Tokenizer
    conversations: list[list[Message]]
    interval: int
    limit: int = 64

    def __call__(self, model: nn.Module, step: int) -> dict[str, float]:
        return {"val_exact_match": exact_match(model, self.tokenizer, self.conversations[: self.limit])}


def conversation_text(conv: list[Message]) -> str:
    """All the text a conversation renders: its tool list, contents and calls."""
    tools = getattr(conv, "tools", None)
    parts = [tools_text(tools)] if tools else []
    for m in conv:
        parts.append(m.content or "")
        parts.extend(c.text() for c in m.tool_calls or [])
    return "\n".join(parts)


def sft_tokenizer(cfg: Config, conversations: list[list[Message]], resume: str | Path | None) -> Tokenizer:
    """The run's tokenizer with the chat tokens (and the tool tokens when a conversation uses
    tools): a resumed run's own, the source's (`init_from`), or one built from the
    conversations' text."""
    if resume is not None:
        tokenizer = load_tokenizer(ckpt.run_file(Path(resume), ckpt.TOKENIZER_FILE))
    elif cfg.train.init_from:
        tokenizer = load_tokenizer(ckpt.run_file(resolve_init_run(cfg.train.init_from), ckpt.TOKENIZER_FILE))
    else:
        text = "\n".join(conversation_text(conv) for conv in conversations)
        tokenizer = build_tokenizer(cfg.train.tokenizer, text)
    return add_chat_tokens(tokenizer, tools=any(uses_tools(conv) for conv in conversations))


def sft_block_size(cfg: Config, resume: str | Path | None) -> int:
    """The context the run will have: fine-tuning crops block_size to the source's (hf.init_from)."""
    if resume is None and cfg.train.init_from:
        source = ckpt.read_run_config(resolve_init_run(cfg.train.init_from))
        return min(cfg.model.block_size, source.model.block_size)
    return cfg.model.block_size


def sft_data(cfg: Config, resume: str | Path | None = None,
             log: Callable[[str], None] = lambda msg: None) -> ConversationData:
    """`cfg.train.data` read, checked, split and rendered with the run's tokenizer."""
    t = cfg.train
    if not t.data:
        raise QuillError("quill sft needs --data: a .jsonl (or .parquet) file of conversations")
    if resume is not None and not Path(t.data).exists():
        raise QuillError(f"the conversations {resume} was trained on ({shown(t.data)}) are not on this machine, "
                         f"and resuming never downloads: pass --data with a local copy (its conversations "
                         f"are checked against the checkpoint)")
    convs = read_conversations(t.data, skip_invalid=t.sft_skip_invalid)
    block_size = sft_block_size(cfg, resume)
    convs.conversations = [capped(c, block_size) for c in convs.conversations]  # what training can see
    tokenizer = sft_tokenizer(cfg, convs.conversations, resume)
    convs.check_encodable(tokenizer, t.data, t.sft_skip_invalid)
    log_skipped(convs.skipped, log)
    return ConversationData.build(tokenizer, convs.conversations, block_size, t.val_fraction, t.sft_too_long,
                                  skipped=len(convs.skipped))


def sft_trainer(cfg: Config, overwrite: bool = False, save: bool = True, progress: bool = True,
                log: Callable[[str], None] | None = None, start_time: float | None = None,
                resume: str | Path | None = None, exact_match_every: int = 0,
                hooks: Sequence[EvalHook] = ()) -> Trainer:
    """A `Trainer` on the conversations of `cfg.train.data` (see the module docstring);
    `exact_match_every` > 0 adds `ReplyExactMatch` at that interval."""
    say = log or (lambda msg: print(msg, file=sys.stderr))
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun only rank 0 speaks
        say = lambda msg: None  # noqa: E731
    if cfg.train.sample_temperature is None:
        cfg.train.sample_temperature = 0.0  # a learnt reply is the likeliest one: the page starts greedy
    cfg.validate()
    data = sft_data(cfg, resume, say)
    hooks = list(hooks)
    if exact_match_every > 0:
        hooks.append(ReplyExactMatch(data.tokenizer, data.val_conversations, exact_match_every))
    trainer = Trainer(cfg, overwrite=overwrite, save=save, progress=progress, log=log,
                      start_time=start_time, resume=resume, data=data, hooks=hooks)
    trainer.command = "quill sft"
    return trainer


def sft(cfg: Config, overwrite: bool = False, save: bool = True, progress: bool = True,
        resume: str | Path | None = None, exact_match_every: int = 0) -> TrainResult:
    """Fine-tune on conversations as `cfg` says; see `sft_trainer`."""
    return sft_trainer(cfg, overwrite=overwrite, save=save, progress=progress, resume=resume,
                       exact_match_every=exact_match_every).run()
