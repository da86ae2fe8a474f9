"""Held-out exact match of a skill before and after SFT (docs/chat.md).

    python benchmarks/chat_skill.py --test out/reverse/test.jsonl --base runs/shakespeare-char-cpu --chat runs/reverse

For every held-out conversation the model answers the messages before the last assistant turn,
greedily, and the answer counts when it equals that turn exactly. Three rows:

- the base model in the chat template: its tokenizer gets the chat tokens and its embedding the
  new rows (the mean of the others), exactly where `quill sft` starts from;
- the base model without the template: the user's text and a newline as a plain prompt, the
  first line of its continuation as the answer;
- the SFT model in the chat template.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path[0] = str(Path(__file__).resolve().parent.parent)

from benchmarks.script import run_main  # noqa: E402
from quillgpt.chat import add_chat_tokens, exact_match, last_reply  # noqa: E402
from quillgpt.checkpoint import load_run  # noqa: E402
from quillgpt.conversations import read_conversations  # noqa: E402
from quillgpt.generate import generate_batch  # noqa: E402
from quillgpt.hf import grow_vocabulary  # noqa: E402
from quillgpt.model import GPT  # noqa: E402


def base_with_template(run_dir: str):
    """The base run's model and tokenizer with the chat tokens, as SFT's step 0 has them."""
    run = load_run(run_dir)
    tokenizer = add_chat_tokens(run.tokenizer)
    cfg = run.config.model
    cfg.vocab_size = tokenizer.vocab_size
    model = GPT(cfg)
    model.load_state_dict(grow_vocabulary(run.model.state_dict(), tokenizer.vocab_size))
    return model.eval(), tokenizer


def plain_prompt_match(run_dir: str, conversations, batch: int = 50) -> float:
    """The base model continuing "USER TEXT\\n": does its first line equal the reference?"""
    run = load_run(run_dir)
    hits = 0
    for i in range(0, len(conversations), batch):
        pairs = [last_reply(c) for c in conversations[i:i + batch]]
        prompts = [prompt[-1].content + "\n" for prompt, _ in pairs]
        outs = generate_batch(run.model, run.tokenizer, prompts, max_new_tokens=16, temperature=0)
        hits += sum(out.split("\n")[0] == ref for out, (_, ref) in zip(outs, pairs))
    return hits / len(conversations)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--test", required=True, help="held-out conversations (.jsonl)")
    p.add_argument("--base", help="the run SFT started from")
    p.add_argument("--chat", help="the SFT run")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    convs = read_conversations(args.test).conversations
    rows = []
    if args.base:
        model, tok = base_with_template(args.base)
        rows.append(("base model, chat template", exact_match(model, tok, convs)))
        rows.append(("base model, plain prompt", plain_prompt_match(args.base, convs)))
    if args.chat:
        run = load_run(args.chat)
        start = time.perf_counter()
        rows.append(("SFT model, chat template", exact_match(run.model, run.tokenizer, convs)))
        print(f"({len(convs)} greedy replies in {time.perf_counter() - start:.1f} s)")
    print(f"\n| model | held-out exact match ({len(convs)} conversations) |\n| --- | ---: |")
    for name, value in rows:
        print(f"| {name} | {value:.1%} |")


if __name__ == "__main__":
    run_main(main)
