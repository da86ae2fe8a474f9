"""How long `quill train` takes before, between and after its steps, against nanoGPT's train.py.

Both train nanoGPT's CPU recipe (`shakespeare-char-cpu`: 4 layers, 128 wide, context 64, batch
12, eval_iters 20, fp32) for `--iters` iterations on tiny-shakespeare, as whole processes:

- `quill train --config shakespeare-char-cpu --data input.txt --max-iters N` (the prepared data
  cached, as on every run after the first), one or two checkouts: this one, and `--before DIR`
  (an earlier commit, e.g. `git worktree add /tmp/quill-before main`);
- nanoGPT's own `train.py config/train_shakespeare_char.py` with the recipe's overrides
  (`--nanogpt DIR`: a nanoGPT checkout; train.py, model.py and configurator.py run unchanged on
  the train.bin / val.bin / meta.pkl its data/shakespeare_char/prepare.py writes, written here
  the same way so that nothing is downloaded). nanoGPT runs N + 1 iterations and evaluates at
  0 and 250; quill runs N and evaluates at 0, 250 and N: each recipe as it is.

Rounds alternate between the commands; the tables give medians. For quill the phases come
from a harness around the real CLI (`quill_phases`): interpreter start and imports; setup (data,
model, optimizer); the first evaluation; the steps (with their evaluations, up to the end of the
last step); the end (the final evaluation, sample, checkpoint, loss.png). For nanoGPT the first
evaluation's end is when it prints `step 0:`.

    flock /tmp/quill-bench.lock python benchmarks/startup.py --nanogpt ~/nanoGPT [--before DIR]
        [--iters 300] [--rounds 5] [--data FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path[0] = str(REPO)

from benchmarks.machine import cpu_name  # noqa: E402
from benchmarks.script import run_main, text_file  # noqa: E402

RECIPE = ["--device=cpu", "--compile=False", "--eval_iters=20", "--log_interval=10", "--block_size=64",
          "--batch_size=12", "--n_layer=4", "--n_head=4", "--n_embd=128", "--dropout=0.0"]

# Runs `quill train` (argv) and prints, as JSON on the last line of stderr, the wall-clock times
# at which each phase ended. Marks are taken by wrapping Trainer methods that every version has.
HARNESS = r"""
import json, sys, time
marks = {}
import quillgpt.train as train, quillgpt.cli as cli
marks["imports"] = time.time()
init, step = train.Trainer.__init__, train.Trainer.train_step
def _init(self, *a, **k):
    init(self, *a, **k); marks["setup"] = time.time()
def _step(self, s):
    marks.setdefault("first_eval", time.time())
    out = step(self, s)
    marks["steps"] = time.time()  # the last step's end: evaluations after it count as the end
    return out
train.Trainer.__init__, train.Trainer.train_step = _init, _step
code = cli.main(sys.argv[1:])
marks["end"] = time.time()
print(json.dumps(marks), file=sys.stderr)
sys.exit(code)
"""
PHASES = ["imports", "setup", "first_eval", "steps", "end"]


def write_nanogpt_data(text: str, out: Path) -> None:
    """What nanoGPT's data/shakespeare_char/prepare.py writes, from `text`."""
    chars = sorted(set(text))
    stoi = {ch: i for i, ch in enumerate(chars)}
    n = len(text)
    out.mkdir(parents=True, exist_ok=True)
    for name, part in (("train", text[:int(n * 0.9)]), ("val", text[int(n * 0.9):])):
        np.array([stoi[c] for c in part], dtype=np.uint16).tofile(out / f"{name}.bin")
    with open(out / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": len(chars), "itos": dict(enumerate(chars)), "stoi": stoi}, f)


def quill_phases(checkout: Path, data: Path, iters: int, work: Path, env: dict[str, str]) -> dict[str, float]:
    """Seconds spent in each phase of one `quill train` process of `checkout`."""
    argv = ["train", "--config", "shakespeare-char-cpu", "--data", str(data), "--max-iters", str(iters),
            "--out", str(work / "run"), "--overwrite", "--no-progress"]
    start = time.time()
    proc = subprocess.run([sys.executable, "-c", HARNESS, *argv], cwd=work, capture_output=True, text=True,
                          env=dict(env, PYTHONPATH=str(checkout)))
    done = time.time()
    if proc.returncode != 0:
        raise SystemExit(f"quill train failed in {checkout}:\n{proc.stderr[-3000:]}")
    marks = json.loads(proc.stderr.strip().splitlines()[-1])
    marks["end"] = done  # the process's exit, interpreter shutdown included
    times, before = {}, start
    for phase in PHASES:
        times[phase] = marks[phase] - before
        before = marks[phase]
    times["total"] = done - start
    return times


def nanogpt_run(nanogpt: Path, iters: int, env: dict[str, str]) -> dict[str, float]:
    """Seconds of one nanoGPT train.py process: to the end of its first evaluation, and in all."""
    cmd = [sys.executable, "-u", "train.py", "config/train_shakespeare_char.py", *RECIPE,
           f"--max_iters={iters}", f"--lr_decay_iters={iters}", "--out_dir=out-bench"]
    start = time.time()
    proc = subprocess.Popen(cmd, cwd=nanogpt, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    first_eval = None
    for line in proc.stdout:
        if first_eval is None and line.startswith("step 0:"):
            first_eval = time.time() - start
    err = proc.stderr.read()
    if proc.wait() != 0:
        raise SystemExit(f"nanoGPT train.py failed:\n{err[-3000:]}")
    return {"to_first_step": first_eval or float("nan"), "total": time.time() - start}


def median(values: list[float]) -> float:
    return statistics.median(values)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nanogpt", type=Path, help="a nanoGPT checkout (its train.py runs unchanged)")
    ap.add_argument("--before", type=Path, help="another quill checkout to time in the same rounds")
    ap.add_argument("--data", default="shakespeare",
                    help="a text file; shakespeare (default): tiny-shakespeare from quill's cache")
    ap.add_argument("--iters", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    args.data = text_file(args.data)

    import torch

    threads = torch.get_num_threads()
    load_before = os.getloadavg()[0]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    with tempfile.TemporaryDirectory(prefix="quill-startup-") as tmp:
        tmp = Path(tmp)
        env["QUILL_CACHE"] = str(tmp / "cache")
        data = tmp / "input.txt"
        shutil.copy(args.data, data)
        quills = {"quill (this checkout)": REPO}
        if args.before:
            quills = {"quill (before)": args.before.resolve(), **quills}
        nanogpt = None
        if args.nanogpt:
            nanogpt = tmp / "nanogpt"
            nanogpt.mkdir()
            for name in ("train.py", "model.py", "configurator.py"):
                shutil.copy(args.nanogpt / name, nanogpt / name)
            shutil.copytree(args.nanogpt / "config", nanogpt / "config")
            write_nanogpt_data(data.read_text(encoding="utf-8"), nanogpt / "data" / "shakespeare_char")
        # one unmeasured run each: quill prepares (tokenizes) the data into its cache once
        for name, checkout in quills.items():
            (tmp / name).mkdir()
            quill_phases(checkout, data, 1, tmp / name, env)
        if nanogpt:
            nanogpt_run(nanogpt, 1, env)

        results: dict[str, list[dict[str, float]]] = {name: [] for name in [*quills, "nanoGPT train.py"]}
        for r in range(args.rounds):
            for name, checkout in quills.items():
                results[name].append(quill_phases(checkout, data, args.iters, tmp / name, env))
            if nanogpt:
                results["nanoGPT train.py"].append(nanogpt_run(nanogpt, args.iters, env))
            print(f"round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)

    print(f"machine: {cpu_name()}, {os.cpu_count()} cores, {threads} threads, torch {torch.__version__}, "
          f"Python {sys.version.split()[0]}; load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after")
    print(f"{args.iters} iterations of shakespeare-char-cpu, medians of {args.rounds} alternating rounds\n")
    print("| command | to the first step (s) | whole run (s) | vs nanoGPT |")
    print("| --- | ---: | ---: | ---: |")
    base = median([r["total"] for r in results["nanoGPT train.py"]]) if nanogpt else None
    for name, runs in results.items():
        if not runs:
            continue
        if "to_first_step" in runs[0]:
            first = median([r["to_first_step"] for r in runs])
        else:
            first = median([r["imports"] + r["setup"] + r["first_eval"] for r in runs])
        total = median([r["total"] for r in runs])
        ratio = f"{total / base:.2f}x" if base else "-"
        print(f"| {name} | {first:.2f} | {total:.2f} | {ratio} |")
    print("\n| quill phase (median s) | " + " | ".join(quills) + " |")
    print("| --- |" + " ---: |" * len(quills))
    for phase in [*PHASES, "total"]:
        print(f"| {phase} | " + " | ".join(f"{median([r[phase] for r in results[n]]):.2f}" for n in quills) + " |")


if __name__ == "__main__":
    run_main(main)
