"""GPT-2 (124M shape) through quill's HF interop: import/export time, logit agreement, eval speed.

A randomly initialised GPT2LMHeadModel of GPT-2 small's shape (no download) is saved in HF
layout, imported with `quillgpt.hf.load_hf`, exported back with `export_hf`, and both models
score the same GPT-2-encoded tiny-shakespeare prefix in disjoint 1024-token windows: quill's
`evaluate_ids` against transformers' forward with labels (the perplexity guide's loop).

    flock /tmp/quill-bench.lock .venv/bin/python benchmarks/hf_interop.py [--tokens 4096] [--repeats 3]
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
# benchmarks/tokenizers.py would shadow HF's `tokenizers` package: import from the repo root
sys.path[0] = str(ROOT)

from benchmarks.script import run_main, text_file  # noqa: E402


def timed(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    from quillgpt.tokenizers.gpt2 import gpt2_ranks_path

    tmp = Path(tempfile.mkdtemp(prefix="quill-hf-bench-"))
    ranks, shakespeare = gpt2_ranks_path(), text_file("shakespeare")  # quill's cache, downloaded once
    os.environ["QUILL_CACHE"] = str(tmp / "cache")
    (tmp / "cache").mkdir()
    shutil.copy(ranks, tmp / "cache" / "gpt2.tiktoken")

    from transformers import GPT2Config, GPT2LMHeadModel

    from quillgpt import checkpoint as ckpt
    from quillgpt.config import Config
    from quillgpt.evaluate import evaluate_ids, token_byte_lengths
    from quillgpt.hf import export_hf, load_hf
    from quillgpt.tokenizers.gpt2 import gpt2_tokenizer

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config()).eval()  # GPT-2 small: 12 layers, 12 heads, 768 wide
    hf.save_pretrained(tmp / "hf")
    n_params = sum(p.numel() for p in hf.parameters())

    t_import, loaded = timed(lambda: load_hf(tmp / "hf", tokenizer="gpt2"), args.repeats)  # no tokenizer files
    model, tok = loaded.model, loaded.tokenizer

    def export():
        out = tmp / "exported"
        if out.exists():
            shutil.rmtree(out)
        return export_hf(ckpt.Run(tmp, Config(model=loaded.config), tok, model), out)

    t_export, _ = timed(export, args.repeats)
    t_hf_load, hf2 = timed(lambda: GPT2LMHeadModel.from_pretrained(tmp / "exported").eval(), args.repeats)

    text = shakespeare.read_text(encoding="utf-8")
    ids = tok.encode(text)[: args.tokens]
    x = torch.tensor([ids[:1024]])
    with torch.no_grad():
        diff_import = (model(x)[0] - hf(x).logits).abs().max().item()
        diff_export = (hf2(x).logits - hf(x).logits).abs().max().item()

    lengths = token_byte_lengths(gpt2_tokenizer())
    t_ours, ours = timed(lambda: evaluate_ids(model, ids, stride=1024, batch_size=1,
                                              byte_lengths=lengths, progress=False), args.repeats)

    def hf_loop() -> float:
        nll, n = 0.0, 0
        seq = torch.tensor([ids])
        with torch.no_grad():
            for b in range(0, len(ids), 1024):
                window = seq[:, b : b + 1024]
                loss = hf(window, labels=window).loss.item()
                nll += loss * (window.size(1) - 1)
                n += window.size(1) - 1
        return math.exp(nll / n)

    t_hf, hf_ppl = timed(hf_loop, args.repeats)

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"model: random GPT-2 small shape, {n_params / 1e6:.1f}M parameters; medians of {args.repeats}")
    print()
    print("| step | quill | transformers | ratio |")
    print("| --- | --- | --- | --- |")
    print(f"| load HF checkpoint (safetensors) | {t_import:.2f} s (import) | {t_hf_load:.2f} s "
          f"(from_pretrained) | {t_import / t_hf_load:.2f} |")
    print(f"| write HF checkpoint | {t_export:.2f} s (export) | | |")
    print(f"| score {len(ids):,} tokens, 1024-token windows | {len(ids) / t_ours:,.0f} tokens/s | "
          f"{len(ids) / t_hf:,.0f} tokens/s | {t_hf / t_ours:.2f} |")
    print()
    print(f"max |logit difference| import vs HF: {diff_import:.2e}; exported-and-reloaded vs HF: "
          f"{diff_export:.2e}")
    print(f"perplexity quill {ours.perplexity:.4f} vs transformers {hf_ppl:.4f} "
          f"(random weights: near the vocabulary size); bits/byte {ours.bits_per_byte:.3f}")
    shutil.rmtree(tmp)


if __name__ == "__main__":
    run_main(main)
