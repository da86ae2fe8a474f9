"""Benchmark scoring speed: `quill eval --tasks` (in process) vs lm-evaluation-harness's hf backend
on the same exported model, the same task and the same batch size.

The task: multiple choice shaped like HellaSwag, written as a local task (YAML + .jsonl): a
context of 40-80 GPT-2 tokens of tiny-shakespeare, four endings of 15-30 tokens (the true
continuation and three from elsewhere). Random weights, GPT-2's tokenizer and vocabulary; fp32.

    10M          6 layers, 6 heads, 384 wide, context 256 (shakespeare-char's shape; 10.6M
                 parameters besides the 50,257 x 384 embedding)
    GPT-2 small  12 layers, 12 heads, 768 wide, context 1024 (124M)

Measured: the seconds each backend spends answering the task's loglikelihood requests (the
harness's own work around them is the same for both and not counted), as requests/s, in
alternating rounds; the ratio of the medians. Both backends give the same accuracy (checked
every round). Then the whole 1,000-item task through `run_tasks` (what `quill eval --tasks`
runs), end to end.

    flock /tmp/quill-bench.lock .venv/bin/python benchmarks/eval.py [--models 10m,gpt2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# benchmarks/tokenizers.py would shadow the `tokenizers` package that transformers imports
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository: benchmarks.machine

import torch  # noqa: E402

from benchmarks.machine import cpu_name  # noqa: E402
from benchmarks.script import run_main, text_file  # noqa: E402
from quillgpt import checkpoint as ckpt  # noqa: E402
from quillgpt.config import Config, ModelConfig, TrainConfig  # noqa: E402
from quillgpt.hf import export_hf  # noqa: E402
from quillgpt.model import GPT  # noqa: E402
from quillgpt.tokenizers.gpt2 import gpt2_tokenizer  # noqa: E402

SHAPES = {
    "10m": ("10M", dict(n_layer=6, n_head=6, n_embd=384, block_size=256)),
    "gpt2": ("GPT-2 small", dict(n_layer=12, n_head=12, n_embd=768, block_size=1024)),
}
TASK = "bench_choice"
LOADER = '''import json
import datasets


def load(**_):
    with open({path!r}, encoding="utf-8") as f:
        return {{"test": datasets.Dataset.from_list([json.loads(line) for line in f])}}
'''
YAML = f"""task: {TASK}
custom_dataset: !function utils.load
output_type: multiple_choice
test_split: test
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{endings}}}}"
doc_to_target: label
target_delimiter: ""
metric_list:
  - metric: acc
"""


def write_task(directory: Path, tokenizer, items: int, seed: int = 0) -> None:
    """The multiple-choice task: contexts and endings cut from tiny-shakespeare's GPT-2 tokens."""
    path = text_file("shakespeare")  # quill's cached copy, downloaded once
    ids = tokenizer.encode(path.read_text(encoding="utf-8"))
    rng = random.Random(seed)
    with open(directory / "items.jsonl", "w", encoding="utf-8") as f:
        for _ in range(items):
            start, n_ctx = rng.randrange(len(ids) - 200), rng.randint(40, 80)
            endings = []
            for k in range(4):
                begin = start + n_ctx if k == 0 else rng.randrange(len(ids) - 40)
                endings.append(tokenizer.decode(ids[begin : begin + rng.randint(15, 30)]))
            order = list(range(4))
            rng.shuffle(order)
            f.write(json.dumps({"context": tokenizer.decode(ids[start : start + n_ctx]),
                                "endings": [endings[k] for k in order], "label": order.index(0)}) + "\n")
    (directory / "utils.py").write_text(LOADER.format(path=str(directory / "items.jsonl")))
    (directory / f"{TASK}.yaml").write_text(YAML)


def make_model(root: Path, shape: dict, tokenizer) -> tuple[Path, Path]:
    """A run directory with random weights (GPT-2's initialisation) and its export-hf output."""
    cfg = ModelConfig(**shape, vocab_size=tokenizer.vocab_size)
    torch.manual_seed(0)
    run_dir = root / "run"
    run_dir.mkdir(parents=True)
    ckpt.save_config(Config(model=cfg, train=TrainConfig()), run_dir)
    tokenizer.save(run_dir / ckpt.TOKENIZER_FILE)
    ckpt.save_weights(GPT(cfg), run_dir / ckpt.MODEL_FILE)
    export_hf(run_dir, root / "hf")
    return run_dir, root / "hf"


def timed_loglikelihood(lm) -> list[float]:
    """Wrap the model's loglikelihood so that each call's seconds are recorded."""
    spent: list[float] = []
    inner = lm.loglikelihood

    def loglikelihood(requests, *args, **kwargs):
        t0 = time.perf_counter()
        out = inner(requests, *args, **kwargs)
        spent.append(time.perf_counter() - t0)
        return out

    lm.loglikelihood = loglikelihood
    return spent


def one_round(lm, manager, limit: int) -> tuple[float, int, float]:
    """(seconds in loglikelihood, requests, accuracy) of the task on `lm`."""
    import lm_eval

    spent = timed_loglikelihood(lm)
    results = lm_eval.simple_evaluate(model=lm, tasks=[TASK], task_manager=manager, limit=limit,
                                      bootstrap_iters=0, log_samples=False)
    return sum(spent), 4 * limit, results["results"][TASK]["acc,none"]


def bench_model(key: str, args: argparse.Namespace, tokenizer, task_dir: Path, root: Path) -> dict:
    from lm_eval.models.huggingface import HFLM

    from quillgpt.lm_eval_adapter import QuillLM, run_tasks, task_manager

    name, shape = SHAPES[key]
    run_dir, hf_dir = make_model(root / key, shape, tokenizer)
    run = ckpt.load_run(run_dir)
    manager = task_manager(task_dir, [TASK])
    quill = QuillLM(model=run.model, tokenizer=run.tokenizer, batch_size=args.batch_size, progress=False)
    hf = HFLM(pretrained=str(hf_dir), batch_size=args.batch_size, device="cpu")
    one_round(quill, manager, 8)  # warm-up
    one_round(hf, manager, 8)
    rates: dict[str, list[float]] = {"quill": [], "hf": []}
    for r in range(args.rounds):
        accs = {}
        for label, lm in (("quill", quill), ("hf", hf)):
            seconds, n, accs[label] = one_round(lm, manager, args.ratio_items)
            rates[label].append(n / seconds)
        print(f"  {name} round {r + 1}: quill {rates['quill'][-1]:.1f} req/s, hf {rates['hf'][-1]:.1f} req/s, "
              f"accuracy {accs['quill']:.3f} / {accs['hf']:.3f}", flush=True)
        if accs["quill"] != accs["hf"]:
            sys.exit(f"the two backends disagree on accuracy: {accs}")
    t0 = time.perf_counter()
    results = run_tasks(run.model, run.tokenizer, [TASK], limit=args.items, batch_size=args.batch_size,
                        progress=False, bootstrap_iters=0, manager=manager)
    wall = time.perf_counter() - t0
    return {"name": name, "params": run.model.num_params() / 1e6, "quill": statistics.median(rates["quill"]),
            "hf": statistics.median(rates["hf"]), "wall": wall,
            "items": results["n-samples"][TASK]["effective"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="10m,gpt2", help="comma-separated: 10m, gpt2")
    parser.add_argument("--items", type=int, default=1000, help="items of the end-to-end run")
    parser.add_argument("--ratio-items", type=int, default=200, help="items per timed round of each backend")
    parser.add_argument("--rounds", type=int, default=3, help="alternating timed rounds")
    parser.add_argument("--batch-size", type=int, default=16, help="requests per forward pass, both backends")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import logging

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    tokenizer = gpt2_tokenizer()  # GPT-2's ranks from quill's cache, downloaded once
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        task_dir = Path(tmp) / "task"
        task_dir.mkdir()
        write_task(task_dir, tokenizer, max(args.items, args.ratio_items))
        for key in args.models.split(","):
            rows.append(bench_model(key.strip(), args, tokenizer, task_dir, Path(tmp)))
    print()
    print(f"machine: {cpu_name()}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"{platform.platform()}")
    print(f"multiple choice, 4 endings, batch size {args.batch_size}; loglikelihood requests/s: medians of "
          f"{args.rounds} alternating rounds of {args.ratio_items} items ({4 * args.ratio_items} requests) each")
    print()
    print("| model | quill eval --tasks req/s | lm-eval hf backend req/s | ratio | "
          f"{args.items:,}-item task, quill, end to end |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['name']} ({r['params']:.1f}M) | {r['quill']:.1f} | {r['hf']:.1f} | "
              f"**{r['quill'] / r['hf']:.2f}x** | {r['wall']:.1f} s ({r['items']} items) |")


if __name__ == "__main__":
    run_main(main)
