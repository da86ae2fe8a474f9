"""SFT batches: padding each batch to its longest conversation vs packing conversations into full
rows with document masks. Which trains on more conversation tokens per second here?

    flock /tmp/quill-bench.lock python benchmarks/sft_batching.py --data out/reverse/train.jsonl

Both train the same model (forward, backward, AdamW step) on the same conversations:

- padded (what `quill sft` does): `batch_size` conversations per batch, right-padded to the
  longest; causal attention (`is_causal`, the fused kernel) never reaches across conversations
  since each row holds one; padding positions are computed and thrown away.
- packed: conversations laid end to end into rows of `block_size` tokens (a conversation that
  does not fit starts the next row), with a block-diagonal causal mask so that no token sees
  another conversation; no padding except at the end of each row, but attention takes an
  explicit mask (the fused causal kernel no longer applies). The mask goes in by wrapping
  `scaled_dot_product_attention` for the benchmark; positions are not restarted per
  conversation (same cost either way).

It prints the median over `--rounds` of conversation tokens (padding excluded) per second, and
the ratio packed / padded measured in the same run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import quillgpt.model as model_module  # noqa: E402
from benchmarks.machine import cpu_name  # noqa: E402
from benchmarks.script import run_main  # noqa: E402
from quillgpt.chat import add_chat_tokens  # noqa: E402
from quillgpt.config import ModelConfig  # noqa: E402
from quillgpt.conversations import RenderStats, read_conversations, render_rows  # noqa: E402
from quillgpt.model import GPT  # noqa: E402
from quillgpt.tokenizers import CharTokenizer  # noqa: E402


def padded_batches(rows, batch_size: int, n: int, rng: np.random.Generator):
    for _ in range(n):
        pick = rng.integers(len(rows.inputs), size=batch_size)
        T = max(len(rows.inputs[i]) for i in pick)
        x = np.zeros((batch_size, T), dtype=np.int64)
        y = np.full((batch_size, T), -1, dtype=np.int64)
        for b, i in enumerate(pick):
            k = len(rows.inputs[i])
            x[b, :k], y[b, :k] = rows.inputs[i], rows.targets[i]
        yield torch.from_numpy(x), torch.from_numpy(y), None, int(sum(len(rows.inputs[i]) for i in pick))


def packed_batches(rows, batch_size: int, block_size: int, n: int, rng: np.random.Generator):
    """Rows of block_size tokens filled with whole conversations; a (B, 1, T, T) mask."""
    for _ in range(n):
        x = np.zeros((batch_size, block_size), dtype=np.int64)
        y = np.full((batch_size, block_size), -1, dtype=np.int64)
        doc = np.full((batch_size, block_size), -1, dtype=np.int64)
        tokens = 0
        for b in range(batch_size):
            at, d = 0, 0
            while True:
                i = rng.integers(len(rows.inputs))
                k = len(rows.inputs[i])
                if at + k > block_size:
                    break
                x[b, at:at + k], y[b, at:at + k], doc[b, at:at + k] = rows.inputs[i], rows.targets[i], d
                at, d, tokens = at + k, d + 1, tokens + k
        docs = torch.from_numpy(doc)
        causal = torch.ones(block_size, block_size, dtype=torch.bool).tril()
        mask = (docs[:, :, None] == docs[:, None, :]) & causal & (docs[:, :, None] >= 0)
        mask |= torch.eye(block_size, dtype=torch.bool)  # padding sees itself (no empty rows)
        yield torch.from_numpy(x), torch.from_numpy(y), mask[:, None], tokens


class MaskedAttention:
    """scaled_dot_product_attention with the current batch's document mask instead of is_causal."""

    def __init__(self):
        self.mask = None

    def __call__(self, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, **kw):
        if self.mask is not None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask, dropout_p=dropout_p)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p,
                                              is_causal=is_causal, **kw)


def time_steps(model, opt, batches, attention: MaskedAttention, warmup: int = 3) -> float:
    """Conversation tokens per second over the batches (the first `warmup` not timed)."""
    tokens, seconds = 0, 0.0
    for step, (x, y, mask, n) in enumerate(batches):
        attention.mask = mask
        start = time.perf_counter()
        _, loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step >= warmup:
            seconds += time.perf_counter() - start
            tokens += n
    attention.mask = None
    return tokens / seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="conversations (.jsonl), e.g. from reverse_words.py")
    p.add_argument("--block-size", type=int, nargs="+", default=[64, 256])
    p.add_argument("--batch-size", type=int, default=32, help="conversations per padded batch")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    convs = read_conversations(args.data).conversations[:5000]
    text = "\n".join(m.content for c in convs for m in c)
    tok = add_chat_tokens(CharTokenizer.train(text))
    attention = MaskedAttention()
    model_module.F = type("F", (), {**{k: getattr(F, k) for k in dir(F) if not k.startswith("__")},
                                    "scaled_dot_product_attention": attention})
    print(f"{cpu_name()}, {args.threads} threads; {len(convs)} conversations, char tokenizer ({tok.vocab_size}), "
          f"4-layer 128-wide GPT, medians of {args.rounds} rounds x {args.steps} steps\n")
    print("| block_size | padded: conv. tokens/s | packed: conv. tokens/s | packed / padded | rows |")
    print("| ---: | ---: | ---: | ---: | --- |")
    for block in args.block_size:
        rows = render_rows(tok, convs, block, "truncate", RenderStats())
        mean_len = float(np.mean([len(r) for r in rows.inputs]))
        per_row = max(1, int(block // mean_len))
        packed_rows = max(1, args.batch_size // per_row)  # about the same conversations per step
        torch.manual_seed(0)
        model = GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=block, n_layer=4, n_head=4, n_embd=128))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        pad, pack = [], []
        for r in range(args.rounds):  # alternate, so that machine load hits both alike
            rng = np.random.default_rng(r)
            pad.append(time_steps(model, opt, padded_batches(rows, args.batch_size, args.steps, rng), attention))
            rng = np.random.default_rng(r)
            pack.append(time_steps(model, opt, packed_batches(rows, packed_rows, block, args.steps, rng), attention))
        a, b = statistics.median(pad), statistics.median(pack)
        print(f"| {block} | {a:,.0f} | {b:,.0f} | {b / a:.2f}x | {mean_len:.0f} (one conversation), "
              f"~{per_row} conversations in {packed_rows} rows |")


if __name__ == "__main__":
    run_main(main)
