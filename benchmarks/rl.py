"""quill rl's done-when figures, in one command (docs/rl.md):

    python benchmarks/rl.py --out runs/rl-bench            # about 75 minutes on 2 quiet cores

1. **2-digit additions, 3 seeds.** For each seed: a fresh char model SFT'd on 2-digit additions
   (`benchmarks/additions.py`) until it answers 30-40% of the held-out sums (greedy, exact),
   then `quill rl --reward exact` at the default learning rate with a 10-minute time budget;
   held-out pass@1 (greedy) and pass@8 every `--eval-interval` steps, and the minute at which
   pass@1 first reached 80%.
2. **A skill the demonstrations barely show.** SFT on 2-digit additions plus 100 3-digit ones,
   then RL on 3-digit prompts alone (reward only), without and with the KL penalty; 3-digit and
   2-digit held-out pass@1 along the way.
3. **Rollout speed.** Replies to 64 prompts (8 tasks x 8 samples, as one RL step draws them)
   decoded in one batch against one prompt at a time, the same model in the same run.

Prints markdown tables; writes `curve.png` (pass@1 against minutes of RL, each seed) into --out.
Run it on a quiet machine: every figure is wall-clock time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import additions  # noqa: E402
from machine import cpu_name  # noqa: E402

from quillgpt import checkpoint as ckpt  # noqa: E402
from quillgpt.config import load_config  # noqa: E402
from quillgpt.resume import resume_config  # noqa: E402
from quillgpt.rl import rl_config, rl_trainer, rollout  # noqa: E402
from quillgpt.sft import sft_trainer  # noqa: E402

# the SFT recipe of docs/rl.md: a 0.4M-parameter char model, from scratch
SFT = {"tokenizer": "char", "n_layer": 2, "n_head": 4, "n_embd": 128, "block_size": 32, "batch_size": 64,
       "learning_rate": 2e-3, "min_lr": 2e-4, "warmup_iters": 20, "eval_interval": 100, "eval_iters": 2,
       "log_interval": 50, "sample_tokens": 0, "dropout": 0.0}
SFT_STEPS, SFT_MORE, SFT_TARGET = 600, 50, (0.30, 0.40)


def quiet(msg: str) -> None:
    pass


def held_out(run: Path, tasks: Path, limit: int = 200) -> float:
    """Greedy exact match of `run` on the first `limit` tasks of `tasks`."""
    from quillgpt.chat import Message, replies
    from quillgpt.checkpoint import load_run

    model = load_run(run)
    rows = [json.loads(line) for line in tasks.read_text().splitlines()[:limit]]
    hits = 0
    for i in range(0, len(rows), 100):
        chunk = rows[i:i + 100]
        got = replies(model.model, model.tokenizer, [[Message(**m) for m in r["messages"]] for r in chunk],
                      max_new_tokens=8, temperature=0)
        hits += sum(g.strip() == r["answer"] for g, r in zip(got, chunk))
    return hits / len(rows)


def sft_until(data: Path, out: Path, seed: int, test: Path) -> tuple[int, float]:
    """SFT from scratch, SFT_STEPS steps, then SFT_MORE at a time until the held-out accuracy is
    at least the target's low end; returns (steps, accuracy)."""
    cfg = load_config(None, dict(SFT, data=str(data / "sft.jsonl"), out=str(out), max_iters=SFT_STEPS, seed=seed))
    sft_trainer(cfg, overwrite=True, progress=False, log=quiet).run()
    steps, acc = SFT_STEPS, held_out(out, test)
    while acc < SFT_TARGET[0] and steps < 3 * SFT_STEPS:
        steps += SFT_MORE
        cfg = resume_config(out, overrides={"max_iters": steps}, allow_config_change=True)
        sft_trainer(cfg, progress=False, log=quiet, resume=out).run()
        acc = held_out(out, test)
    return steps, acc


def pass_curve(run: Path, column: str = "rl/pass@1") -> list[tuple[float, float]]:
    """(minutes of RL, value) at each evaluation, from the run's metrics (minute 0: the first)."""
    rows = [r for r in ckpt.load_train_state(run).state["metrics"] if r.get(column)]
    start = float(rows[0]["elapsed_s"])
    return [((float(r["elapsed_s"]) - start) / 60, float(r[column])) for r in rows]


def rl_run(init: Path, data: Path, test: Path, out: Path, seed: int, budget: str, **extra) -> Path:
    values = {"init_from": str(init), "data": str(data), "eval_data": str(test), "out": str(out), "reward": "exact",
              "time_budget": budget, "max_iters": 100_000, "seed": seed, **extra}
    rl_trainer(rl_config(None, values), overwrite=True, progress=False, log=quiet).run()
    return out


def two_digit(args: argparse.Namespace, data: Path) -> list[dict]:
    rows = []
    for seed in args.seeds:
        sft_dir = args.out / f"sft-{seed}"
        steps, acc = sft_until(data, sft_dir, seed, data / "test.jsonl")
        run = rl_run(sft_dir, data / "rl.jsonl", data / "test.jsonl", args.out / f"rl-{seed}", seed, args.budget,
                     eval_interval=args.eval_interval)
        curve = pass_curve(run)
        reached = next((m for m, v in curve if v >= 0.8), None)
        k8 = pass_curve(run, "rl/pass@8")
        rows.append({"seed": seed, "sft_steps": steps, "sft": acc, "start": curve[0][1],
                     "best": max(v for _, v in curve), "end": curve[-1][1], "minutes_to_80": reached,
                     "minutes": curve[-1][0], "pass8_end": k8[-1][1], "steps": ckpt.load_train_state(run).step,
                     "curve": curve})
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "curve"}), flush=True)
    return rows


def three_digit(args: argparse.Namespace, data: Path) -> list[dict]:
    sft_dir = args.out / "sft3"
    cfg = load_config(None, dict(SFT, data=str(data / "sft.jsonl"), out=str(sft_dir), max_iters=args.sft3_steps,
                                 seed=args.seeds[0]))
    sft_trainer(cfg, overwrite=True, progress=False, log=quiet).run()
    rows = []
    for kl in (0.0, args.kl):
        out = args.out / f"rl3-kl{kl:g}"
        values = {"init_from": str(sft_dir), "data": str(data / "rl3.jsonl"), "eval_data": str(data / "test3.jsonl"),
                  "out": str(out), "reward": "exact", "time_budget": args.budget, "max_iters": 100_000,
                  "rl_kl": kl, "rl_no_signal_steps": 0, "eval_interval": args.eval_interval}
        trainer = rl_trainer(rl_config(None, values), overwrite=True, progress=False, log=quiet,
                             more_eval={"2digit": data / "test.jsonl"})
        trainer.run()
        three, two = pass_curve(out), pass_curve(out, "rl/2digit/pass@1")
        rows.append({"kl": kl, "three_start": three[0][1], "three_end": three[-1][1],
                     "three_best": max(v for _, v in three), "two_start": two[0][1], "two_end": two[-1][1],
                     "two_min": min(v for _, v in two), "three": three, "two": two})
        print(json.dumps({k: v for k, v in rows[-1].items() if k not in ("three", "two")}), flush=True)
    return rows


def rollout_speed(run: Path, data: Path, rounds: int = 3) -> dict:
    """Generated tokens/s: 64 rows in one batch vs one at a time (medians of `rounds`)."""
    from quillgpt.chat import end_ids, render
    from quillgpt.checkpoint import load_run

    loaded = load_run(run)
    tasks = [json.loads(line) for line in (data / "rl.jsonl").read_text().splitlines()[:8]]
    prompts = [render(loaded.tokenizer, t["messages"], add_generation_prompt=True).ids for t in tasks for _ in range(8)]
    end = end_ids(loaded.tokenizer)
    max_new = [16] * len(prompts)
    seeds = list(range(len(prompts)))
    speeds: dict[str, list[float]] = {"batched": [], "one at a time": []}
    for _ in range(rounds):
        t0 = time.perf_counter()
        replies = rollout(loaded.model, loaded.tokenizer, prompts, max_new, end, 1.0, None, seeds)
        speeds["batched"].append(sum(len(r.ids) for r in replies) / (time.perf_counter() - t0))
        t0 = time.perf_counter()
        alone = [rollout(loaded.model, loaded.tokenizer, [p], [16], end, 1.0, None, [s])[0]
                 for p, s in zip(prompts, seeds)]
        speeds["one at a time"].append(sum(len(r.ids) for r in alone) / (time.perf_counter() - t0))
    return {k: statistics.median(v) for k, v in speeds.items()}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    for row in rows:
        ax.plot(*zip(*row["curve"]), "o-", markersize=3, label=f"seed {row['seed']}")
    ax.axhline(0.8, color="grey", linestyle="--", linewidth=1)
    ax.set_xlabel("minutes of quill rl (evaluations included)")
    ax.set_ylabel("held-out pass@1 (greedy, exact)")
    ax.set_title("2-digit additions: quill rl from a 30-40% SFT model")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


def report(two: list[dict], three: list[dict], speed: dict, args: argparse.Namespace) -> None:
    print(f"\n{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}; RL budget {args.budget}\n")
    print("| seed | SFT steps | SFT held-out | RL start | RL best | RL end | minutes to 80% | pass@8 end | RL steps |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in two:
        reached = f"{r['minutes_to_80']:.1f}" if r["minutes_to_80"] is not None else "not reached"
        print(f"| {r['seed']} | {r['sft_steps']} | {r['sft']:.1%} | {r['start']:.1%} | {r['best']:.1%} | "
              f"{r['end']:.1%} | {reached} | {r['pass8_end']:.1%} | {r['steps']} |")
    if three:
        print("\n| RL on 3-digit prompts | 3-digit pass@1 start -> end (best) | 2-digit pass@1 start -> end (lowest) |")
        print("| --- | --- | --- |")
        for r in three:
            print(f"| {'KL ' + format(r['kl'], 'g') if r['kl'] else 'no KL'} | {r['three_start']:.1%} -> "
                  f"{r['three_end']:.1%} ({r['three_best']:.1%}) | {r['two_start']:.1%} -> {r['two_end']:.1%} "
                  f"({r['two_min']:.1%}) |")
    print("\n| rollouts (64 replies, 8 prompts x 8) | generated tokens/s | vs one at a time |\n| --- | ---: | ---: |")
    for name, value in speed.items():
        print(f"| {name} | {value:,.0f} | {value / speed['one at a time']:.1f}x |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="directory for the data, runs and curve.png")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="seeds of the 2-digit runs")
    p.add_argument("--budget", default="10m", help="wall-clock time of each RL run (default 10m)")
    p.add_argument("--eval-interval", type=int, default=25, help="RL steps between held-out evaluations")
    p.add_argument("--kl", type=float, default=0.1, help="the KL weight of the 3-digit experiment's second run")
    p.add_argument("--sft3-steps", type=int, default=1000, help="SFT steps of the 3-digit experiment's model")
    p.add_argument("--skip-three-digit", action="store_true", help="only the 2-digit runs and the speed")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    data = args.out / "data"
    additions.main(["--out", str(data), "--three-digit", "100"])
    two = two_digit(args, data)
    plot(two, args.out / "curve.png")
    three = [] if args.skip_three_digit else three_digit(args, data)
    speed = rollout_speed(args.out / f"sft-{args.seeds[0]}", data)
    report(two, three, speed, args)


if __name__ == "__main__":
    main()
