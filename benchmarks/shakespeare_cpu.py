"""The core target: nanoGPT's CPU recipe (the `shakespeare-char-cpu` preset) on tiny-shakespeare.

1. Trains the preset for its 2000 iterations and reports the val loss, wall time and the median
   time per iteration (evaluation excluded). Then, on the trained model, the loss over the whole
   val split and how much the recipe's val estimate (eval_iters = 20 random batches of 12 x 64
   tokens) moves when other batches are drawn: `--resamples` draws, mean, standard deviation,
   and the share of draws at or below 1.90.
2. Times training iterations of the same shape, fp32, against an independent implementation of
   the same model measured in the same run: Hugging Face `GPT2LMHeadModel` with the same AdamW
   loop. Rounds alternate between the two; medians are reported.

    python benchmarks/shakespeare_cpu.py [--data ../shared/data/tinyshakespeare.txt] [--quick]
        [--resamples 100]

Reference (GUIDE.md, nanoGPT on these machines): val 1.886 after 2000 iterations, ~38 ms/iteration,
91 s wall.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

# the repository instead of this folder: benchmarks/tokenizers.py would shadow HF's `tokenizers`
sys.path[0] = str(Path(__file__).resolve().parent.parent)

from benchmarks.machine import cpu_name  # noqa: E402
from benchmarks.nanogpt_parity import full_val_loss  # noqa: E402
from quillgpt.config import load_config  # noqa: E402
from quillgpt.data import BatchSampler  # noqa: E402
from quillgpt.train import Trainer  # noqa: E402

NANOGPT_MS_PER_ITER = 38.0  # GUIDE.md, same machine class
NANOGPT_VAL_LOSS = 1.886


def machine() -> str:
    cpu = cpu_name()
    return f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def full_run(data: str, iters: int) -> dict:
    cfg = load_config("shakespeare-char-cpu", {"data": data, "max_iters": iters, "lr_decay_iters": iters,
                                                "sample_tokens": 0})
    start = time.time()
    trainer = Trainer(cfg, save=False, progress=False, log=lambda m: None, start_time=start)
    result = trainer.run()
    tokens_per_step = cfg.train.batch_size * cfg.model.block_size
    ms = [1000 * tokens_per_step / float(r["tokens_per_s"]) for r in trainer.metrics if r["tokens_per_s"]]
    return {"val": result.val_loss, "wall": time.time() - start, "ms_per_iter": statistics.median(ms),
            "trainer": trainer}


@torch.no_grad()
def estimate_spread(trainer: Trainer, resamples: int) -> dict:
    """The whole-val loss of the trained model, and the recipe's val estimate redrawn `resamples`
    times (other random batches, the same model)."""
    t, model = trainer.cfg.train, trainer.model.eval()
    val = trainer.data.splits.val
    estimates = []
    for draw in range(resamples):
        sampler = BatchSampler(val, trainer.cfg.model.block_size, t.batch_size, 10_000 + draw, "cpu")
        estimates.append(statistics.fmean(model(*sampler.next())[1].item() for _ in range(t.eval_iters)))
    return {"whole": full_val_loss(model, val, trainer.cfg.model.block_size),
            "mean": statistics.fmean(estimates), "sd": statistics.stdev(estimates),
            "min": min(estimates), "max": max(estimates),
            "at_most_1.90": sum(e <= 1.90 for e in estimates) / resamples}


def time_steps(model: torch.nn.Module, forward, steps: int, batch: int, block: int, vocab: int) -> float:
    """Median ms per AdamW step over `steps` steps (after 5 warm-up steps)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1)
    g = torch.Generator().manual_seed(0)
    times = []
    for i in range(steps + 5):
        x = torch.randint(0, vocab, (batch, block), generator=g)
        y = torch.randint(0, vocab, (batch, block), generator=g)
        t0 = time.perf_counter()
        loss = forward(model, x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= 5:
            times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def compare_step_time(rounds: int, steps: int) -> dict:
    from transformers import GPT2Config, GPT2LMHeadModel

    from quillgpt.model import GPT

    cfg = load_config("shakespeare-char-cpu", {"vocab_size": 65})
    m = cfg.model
    ours = GPT(m)
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=65, n_positions=m.block_size, n_embd=m.n_embd,
                                    n_layer=m.n_layer, n_head=m.n_head, resid_pdrop=0.0, embd_pdrop=0.0,
                                    attn_pdrop=0.0, bos_token_id=0, eos_token_id=None,
                                    attn_implementation="sdpa"))
    ours_fwd = lambda model, x, y: model(x, y)[1]
    hf_fwd = lambda model, x, y: model(input_ids=x, labels=y).loss
    results: dict[str, list[float]] = {"quillgpt": [], "transformers GPT2LMHeadModel": []}
    for _ in range(rounds):
        results["quillgpt"].append(time_steps(ours, ours_fwd, steps, cfg.train.batch_size, m.block_size, 65))
        results["transformers GPT2LMHeadModel"].append(
            time_steps(hf, hf_fwd, steps, cfg.train.batch_size, m.block_size, 65))
    return {k: statistics.median(v) for k, v in results.items()}


def main() -> None:
    here = Path(__file__).resolve().parent.parent
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(here.parent / "shared" / "data" / "tinyshakespeare.txt"))
    parser.add_argument("--quick", action="store_true", help="200 iterations instead of 2000")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--resamples", type=int, default=100, help="redraws of the val estimate")
    args = parser.parse_args()
    iters = 200 if args.quick else 2000

    print(f"machine: {machine()}")
    run = full_run(args.data, iters)
    spread = estimate_spread(run["trainer"], args.resamples)
    steps = compare_step_time(args.rounds, 100)

    print(f"\nshakespeare-char-cpu, {iters} iterations, fp32")
    print("| what | quillgpt | reference |")
    print("| --- | --- | --- |")
    print(f"| val loss after {iters} iterations | {run['val']:.3f} | nanoGPT {NANOGPT_VAL_LOSS} (2000 it.) |")
    print(f"| wall time, evaluations included | {run['wall']:.1f} s | nanoGPT 91 s |")
    print(f"| ms / iteration (median, training run) | {run['ms_per_iter']:.1f} | nanoGPT "
          f"{NANOGPT_MS_PER_ITER:.0f} (GUIDE.md) |")
    print(f"\nthe trained model: whole val split {spread['whole']:.4f}; the 20-batch val estimate over "
          f"{args.resamples} draws of batches: mean {spread['mean']:.4f}, sd {spread['sd']:.4f}, "
          f"range {spread['min']:.4f}-{spread['max']:.4f}, at or below 1.90 in {spread['at_most_1.90']:.0%}")
    print(f"\nstep time, same shapes, same AdamW loop, median of {args.rounds} rounds x 100 steps")
    print("| implementation | ms / step | ratio vs quillgpt |")
    print("| --- | --- | --- |")
    base = steps["quillgpt"]
    for name, ms in steps.items():
        print(f"| {name} | {ms:.1f} | {ms / base:.2f}x |")


if __name__ == "__main__":
    main()
