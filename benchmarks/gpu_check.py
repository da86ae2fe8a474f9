"""GPU check: one unattended run that turns a few minutes on one GPU into the README's GPU figures.

Four parts, each in its own process with its own time cap, in this order:

1. gpt2        GPT-2 124M (`gpt2-124m` preset: block 1024, bf16, fused AdamW) on random tokens:
               which SDPA backend runs (profiler) and whether the flash backend alone works;
               tokens/s, MFU and peak memory, eager and under torch.compile (with the compile
               time); the largest micro-batch that fits (doubling until out of memory, bounded);
               compiled throughput at that micro-batch if time is left.
2. shakespeare `shakespeare-char` (nanoGPT's GPU recipe, 5000 iterations) in bf16 + compile, as
               `quill train --config shakespeare-char` runs it: val loss, wall time, time to
               val <= 1.47 (nanoGPT: 1.4697 in about 3 minutes on an A100).
3. generate    KV-cache decoding with GPT-2-124M-shaped random weights, batch 1 and 32, greedy:
               tokens/s and time to first token, against transformers' `GPT2LMHeadModel.generate`
               holding the same weights, in the same run.
4. resume      exact resume: a run stopped halfway and resumed against an uninterrupted one (and
               against a second uninterrupted one), losses and final weights compared bitwise,
               with deterministic settings and without.

A part that fails or reaches its cap records `{"error": "one line"}` (plus the figures it had
so far) and the next part starts; the JSON is rewritten after every part, and a markdown table
is printed at the end. `--smoke` runs the same code on the CPU with tiny shapes in under a minute
(tests/test_gpu_check.py runs it), compiling with the `eager` backend (dynamo's tracing without
inductor's code generation, whose C++ build alone takes about a minute on 2 cores).

    timeout 540 python benchmarks/gpu_check.py --out out/gpu.json    # <= 8 minutes on one H100/H200
    python benchmarks/gpu_check.py --smoke --out out/smoke.json       # CPU, < 1 minute
    python benchmarks/gpu_check.py --table out/gpu.json               # print the table of a JSON again
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import csv
import functools
import gc
import importlib.metadata
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# the repository instead of this folder: benchmarks/tokenizers.py would shadow HF's `tokenizers`
REPO = Path(__file__).resolve().parent.parent
sys.path[0] = str(REPO)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.machine import cpu_name  # noqa: E402
from quillgpt.config import ModelConfig, load_config  # noqa: E402
from quillgpt.errors import QuillError  # noqa: E402

PART_NAMES = ("gpt2", "shakespeare", "generate", "resume")
NANOGPT_SHAKESPEARE_VAL = 1.47  # nanoGPT's published 1.4697, rounded as the target
T0 = time.time()  # the script's start (a part process gets the parent's through --t0)


@dataclass
class Sizes:
    """Everything that differs between the GPU run and --smoke: shapes, step counts, caps."""

    gpt2_shape: dict[str, int]  # gpt2-124m's n_layer / n_head / n_embd / block_size
    gpt2_vocab: int  # 50257: GPT-2's tokenizer
    gpt2_batch: int  # micro-batch of the eager and compiled measurements
    gpt2_max_batch: int  # the micro-batch search stops here
    gpt2_steps: int  # timed steps per measurement
    gpt2_warmup: int
    char_overrides: dict[str, Any]  # on top of the shakespeare-char preset
    gen_shape: dict[str, int]
    gen_vocab: int
    gen_prompt: int  # prompt tokens
    gen_new: int  # new tokens per call
    gen_batches: tuple[int, ...]
    gen_repeats: int
    resume_overrides: dict[str, Any]  # on top of shakespeare-char
    resume_steps: int
    resume_modes: tuple[str, ...]  # "deterministic" (torch.use_deterministic_algorithms), "default"
    caps: dict[str, float]  # seconds per part, process start included
    budget: float  # seconds for the whole script
    compile_backend: str
    threads: int | None  # torch threads in a part's process (None: torch's default)


GPT2_SHAPE = dict(n_layer=12, n_head=12, n_embd=768, block_size=1024)
FULL = Sizes(
    gpt2_shape=GPT2_SHAPE, gpt2_vocab=50257, gpt2_batch=16, gpt2_max_batch=256, gpt2_steps=20,
    gpt2_warmup=3,
    char_overrides={},
    gen_shape=GPT2_SHAPE, gen_vocab=50257, gen_prompt=16, gen_new=256, gen_batches=(1, 32),
    gen_repeats=3,
    resume_overrides={"batch_size": 32, "eval_iters": 10, "log_interval": 5},
    resume_steps=40, resume_modes=("deterministic", "default"),
    # caps are upper bounds: a part that starts late gets what the budget has left (later parts
    # keep 30 s each), so the whole run stays within the budget even when every part hits its cap
    caps={"gpt2": 170, "shakespeare": 180, "generate": 90, "resume": 45},
    budget=470, compile_backend="inductor", threads=None,
)
TINY = dict(n_layer=2, n_head=2, n_embd=32, block_size=32)
SMOKE = Sizes(
    gpt2_shape=TINY, gpt2_vocab=512, gpt2_batch=2, gpt2_max_batch=8, gpt2_steps=3, gpt2_warmup=1,
    char_overrides={**TINY, "batch_size": 8, "max_iters": 20, "lr_decay_iters": 20, "warmup_iters": 4,
                    "eval_interval": 10, "eval_iters": 2, "log_interval": 5},
    gen_shape=TINY, gen_vocab=512, gen_prompt=4, gen_new=8, gen_batches=(1, 4), gen_repeats=1,
    resume_overrides={**TINY, "batch_size": 4, "eval_iters": 2, "log_interval": 2},
    resume_steps=8, resume_modes=("deterministic",),
    # generous: on a loaded machine a part must not lose its optional steps to the cap
    caps={"gpt2": 240, "shakespeare": 240, "generate": 240, "resume": 240},
    budget=1000, compile_backend="eager", threads=1,  # tiny shapes: one thread is faster and steadier
)


# --- small helpers ----------------------------------------------------------------------------

def say(msg: str, t0: float | None = None) -> None:
    """A progress line with the clock and the seconds since the script started."""
    start = T0 if t0 is None else t0
    print(f"[{time.strftime('%H:%M:%S')} +{time.time() - start:6.1f}s] {msg}", flush=True)


def one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(e).__name__}: {first}"[:300] if first else type(e).__name__


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Atomically: a reader (or a kill) never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_gib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def is_oom(e: BaseException) -> bool:
    if isinstance(e, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(e, RuntimeError) and ("out of memory" in str(e) or "ALLOC_FAILED" in str(e))


def find_shakespeare(data: str | None) -> str | None:
    """--data, else tiny-shakespeare where the product and the test setup keep it; None lets
    the product fetch it into its cache (needs the network)."""
    if data:
        return data
    from quillgpt.data import SHAKESPEARE_NAME, cache_dir

    for path in (REPO / "shared" / "data" / SHAKESPEARE_NAME, REPO.parent / "shared" / "data" / SHAKESPEARE_NAME,
                 cache_dir() / SHAKESPEARE_NAME):
        if path.is_file():
            return str(path)
    return None


class PartTimeout(Exception):
    """The parent's SIGTERM: the part's time cap is reached."""


@dataclass
class Part:
    """What a part function gets: its options and sizes, a deadline, and `record` to save figures."""

    name: str
    args: argparse.Namespace
    sizes: Sizes
    device: torch.device
    deadline: float  # the time.time() by which the part should be done
    tmp: Path
    result_path: Path | None = None
    result: dict[str, Any] = field(default_factory=dict)

    def record(self, **values: Any) -> None:
        """Add figures to the part's result; written at once, so a kill keeps them."""
        self.result.update(values)
        if self.result_path is not None:
            write_json(self.result_path, self.result)

    def log(self, msg: str) -> None:
        say(f"{self.name}: {msg}", self.args.t0)

    def time_left(self) -> float:
        return self.deadline - time.time()


# --- part 1: GPT-2 124M throughput, MFU, memory, attention backend --------------------------------

def synthetic_data(directory: Path, vocab_size: int, n_tokens: int) -> Path:
    """A prepared data directory (train.bin, val.bin, tokenizer.json) of uniformly random tokens
    over a `vocab_size`-character vocabulary: GPT-2's shapes without its tokenizer files."""
    from quillgpt.tokenizers import CharTokenizer

    directory.mkdir(parents=True, exist_ok=True)
    chars = [chr(c) for c in range(0x100, 0x100 + vocab_size + 2048) if not 0xD800 <= c <= 0xDFFF][:vocab_size]
    CharTokenizer(chars).save(directory / "tokenizer.json")
    rng = np.random.default_rng(0)
    for name, n in (("train.bin", n_tokens), ("val.bin", n_tokens // 10)):
        rng.integers(0, vocab_size, n, dtype=np.uint16).tofile(directory / name)
    return directory


def gpt2_trainer(p: Part, data: Path, batch: int, compile: bool) -> tuple[Any, list[str]]:
    """A Trainer of the gpt2-124m preset (shape from p.sizes) at micro-batch `batch`, no saving."""
    from quillgpt.train import Trainer

    overrides = {"data": str(data), "tokenizer": "char", "device": str(p.device), "dtype": "bfloat16",
                 "batch_size": batch, "gradient_accumulation_steps": 1, "compile": compile,
                 "sample_tokens": 0, **p.sizes.gpt2_shape}
    logs: list[str] = []
    trainer = Trainer(load_config("gpt2-124m", overrides), save=False, progress=False, log=logs.append)
    return trainer, logs


def compile_failure(logs: list[str]) -> str | None:
    """The Trainer's one line when torch.compile failed and it went on in eager mode."""
    return next((m for m in logs if m.startswith(("torch.compile failed", "torch.compile unavailable"))), None)


def sdpa_backend(op_name: str) -> str | None:
    """The SDPA backend an aten op name belongs to (forward or backward), else None."""
    if not op_name.startswith("aten::_scaled_dot_product_"):
        return None
    for key, label in (("cudnn", "cudnn"), ("for_cpu", "flash (CPU)"), ("flash", "flash"),
                       ("efficient", "mem-efficient"), ("math", "math"), ("overrideable", "overrideable")):
        if key in op_name:
            return label
    return None


def profile_attention(p: Part, trainer: Any, step: int) -> dict[str, Any]:
    """Profile one training step: which SDPA ops (hence backends) ran, and the GPU kernels of
    attention by name."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if p.device.type == "cuda" else [])
    try:
        with profile(activities=activities) as prof:
            trainer.train_step(step)[0].item()
            sync(p.device)
    except RuntimeError as e:  # e.g. no CUPTI: the throughput figures still count
        return {"backend": f"profiler failed: {one_line(e)}", "ops": [], "kernels": []}
    names = {e.name for e in prof.events()}
    backends = sorted({b for b in map(sdpa_backend, names) if b})
    kernels = sorted(n[:120] for n in names if not n.startswith("aten::") and
                     any(k in n.lower() for k in ("flash", "fmha", "attention", "sdpa", "attn")))
    return {"backend": ", ".join(backends) or "no SDPA op seen", "ops": sorted(n for n in names if sdpa_backend(n)),
            "kernels": kernels[:6]}


def flash_only(trainer: Any, step: int) -> str:
    """"works", or why a step with only the flash SDPA backend allowed fails (with PyTorch's
    warning that says why flash cannot run, when there is one)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                trainer.train_step(step)[0].item()
            return "works"
        except RuntimeError as e:
            trainer.optimizer.zero_grad(set_to_none=True)  # the failed step may have left gradients
            why = [str(w.message).splitlines()[0] for w in caught if "lash" in str(w.message)]
            return one_line(e) + (f" ({why[0][:200]})" if why else "")


def time_steps(p: Part, trainer: Any, batch: int, first_step: int, peak: float | None,
               flops_per_token: float) -> dict[str, Any]:
    """tokens/s, ms/step and MFU over p.sizes.gpt2_steps steps (fewer if the deadline is near)."""
    block = p.sizes.gpt2_shape["block_size"]
    sync(p.device)
    t0 = time.perf_counter()
    steps = 0
    loss = None
    while steps < p.sizes.gpt2_steps and (steps < 3 or p.time_left() > 20):
        loss, _ = trainer.train_step(first_step + steps)
        steps += 1
    last = loss.item() if loss is not None else float("nan")
    sync(p.device)
    dt = time.perf_counter() - t0
    tokens_per_s = steps * batch * block / dt
    return {"tokens_per_s": tokens_per_s, "ms_per_step": 1000 * dt / steps, "steps_timed": steps,
            "mfu": tokens_per_s * flops_per_token / peak if peak else None,
            "peak_memory_gib": peak_memory_gib(p.device), "loss": last}


def measure_variant(p: Part, data: Path, batch: int, compile: bool) -> dict[str, Any]:
    """One Trainer at `batch`: the first step (compilation, if any), warm-up, timed steps,
    the attention backend seen by the profiler; plus the model's facts for the part."""
    from quillgpt.model import count_params
    from quillgpt.train import flops_per_token, peak_flops

    free_memory(p.device)
    trainer, logs = gpt2_trainer(p, data, batch, compile)
    n_params = count_params(trainer.model)
    fpt = flops_per_token(trainer.model, n_params)
    peak = peak_flops(p.device, "bfloat16")
    facts = {"params": n_params, "flops_per_token": fpt, "peak_flops": peak,
             "fused_adamw": bool(trainer.optimizer.defaults.get("fused"))}
    t0 = time.perf_counter()
    trainer.train_step(0)[0].item()
    first_step_s = time.perf_counter() - t0
    for i in range(1, p.sizes.gpt2_warmup + 1):
        trainer.train_step(i)[0].item()
    out = {"first_step_s": first_step_s}
    if compile:
        out["compile_fallback"] = compile_failure(logs)
    out.update(time_steps(p, trainer, batch, p.sizes.gpt2_warmup + 1, peak, fpt))
    out["sdpa"] = profile_attention(p, trainer, 1000)
    if not compile:
        out["flash_only"] = flash_only(trainer, 1001)
    trainer = None
    free_memory(p.device)
    return {"facts": facts, "figures": out}


def try_micro_batch(p: Part, data: Path, batch: int) -> float | str | None:
    """Peak memory (GiB; None on a CPU) of two eager steps at `batch`, or "out of memory"."""
    trainer = None
    oom = False
    free_memory(p.device)
    try:
        trainer, _ = gpt2_trainer(p, data, batch, compile=False)
        for i in range(2):
            trainer.train_step(i)[0].item()
        sync(p.device)
    except (torch.cuda.OutOfMemoryError, RuntimeError) as e:
        if not is_oom(e):
            raise
        oom = True
    peak = peak_memory_gib(p.device)
    trainer = None
    free_memory(p.device)
    return "out of memory" if oom else peak


def largest_micro_batch(p: Part, data: Path, start: int, start_peak: float | None) -> None:
    """Double the micro-batch from `start` (known to fit) until out of memory or the bound."""
    trials: dict[str, Any] = {str(start): start_peak}
    best, best_peak = start, start_peak
    batch = 2 * start
    while batch <= p.sizes.gpt2_max_batch:
        if p.time_left() < 30:
            trials[str(batch)] = "not tried: part time cap near"
            break
        got = try_micro_batch(p, data, batch)
        trials[str(batch)] = got
        p.log(f"micro-batch {batch}: {got if isinstance(got, str) else 'fits'}")
        if isinstance(got, str):
            break
        best, best_peak = batch, got
        batch *= 2
    p.record(largest_micro_batch=best, largest_micro_batch_peak_memory_gib=best_peak,
             micro_batch_bound=p.sizes.gpt2_max_batch, micro_batch_trials=trials)


def part_gpt2(p: Part) -> None:
    s = p.sizes
    data = synthetic_data(p.tmp / "synthetic", s.gpt2_vocab, 2_000_000 if p.device.type == "cuda" else 50_000)
    batch = s.gpt2_batch
    p.record(preset="gpt2-124m", dtype="bfloat16", micro_batch=batch, vocab_size=s.gpt2_vocab, **s.gpt2_shape,
             device_name=device_name(p.device))
    eager = measure_variant(p, data, batch, compile=False)
    p.record(**eager["facts"], eager=eager["figures"])
    e = eager["figures"]
    p.log(f"eager: {e['tokens_per_s']:,.0f} tokens/s, MFU {fmt_pct(e['mfu'])}, SDPA {e['sdpa']['backend']}, "
          f"flash only: {e['flash_only']}")
    use_compile_backend(s.compile_backend)
    compiled = measure_variant(p, data, batch, compile=True)["figures"]
    p.record(compile_backend=s.compile_backend, compiled=compiled)
    torch.compiler.reset()  # drop the compiled graphs (and anything they hold) before the search
    free_memory(p.device)
    p.log(f"compiled: {compiled['tokens_per_s']:,.0f} tokens/s, MFU {fmt_pct(compiled['mfu'])}, "
          f"first step {compiled['first_step_s']:.1f} s, SDPA {compiled['sdpa']['backend']}")
    largest_micro_batch(p, data, batch, e["peak_memory_gib"])
    largest = p.result["largest_micro_batch"]
    needed = 1.5 * compiled["first_step_s"] + 30
    if largest > batch and p.time_left() > needed:
        try:  # after the reset above: a fresh compile at the new shape, not a dynamic-shape one
            at_largest = measure_variant(p, data, largest, compile=True)["figures"]
        except (RuntimeError, QuillError) as e:  # e.g. out of memory while compiling: the rest stands
            at_largest = {"error": one_line(e)}
            free_memory(p.device)
        p.record(compiled_at_largest=at_largest)
        p.log(f"compiled at micro-batch {largest}: {at_largest.get('tokens_per_s', 0):,.0f} tokens/s, "
              f"MFU {fmt_pct(at_largest.get('mfu'))}")
    elif largest > batch:
        p.record(compiled_at_largest={"error": f"not run: {p.time_left():.0f} s left, ~{needed:.0f} s needed"})


def use_compile_backend(backend: str) -> None:
    """--smoke: the Trainer's torch.compile(model) with another backend than inductor."""
    if backend != "inductor" and not isinstance(torch.compile, functools.partial):
        torch.compile = functools.partial(torch.compile, backend=backend)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_name()


# --- part 2: shakespeare-char, nanoGPT's GPU recipe ---------------------------------------------

def val_curve(run_dir: Path) -> list[tuple[int, float, float]]:
    """(step, elapsed_s, val_loss) of every evaluation in RUN/metrics.csv."""
    path = run_dir / "metrics.csv"
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as f:
        return [(int(r["step"]), float(r["elapsed_s"]), float(r["val_loss"]))
                for r in csv.DictReader(f) if r.get("val_loss")]


def part_shakespeare(p: Part) -> None:
    from quillgpt.train import Trainer

    data = find_shakespeare(p.args.data)
    run_dir = p.tmp / "shakespeare-char"
    use_compile_backend(p.sizes.compile_backend)
    overrides = {"data": data, "out": str(run_dir), "device": str(p.device), "dtype": "bfloat16",
                 "compile": True, "sample_tokens": 0, **p.sizes.char_overrides}
    cfg = load_config("shakespeare-char", overrides)
    t = cfg.train
    p.record(preset="shakespeare-char", data=data or "(downloaded by quillgpt)", dtype="bfloat16",
             compile=True, max_iters=t.max_iters, batch_size=t.batch_size, block_size=cfg.model.block_size,
             eval_interval=t.eval_interval, eval_iters=t.eval_iters, target_val_loss=NANOGPT_SHAKESPEARE_VAL,
             device_name=device_name(p.device))
    logs: list[str] = []

    def log(msg: str) -> None:
        logs.append(msg)
        p.log(msg)

    start = time.time()
    try:
        result = Trainer(cfg, log=log, progress=False, start_time=start).run()
    finally:  # also when the time cap stops the run: the evaluations so far are figures too
        curve = val_curve(run_dir)
        reached = next((e for _, e, v in curve if v <= NANOGPT_SHAKESPEARE_VAL), None)
        p.record(val_curve=curve, time_to_target_s=reached, compile_fallback=compile_failure(logs),
                 wall_s=time.time() - start)
    p.record(val_loss=result.val_loss, best_val_loss=result.best_val_loss, train_loss=result.train_loss,
             steps=result.steps, tokens_per_s=result.tokens_per_s)
    p.log(f"val loss {result.val_loss:.4f} after {result.steps} steps, {p.result['wall_s']:.1f} s wall")


# --- part 3: generation with the KV cache against transformers ---------------------------------

def hf_twin(model: torch.nn.Module) -> torch.nn.Module:
    """transformers' GPT2LMHeadModel holding `model`'s weights (quillgpt.hf's export mapping)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from quillgpt.hf import config_to_hf, state_dict_to_hf

    hf_cfg = GPT2Config.from_dict({**config_to_hf(model.config), "pad_token_id": 0})
    hf = GPT2LMHeadModel(hf_cfg).eval()
    missing, unexpected = hf.load_state_dict(state_dict_to_hf(model), strict=False)
    left = [k for k in missing if k != "lm_head.weight" and not k.endswith((".attn.bias", ".attn.masked_bias"))]
    if left or unexpected:
        raise RuntimeError(f"HF GPT-2 state dict mismatch: missing {left[:3]}, unexpected {unexpected[:3]}")
    hf.tie_weights()
    return hf


def timed(fn: Callable[[], object], device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def compare_generation(p: Part, model: torch.nn.Module, hf: torch.nn.Module | None, batch: int) -> dict:
    """Median tokens/s (all rows together) and time to first token of each contender at `batch`."""
    from quillgpt.generate import generate_ids

    s = p.sizes
    g = torch.Generator().manual_seed(batch)
    prompt = torch.randint(0, s.gen_vocab, (batch, s.gen_prompt), generator=g).to(p.device)
    contenders: dict[str, Callable[[int], Callable[[], object]]] = {
        "quillgpt": lambda n: lambda: generate_ids(model, prompt, n, temperature=0)}
    if hf is not None:
        mask = torch.ones_like(prompt)
        contenders["transformers"] = lambda n: lambda: hf.generate(
            prompt, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    round_s = sum(timed(make(s.gen_new), p.device) for make in contenders.values())  # warm-up
    times: dict[str, list[float]] = {k: [] for k in contenders}
    ttft: dict[str, list[float]] = {k: [] for k in contenders}
    for r in range(s.gen_repeats):  # rounds: a change in load hits every contender alike
        if r and p.time_left() < 1.5 * round_s + 5:  # fewer rounds rather than none at the cap
            break
        for name, make in contenders.items():
            times[name].append(timed(make(s.gen_new), p.device))
            ttft[name].append(timed(make(1), p.device))
    out: dict[str, Any] = {"new_tokens": s.gen_new, "prompt_tokens": s.gen_prompt, "runs": len(times["quillgpt"])}
    for name in contenders:
        out[name] = {"tokens_per_s": batch * s.gen_new / statistics.median(times[name]),
                     "ttft_ms": 1000 * statistics.median(ttft[name])}
    if hf is not None:
        out["speedup_vs_transformers"] = out["quillgpt"]["tokens_per_s"] / out["transformers"]["tokens_per_s"]
    return out


@torch.no_grad()
def logits_difference(model: torch.nn.Module, hf: torch.nn.Module, device: torch.device, vocab: int) -> float:
    """Max |logits difference| of the two models on one random prompt, in float32."""
    idx = torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(1)).to(device)
    return (model(idx)[0] - hf(idx).logits).abs().max().item()


def part_generate(p: Part) -> None:
    from quillgpt.model import GPT

    s = p.sizes
    cfg = ModelConfig(vocab_size=s.gen_vocab, dropout=0.0, bias=True, **s.gen_shape)
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    dtype = torch.bfloat16 if p.device.type == "cuda" else torch.float32
    p.record(model=f"GPT-2 shape, random weights: {cfg.n_layer} layers, {cfg.n_head} heads, {cfg.n_embd} wide, "
                   f"block {cfg.block_size}, vocab {cfg.vocab_size}", dtype=str(dtype).replace("torch.", ""),
             decoding="greedy", device_name=device_name(p.device))
    hf = None
    try:
        hf = hf_twin(model).to(p.device)
        import transformers

        p.record(transformers=transformers.__version__,
                 transformers_attention=getattr(hf.config, "_attn_implementation", None))
    except Exception as e:  # noqa: BLE001 - quillgpt's own figures still count without the baseline
        p.record(transformers_error=one_line(e))
        p.log(f"no transformers baseline: {one_line(e)}")
    model.to(p.device)
    if hf is not None:
        p.record(logits_max_abs_diff_fp32=logits_difference(model, hf, p.device, s.gen_vocab))
        hf.to(dtype)
    model.to(dtype)
    for batch in s.gen_batches:
        got = compare_generation(p, model, hf, batch)
        p.record(**{f"batch_{batch}": got})
        ours = got["quillgpt"]
        vs = f", {got['speedup_vs_transformers']:.2f}x transformers" if hf is not None else ""
        p.log(f"batch {batch}: {ours['tokens_per_s']:,.0f} tokens/s, first token {ours['ttft_ms']:.1f} ms{vs}")


# --- part 4: exact resume --------------------------------------------------------------------------

def max_abs_diff(a: list[float], b: list[float]) -> float:
    if len(a) != len(b):
        return math.inf
    return max((abs(x - y) for x, y in zip(a, b)), default=0.0)


def weights_difference(a: Path, b: Path) -> float:
    from quillgpt import checkpoint as ckpt

    wa, wb = ckpt.read_safetensors(a / ckpt.MODEL_FILE), ckpt.read_safetensors(b / ckpt.MODEL_FILE)
    if wa.keys() != wb.keys():
        return math.inf
    return max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa)


def resume_once(p: Part, root: Path) -> dict[str, Any]:
    """Uninterrupted twice, and stopped halfway + resumed: losses and weights compared."""
    from quillgpt.train import Trainer, resume_config

    n = p.sizes.resume_steps
    half = n // 2
    base = {"data": find_shakespeare(p.args.data), "device": str(p.device), "dtype": "bfloat16",
            "compile": False, "sample_tokens": 0, "max_iters": n, "lr_decay_iters": n, "warmup_iters": 2,
            "eval_interval": half, "checkpoint_interval": half, **p.sizes.resume_overrides}

    def run(out: Path, **extra: Any) -> Any:
        cfg = load_config("shakespeare-char", {**base, "out": str(out), **extra})
        return Trainer(cfg, progress=False, log=lambda m: None).run()

    full = run(root / "full")
    again = run(root / "again")
    run(root / "part", max_iters=half)  # stopped halfway, on the same schedule (lr_decay_iters n)
    cfg = resume_config(root / "part", overrides={"max_iters": n}, allow_config_change=True)
    resumed = Trainer(cfg, progress=False, log=lambda m: None, resume=root / "part").run()
    w_resume = weights_difference(root / "part", root / "full")
    w_again = weights_difference(root / "again", root / "full")
    return {"steps": n, "resumed_at": half,
            "resume_losses_bitwise": resumed.losses == full.losses,
            "resume_losses_max_abs_diff": max_abs_diff(resumed.losses, full.losses),
            "resume_weights_bitwise": w_resume == 0.0, "resume_weights_max_abs_diff": w_resume,
            "rerun_losses_bitwise": again.losses == full.losses,
            "rerun_losses_max_abs_diff": max_abs_diff(again.losses, full.losses),
            "rerun_weights_bitwise": w_again == 0.0, "final_loss": full.losses[-1] if full.losses else None}


def part_resume(p: Part) -> None:
    # cuBLAS reads this when it starts: before any CUDA work in this process
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    p.record(preset="shakespeare-char", dtype="bfloat16", compile=False, device_name=device_name(p.device),
             cublas_workspace_config=os.environ["CUBLAS_WORKSPACE_CONFIG"])
    for mode in p.sizes.resume_modes:
        torch.use_deterministic_algorithms(mode == "deterministic", warn_only=True)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = resume_once(p, p.tmp / mode)
        got["warnings"] = sorted({str(w.message).splitlines()[0][:160] for w in caught
                                  if "determinis" in str(w.message)})
        p.record(**{mode: got})
        p.log(f"{mode}: resumed losses bitwise {got['resume_losses_bitwise']} (max diff "
              f"{got['resume_losses_max_abs_diff']:.3g}), rerun bitwise {got['rerun_losses_bitwise']}")
    torch.use_deterministic_algorithms(False)


PARTS: dict[str, Callable[[Part], None]] = {
    "gpt2": part_gpt2, "shakespeare": part_shakespeare, "generate": part_generate, "resume": part_resume}


# --- running one part (in its own process) --------------------------------------------------------

def run_part_here(args: argparse.Namespace) -> int:
    """The part process: run `args.part`, always leaving a result file; exit status 0 = figures."""
    sizes = SMOKE if args.smoke else FULL
    name = args.part
    result_path = Path(args.result) if args.result else None
    deadline = args.deadline or time.time() + 600

    def on_term(signum: int, frame: Any) -> None:
        raise PartTimeout()

    signal.signal(signal.SIGTERM, on_term)
    if sizes.threads:
        torch.set_num_threads(sizes.threads)
    with tempfile.TemporaryDirectory(prefix=f"gpu-check-{name}-") as tmp:
        p = Part(name, args, sizes, torch.device(args.device), deadline, Path(tmp), result_path)
        p.record(device=args.device)
        try:
            if name in args.fail:
                raise RuntimeError(f"injected failure (--fail {name})")
            if name in args.hang:
                p.log("hanging until the time cap (--hang)")
                time.sleep(10**6)
            PARTS[name](p)
        except (PartTimeout, KeyboardInterrupt):  # KeyboardInterrupt: the Trainer's TrainingInterrupted
            p.record(error="stopped by its time cap (figures so far kept)")
            return 3
        except Exception as e:  # noqa: BLE001 - one line in the JSON, the rest of the script goes on
            if not isinstance(e, QuillError) and name not in args.fail:
                traceback.print_exc()
            p.record(error=one_line(e))
            return 1
    if result_path is None:
        print(json.dumps(p.result, indent=1, default=str))
    return 0


# --- the parent: every part in turn, the JSON, the table -------------------------------------------

class ScriptInterrupted(Exception):
    pass


def machine_info() -> dict[str, Any]:
    """Versions and hardware, without touching the GPU (the parts do that in their processes)."""
    def version(pkg: str) -> str | None:
        try:
            return importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            return None

    def run(cmd: list[str]) -> str | None:
        if not shutil.which(cmd[0]):
            return None
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=20, cwd=REPO)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    smi = run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,power.limit",
               "--format=csv,noheader"])
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {"gpus": smi.splitlines() if smi else None, "cpu": cpu_name(), "cpu_count": os.cpu_count(),
            "python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "cudnn": cudnn, "transformers": version("transformers"),
            "quillgpt_commit": run(["git", "rev-parse", "--short", "HEAD"])}


def part_command(args: argparse.Namespace, name: str, result: Path, cap: float) -> list[str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--part", name, "--result", str(result),
           "--deadline", f"{time.time() + cap:.3f}", "--t0", f"{args.t0:.3f}", "--device", args.device]
    cmd += ["--smoke"] if args.smoke else []
    cmd += ["--data", args.data] if args.data else []
    for option in ("fail", "hang"):
        for value in getattr(args, option):
            cmd += [f"--{option}", value]
    return cmd


def stop(proc: subprocess.Popen, grace: float) -> None:
    """SIGTERM to the part (it saves what it has), then SIGKILL to its whole process group."""
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # compile workers too
    proc.wait()


def run_part(args: argparse.Namespace, name: str, cap: float, workdir: Path) -> tuple[dict[str, Any], bool]:
    """Run one part in a fresh process under its cap: (its figures or its error in one line,
    whether the script itself was interrupted meanwhile)."""
    result_path = workdir / f"{name}.json"
    say(f"{name}: start (cap {cap:.0f} s)", args.t0)
    start = time.time()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(part_command(args, name, result_path, cap), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, errors="replace", env=env, cwd=REPO,
                            start_new_session=True)
    tail: collections.deque[str] = collections.deque(maxlen=30)

    def pump() -> None:  # the part's output, line by line, into ours
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            if line.strip():
                tail.append(line.strip())

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    timed_out = interrupted = False
    try:
        proc.wait(timeout=cap)
    except subprocess.TimeoutExpired:
        timed_out = True
        stop(proc, grace=min(20.0, max(3.0, 0.1 * cap)))
    except ScriptInterrupted:
        interrupted = True
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)  # a second Ctrl-C must not cut the cleanup short
        stop(proc, grace=5.0)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # anything the part left behind
    reader.join(timeout=5)
    try:
        result = json.loads(result_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        result = {}
    if interrupted:
        result["error"] = "the script was interrupted during this part"
    elif timed_out:  # whatever the part made of the SIGTERM, if it lived to see it
        result["error"] = f"time cap of {cap:.0f} s reached (figures so far kept)"
    elif proc.returncode != 0 and "error" not in result:
        result["error"] = f"exited with status {proc.returncode}: {tail[-1] if tail else 'no output'}"[:300]
    result.update(seconds=round(time.time() - start, 1), cap_s=round(cap, 1))
    status = f"FAILED: {result['error']}" if "error" in result else "done"
    say(f"{name}: {status} ({result['seconds']:.0f} s)", args.t0)
    return result, interrupted


def run_parts(args: argparse.Namespace, report: dict[str, Any], budget: float, out: Path) -> None:
    """Every part in turn, each capped so that the later ones keep a minimum; JSON after each."""
    caps = dict((SMOKE if args.smoke else FULL).caps, **args.cap)
    min_cap = 10.0 if args.smoke else 30.0
    parts = args.parts
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as workdir:
        for i, name in enumerate(parts):
            left = budget - (time.time() - args.t0) - min_cap * (len(parts) - i - 1) - 5
            cap = min(caps[name], left)
            if left < min(caps[name], min_cap):
                report["parts"][name] = {"error": f"not run: {max(left, 0):.0f} s left of the budget"}
                say(f"{name}: FAILED: {report['parts'][name]['error']}", args.t0)
            else:
                report["parts"][name], interrupted = run_part(args, name, cap, Path(workdir))
                if interrupted:
                    for rest in parts[i + 1:]:
                        report["parts"][rest] = {"error": "not run: the script was interrupted"}
                    return
            write_json(out, report)


def run_all(args: argparse.Namespace) -> int:
    budget = args.budget or (SMOKE if args.smoke else FULL).budget
    out = Path(args.out)
    report: dict[str, Any] = {"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "smoke": args.smoke,
                              "device": args.device, "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
                              "budget_s": budget, "machine": machine_info(), "parts": {}}
    write_json(out, report)
    say(f"gpu check: parts {', '.join(args.parts)}; budget {budget:.0f} s; JSON to {out}", args.t0)

    def on_signal(signum: int, frame: Any) -> None:
        raise ScriptInterrupted()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    try:
        run_parts(args, report, budget, out)
    except ScriptInterrupted:  # between two parts
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)
        for rest in args.parts:
            report["parts"].setdefault(rest, {"error": "not run: the script was interrupted"})
    report["total_s"] = round(time.time() - args.t0, 1)
    write_json(out, report)
    print()
    print(markdown_table(report))
    failed = [n for n, r in report["parts"].items() if "error" in r]
    say(f"gpu check: {len(args.parts) - len(failed)}/{len(args.parts)} parts without error in "
        f"{report['total_s']:.0f} s; JSON in {out}", args.t0)
    return 1 if failed else 0


# --- the table ----------------------------------------------------------------------------------

def fmt_pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def fmt_flops(x: float) -> str:
    return f"{x / 1e12:,.0f} TFLOP/s" if x >= 1e13 else f"{x / 1e9:,.0f} GFLOP/s"


def fmt_gib(x: float | None) -> str:
    return "n/a (CPU)" if x is None else f"{x:.1f} GiB"


def rows_gpt2(r: dict[str, Any]) -> Iterator[tuple[str, str]]:
    params, peak = r.get("params"), r.get("peak_flops")
    if "block_size" in r:
        yield "model", (f"{params / 1e6:.1f}M parameters, " if params else "") + \
            f"block {r['block_size']}, micro-batch {r['micro_batch']}, bf16, vocab {r['vocab_size']}" + \
            (f"; MFU against {fmt_flops(peak)}" if peak else "")
    e, c = r.get("eager", {}), r.get("compiled", {})
    if e:
        yield "SDPA backend (profiler)", f"eager: {e['sdpa']['backend']}; compiled: " \
            f"{c.get('sdpa', {}).get('backend', 'n/a')}; flash backend alone: {e.get('flash_only')}"
        yield "fused AdamW", "yes" if r.get("fused_adamw") else "no"
    for label, v in (("eager", e), (f"compiled ({r.get('compile_backend')} backend)", c)):
        if v:
            yield f"{label}: tokens/s, MFU, peak memory", \
                f"{v['tokens_per_s']:,.0f} tok/s, MFU {fmt_pct(v['mfu'])}, {fmt_gib(v['peak_memory_gib'])}"
    if c:
        fell = f"; fell back to eager: {c['compile_fallback']}" if c.get("compile_fallback") else ""
        yield "compile (first compiled step)", f"{c['first_step_s']:.1f} s{fell}"
    if "largest_micro_batch" in r:
        yield "largest micro-batch (eager, doubling)", f"{r['largest_micro_batch']} (bound " \
            f"{r['micro_batch_bound']}), {fmt_gib(r['largest_micro_batch_peak_memory_gib'])}"
    big = r.get("compiled_at_largest")
    if big:
        yield f"compiled at micro-batch {r['largest_micro_batch']}", big.get("error") or \
            f"{big['tokens_per_s']:,.0f} tok/s, MFU {fmt_pct(big['mfu'])}, {fmt_gib(big['peak_memory_gib'])}"


def rows_shakespeare(r: dict[str, Any]) -> Iterator[tuple[str, str]]:
    if "val_loss" in r:
        yield f"val loss after {r['steps']} iterations", f"{r['val_loss']:.4f} (best {r['best_val_loss']:.4f})"
    if "wall_s" in r:
        yield "wall time (start to end, compile and evaluations included)", f"{r['wall_s']:.1f} s"
    if r.get("val_curve"):
        reached = r.get("time_to_target_s")
        yield f"time to val <= {r['target_val_loss']}", f"{reached:.1f} s" if reached is not None else "not reached"
    if "tokens_per_s" in r:
        yield "training tokens/s (evaluations excluded)", f"{r['tokens_per_s']:,.0f}"
    if r.get("compile_fallback"):
        yield "torch.compile", f"fell back to eager: {r['compile_fallback']}"


def rows_generate(r: dict[str, Any]) -> Iterator[tuple[str, str]]:
    for key in sorted((k for k in r if k.startswith("batch_")), key=lambda k: int(k.split("_")[1])):
        b = r[key]
        for name in ("quillgpt", "transformers"):
            if name in b:
                yield f"{name}, batch {key.split('_')[1]}, {b['new_tokens']} new tokens", \
                    f"{b[name]['tokens_per_s']:,.0f} tok/s, first token {b[name]['ttft_ms']:.1f} ms"
        if "speedup_vs_transformers" in b:
            yield f"quillgpt vs transformers, batch {key.split('_')[1]}", f"{b['speedup_vs_transformers']:.2f}x"
    if "logits_max_abs_diff_fp32" in r:
        yield "same weights: max logits difference (fp32)", f"{r['logits_max_abs_diff_fp32']:.2e}"
    if r.get("transformers_error"):
        yield "transformers baseline", r["transformers_error"]


def rows_resume(r: dict[str, Any]) -> Iterator[tuple[str, str]]:
    for mode in ("deterministic", "default"):
        m = r.get(mode)
        if m:
            same = "bitwise" if m["resume_losses_bitwise"] else f"max diff {m['resume_losses_max_abs_diff']:.3g}"
            rerun = "bitwise" if m["rerun_losses_bitwise"] else f"max diff {m['rerun_losses_max_abs_diff']:.3g}"
            weights = "bitwise" if m["resume_weights_bitwise"] else f"max diff {m['resume_weights_max_abs_diff']:.3g}"
            yield f"{mode} settings: resumed at {m['resumed_at']}/{m['steps']} vs uninterrupted", \
                f"losses {same}, weights {weights} (two uninterrupted runs: {rerun})"


ROWS = {"gpt2": rows_gpt2, "shakespeare": rows_shakespeare, "generate": rows_generate, "resume": rows_resume}


def markdown_table(report: dict[str, Any]) -> str:
    """The report as one markdown table; a part that failed shows its one line of error."""
    machine = report.get("machine") or {}
    parts = report.get("parts", {})
    device = machine.get("gpus") or [next((r["device_name"] for r in parts.values() if "device_name" in r),
                                          machine.get("cpu"))]
    smoke = " (--smoke: tiny shapes, figures say nothing about speed)" if report.get("smoke") else ""
    lines = [f"machine: {'; '.join(map(str, device))}; torch {machine.get('torch')}, CUDA {machine.get('cuda')}"
             f"{smoke}", "", "| part | figure | value |", "| --- | --- | --- |"]
    for name, r in parts.items():
        try:
            rows = list(ROWS[name](r))
        except (KeyError, TypeError, ValueError) as e:
            rows = [("(table)", f"cannot show: {one_line(e)}; see the JSON")]
        if "error" in r:
            rows.append(("error", r["error"]))
        if "seconds" in r:
            rows.append(("time", f"{r['seconds']:.0f} s (cap {r['cap_s']:.0f} s)"))
        lines += [f"| {name} | {label} | {str(value).replace('|', '/')} |" for label, value in rows]
    return "\n".join(lines)


# --- command line ---------------------------------------------------------------------------------

def parse_cap(text: str) -> tuple[str, float]:
    name, _, seconds = text.partition("=")
    if name not in PART_NAMES:
        raise argparse.ArgumentTypeError(f"unknown part {name!r} (parts: {', '.join(PART_NAMES)})")
    try:
        return name, float(seconds)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--cap wants PART=SECONDS, got {text!r}") from None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="gpu-check.json", help="the JSON report (default gpu-check.json)")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, < 1 minute: checks the script")
    parser.add_argument("--data", help="tiny-shakespeare (default: shared/data, ../shared/data, $QUILL_CACHE)")
    parser.add_argument("--device", help="default: cuda (cpu with --smoke)")
    parser.add_argument("--parts", default=",".join(PART_NAMES), help=f"comma-separated, from {','.join(PART_NAMES)}")
    parser.add_argument("--budget", type=float, help="seconds for the whole script (default 470; 1000 with --smoke)")
    parser.add_argument("--cap", type=parse_cap, action="append", default=[], metavar="PART=SECONDS",
                        help="a part's time cap (process start included)")
    parser.add_argument("--table", metavar="JSON", help="print the table of an earlier report and exit")
    parser.add_argument("--fail", action="append", default=[], metavar="PART", help="(testing) make PART fail")
    parser.add_argument("--hang", action="append", default=[], metavar="PART", help="(testing) make PART hang")
    # set by the parent for a part's process
    parser.add_argument("--part", choices=PART_NAMES, help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)  # time.time() of the cap
    parser.add_argument("--t0", type=float, default=T0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.device = args.device or ("cpu" if args.smoke else "cuda")
    args.data = str(Path(args.data).resolve()) if args.data else None  # parts run in the repository
    args.cap = dict(args.cap)
    args.parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = [p for p in args.parts + args.fail + args.hang if p not in PART_NAMES]
    if unknown:
        parser.error(f"unknown part {unknown[0]!r} (parts: {', '.join(PART_NAMES)})")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.table:
        try:
            report = json.loads(Path(args.table).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            print(f"gpu_check: error: cannot read {args.table}: {one_line(e)}", file=sys.stderr)
            return 2
        print(markdown_table(report))
        return 0
    if args.part:
        code = run_part_here(args)
        sys.stdout.flush()
        sys.stderr.flush()
        # the result file is written; skip the interpreter's teardown, which takes seconds
        # after torch.compile (compile workers are the parent's to end)
        os._exit(code)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_check: error: no CUDA device (torch.cuda.is_available() is False); "
              "run with --smoke to check the script on a CPU", file=sys.stderr)
        return 2
    return run_all(args)


if __name__ == "__main__":
    sys.exit(main())
