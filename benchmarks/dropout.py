"""Where dropout goes: no dropout, nanoGPT's 0.2 everywhere, and gpt-rs's layout, on shakespeare-char.

nanoGPT's GPU recipe (the `shakespeare-char` preset: 6 layers, 6 heads, 384 wide, block 256,
batch 64, 5000 iterations, dropout 0.2) scaled for a 2-core CPU: the same depth and heads, half
the width (192), a quarter of the context (64), the CPU recipe's batch (12), 1000 iterations
with the preset's learning-rate schedule (warmup 100, cosine 1e-3 -> 1e-4, beta2 0.99). The
GPU recipe reads its 1M training characters ~80 times, which is where dropout pays; to keep
that regime at CPU speed the runs read the first `--max-megabytes` (default 0.1 MB: 90K
training characters, the last 10% held out) ~8 times. Every run has the same steps, seed and
batches; only the dropout layout differs.

    flock /tmp/quill-bench.lock python benchmarks/dropout.py [--iters 1000] [--max-megabytes 0.1]
        [--data FILE]

Prints a Markdown table: final and best val loss (evaluated every 250 steps on 50 batches of
each split) and the final train-split estimate.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

# the repository instead of this folder: benchmarks/tokenizers.py would shadow HF's `tokenizers`
sys.path[0] = str(Path(__file__).resolve().parent.parent)

from benchmarks.machine import cpu_name  # noqa: E402
from benchmarks.script import run_main  # noqa: E402
from quillgpt.config import load_config  # noqa: E402
from quillgpt.train import Trainer  # noqa: E402

SCALED = {"n_layer": 6, "n_head": 6, "n_embd": 192, "block_size": 64, "batch_size": 12,
          "eval_interval": 250, "eval_iters": 50, "sample_tokens": 0, "device": "cpu", "dtype": "float32"}
LAYOUTS = {
    "no dropout": {"dropout": 0.0},
    "nanoGPT: 0.2 everywhere": {"dropout": 0.2},
    # gpt-rs's sites: embeddings, each attention output, each MLP output, the residual stream;
    # nothing on the attention weights. Rates: nanoGPT's 0.2 at the branch sites, 0.1 on the stream.
    "gpt-rs layout": {"embd_dropout": 0.2, "attn_dropout": 0.0, "attn_out_dropout": 0.2,
                      "mlp_dropout": 0.2, "resid_dropout": 0.1},
}


def run(data: str, iters: int, max_megabytes: float, layout: dict) -> dict:
    values = {**SCALED, "data": data, "max_megabytes": max_megabytes, "max_iters": iters,
              "lr_decay_iters": iters, **layout}
    cfg = load_config("shakespeare-char", values)
    start = time.time()
    trainer = Trainer(cfg, save=False, progress=False, start_time=start,
                      log=lambda m: print(f"  {m}", file=sys.stderr, flush=True))
    result = trainer.run()
    return {"val": result.val_loss, "best": result.best_val_loss, "train": trainer.evaluate()["train"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="shakespeare",
                        help="a text file; shakespeare (default): tiny-shakespeare from quill's cache")
    parser.add_argument("--iters", type=int, default=1000)
    parser.add_argument("--max-megabytes", type=float, default=0.1)
    args = parser.parse_args()
    print(f"machine: {cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"shakespeare-char scaled: {SCALED['n_layer']} layers, {SCALED['n_head']} heads, {SCALED['n_embd']} wide, "
          f"block {SCALED['block_size']}, batch {SCALED['batch_size']}, {args.iters} iterations, first "
          f"{args.max_megabytes:g} MB, seed 1337\n", flush=True)
    print("| layout | keys | val loss (final) | val loss (best) | train loss (final) |")
    print("| --- | --- | --- | --- | --- |")
    for name, layout in LAYOUTS.items():
        r = run(args.data, args.iters, args.max_megabytes, layout)
        keys = " ".join(f"{k}={v:g}" for k, v in layout.items())
        print(f"| {name} | `{keys}` | {r['val']:.4f} | {r['best']:.4f} | {r['train']:.4f} |", flush=True)


if __name__ == "__main__":
    run_main(main)
