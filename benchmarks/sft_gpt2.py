"""SFT of an imported GPT-2-small-shaped model on the CPU: seconds per optimizer step, fp32 and bf16.

    flock /tmp/quill-bench.lock python benchmarks/sft_gpt2.py --data out/reverse/train.jsonl

A GPT-2 small (12 layers, 12 heads, 768 wide, context 1024, GPT-2's 50,257-token vocabulary)
with random weights is written as a Hugging Face directory (`export_hf`), and `quill sft
--init-from` that directory builds the trainer: import, chat tokens appended (50,261 rows), the
conversations rendered. The benchmark then times `Trainer.train_step` (forward, backward, AdamW)
directly, so evaluations and checkpoints are not counted: median of `--steps` steps after two
warm-up steps, fp32 and bf16 autocast alternating in the same run. Needs GPT-2's ranks
(`gpt2.tiktoken` in the cache, or ../shared/data/gpt2.tiktoken).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.machine import cpu_name  # noqa: E402
from benchmarks.script import run_main  # noqa: E402
from quillgpt import checkpoint as ckpt  # noqa: E402
from quillgpt.config import Config, ModelConfig, TrainConfig, load_config  # noqa: E402
from quillgpt.download import cache_dir  # noqa: E402
from quillgpt.hf import export_hf  # noqa: E402
from quillgpt.model import GPT  # noqa: E402
from quillgpt.runtime import native_bfloat16  # noqa: E402
from quillgpt.sft import sft_trainer  # noqa: E402
from quillgpt.tokenizers.gpt2 import GPT2_RANKS_NAME, gpt2_tokenizer  # noqa: E402

SHARED_RANKS = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / GPT2_RANKS_NAME


def gpt2_small_hf_dir(root: Path) -> Path:
    """A GPT-2-small-shaped HF checkpoint with random weights (GPT-2's initialisation)."""
    dest = cache_dir() / GPT2_RANKS_NAME
    if not dest.is_file() and SHARED_RANKS.is_file():
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(SHARED_RANKS, dest)
    tok = gpt2_tokenizer()
    cfg = ModelConfig(vocab_size=tok.vocab_size, block_size=1024, n_layer=12, n_head=12, n_embd=768)
    torch.manual_seed(0)
    run = root / "run"
    run.mkdir()
    ckpt.save_config(Config(model=cfg, train=TrainConfig()), run)
    tok.save(run / ckpt.TOKENIZER_FILE)
    ckpt.save_weights(GPT(cfg), run / ckpt.MODEL_FILE)
    return export_hf(run, root / "hf")


def step_times(hf_dir: Path, data: str, dtype: str, batch_size: int, steps: int, out: Path) -> list[float]:
    cfg = load_config(None, {"init_from": str(hf_dir), "data": data, "out": str(out), "dtype": dtype,
                             "batch_size": batch_size, "block_size": 1024, "device": "cpu",
                             "learning_rate": 3e-5, "max_iters": steps + 2, "sample_tokens": 0})
    trainer = sft_trainer(cfg, overwrite=True, save=False, progress=False, log=lambda m: None)
    times = []
    for step in range(steps + 2):
        start = time.perf_counter()
        loss, _ = trainer.train_step(step)
        loss.item()
        times.append(time.perf_counter() - start)
    return times[2:]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="conversations (.jsonl)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        hf_dir = gpt2_small_hf_dir(root)
        results: dict[str, list[float]] = {"float32": [], "bfloat16": []}
        for _ in range(args.rounds):
            for dtype in results:
                results[dtype] += step_times(hf_dir, args.data, dtype, args.batch_size, args.steps, root / "sft")
    print(f"{cpu_name()}, {args.threads} threads, native bf16: {native_bfloat16(torch.device('cpu'))}; "
          f"GPT-2 small (124M) from an HF directory, {args.batch_size} conversations per step; "
          f"median of {args.rounds} x {args.steps} steps\n")
    print("| dtype | s / step (median) | vs fp32 |\n| --- | ---: | ---: |")
    base = statistics.median(results["float32"])
    for dtype, times in results.items():
        m = statistics.median(times)
        print(f"| {dtype} | {m:.2f} | {base / m:.2f}x |")


if __name__ == "__main__":
    run_main(main)
