"""Does a calculator help? Multiplications of 3-5 digit numbers, learnt from scratch with
calculator calls and with answers alone (docs/tools.md).

    python benchmarks/tools.py --out out/tools              # the whole measurement (~25 min, 2 cores)
    python benchmarks/tools.py --out out/tools --smoke      # end to end at a tiny setting

It writes the data with benchmarks/tool_data.py (calls and answers alone, the same questions,
held-out ones, a tokenizer), then trains two models of the same size from scratch (`quill sft` without --init-from, on
one tokenizer: `tokenizer.json`, a byte-level BPE whose merges never enter a number), each for
`--budget` (LR decay included), and scores the
held-out questions greedily: the tool model answers with `--tools calculator` (quill runs each
call it makes and forces the result in), the plain model alone. A row per model: parameters,
steps, training time, held-out exact match, and for the tool model how many answers came
through the calculator. Deterministic data for a given --seed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parent.parent)

from benchmarks.script import run_main  # noqa: E402
from benchmarks.tool_data import write_all  # noqa: E402

MODEL = {"n_layer": 3, "n_head": 4, "n_embd": 64, "rope": True, "block_size": 128, "batch_size": 32,
         "learning_rate": 5e-3, "warmup_iters": 50, "eval_interval": 500, "eval_iters": 4, "log_interval": 50,
         "dropout": 0.0, "device": "cpu", "compile": False, "sample_tokens": 0, "max_iters": 1_000_000}
SMOKE = {"n_layer": 1, "n_head": 2, "n_embd": 32, "batch_size": 4, "max_iters": 3,
         "eval_interval": 3, "eval_iters": 1, "log_interval": 1, "warmup_iters": 1}


def train(data: Path, out: Path, budget: str | None, seed: int, settings: dict) -> tuple[int, float]:
    """SFT from scratch on `data` for `budget`; (steps, seconds)."""
    from quillgpt.config import load_config
    from quillgpt.sft import sft_trainer

    values = {**MODEL, **settings, "data": str(data), "out": str(out), "seed": seed}
    if budget is not None:
        values["time_budget"] = budget
    start = time.perf_counter()
    result = sft_trainer(load_config(None, values), overwrite=True, progress=False, log=lambda m: None).run()
    return result.steps, time.perf_counter() - start


def score(run_dir: Path, test: Path, tools: str | None, batch: int = 64) -> tuple[float, float]:
    """Held-out exact match (greedy) of the run's answers, with `tools` or alone; and the share
    of answers that came after a calculator call."""
    from quillgpt.chat import tool_replies
    from quillgpt.checkpoint import load_run

    run = load_run(run_dir)
    rows = [json.loads(line) for line in test.read_text(encoding="utf-8").splitlines()]
    hits = called = 0
    for start in range(0, len(rows), batch):
        part = rows[start:start + batch]
        got = tool_replies(run.model, run.tokenizer, [r["messages"] for r in part], tools=tools,
                           temperature=0, max_new_tokens=48)
        for r, reply in zip(part, got):
            hits += reply.messages[-1].content == r["answer"]
            called += any(m.role == "tool" for m in reply.messages)
    return hits / len(rows), called / len(rows)


def measure(args: argparse.Namespace, files: dict[str, Path]) -> list[dict]:
    from quillgpt.checkpoint import load_run
    from quillgpt.model import count_params

    settings = {**(SMOKE if args.smoke else {}), **args.set, "tokenizer": str(files["tokenizer"])}
    budget = None if args.smoke else args.budget
    rows = []
    for name, tools in (("tools", "calculator"), ("plain", None)):
        out = args.out / f"run-{name}"
        steps, seconds = train(files[name], out, budget, args.seed, settings)
        exact, called = score(out, files["test"], tools)
        params = count_params(load_run(out).model)
        rows.append({"model": name, "params": params, "steps": steps, "seconds": seconds, "exact": exact,
                     "called": called if tools else None})
    return rows


def setting(text: str) -> tuple[str, object]:
    """KEY=VALUE with VALUE read as JSON where it parses (4, 0.01, true), else as text."""
    key, eq, value = text.partition("=")
    if not eq or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


def report(rows: list[dict], args: argparse.Namespace) -> str:
    lines = [f"held-out multiplications of 3-5 digit numbers, {args.test} questions, {args.threads} threads, "
             f"budget {args.budget if not args.smoke else 'smoke'}, model {json.dumps({**MODEL, **args.set})}",
             "| model | parameters | steps | training | held-out exact match | answers after a calculator call |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        called = "–" if r["called"] is None else f"{r['called']:.1%}"
        label = "with calculator calls (--tools calculator)" if r["model"] == "tools" else "answers alone"
        lines.append(f"| {label} | {r['params'] / 1e6:.2f}M | {r['steps']} | {r['seconds'] / 60:.1f} min | "
                     f"{r['exact']:.1%} | {called} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="directory for the data, the runs and report.md")
    p.add_argument("--train", type=int, default=50_000, help="training conversations per file (default 50000)")
    p.add_argument("--test", type=int, default=500, help="held-out questions (default 500)")
    p.add_argument("--budget", default="10m", help="training time per model (default 10m)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", type=setting, action="append", default=[], metavar="KEY=VALUE",
                   help="a training key for both models (e.g. n_layer=4), over the defaults (MODEL)")
    p.add_argument("--smoke", action="store_true",
                   help="a tiny setting end to end (a few steps, 40 questions): checks the script, measures nothing")
    args = p.parse_args(argv)
    args.set = dict(args.set)
    if args.smoke:
        args.train, args.test = min(args.train, 200), min(args.test, 40)
    files = write_all(args.out, args.train, args.test, args.seed)
    print(f"wrote {files['tools']}, {files['plain']} ({args.train} conversations each), {files['test']} "
          f"({args.test} held out), {files['tokenizer']}", file=sys.stderr)
    import torch

    torch.set_num_threads(args.threads)
    text = report(measure(args, files), args)
    (args.out / "report.md").write_text(text + "\n", encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    run_main(main)
