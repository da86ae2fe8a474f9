"""Load and bad input against `quill serve` on loopback, with a small model: today's engine and
the engine before it, side by side in one run.

1. Trains a small char-level GPT on tiny-shakespeare (or uses --run) and starts `quill serve` in
   its own process on a free loopback port; with --base-tree also a second server from another
   checkout of the package (the code before the decode engine: `git worktree add --detach
   ../engine-base a30983c`), run with that tree on PYTHONPATH, serving the same run.
2. Load, in three scenarios, each on every server in turn (the order alternates): one client at
   a time ("lone"), CLIENTS concurrent clients with identical settings ("identical"), and
   CLIENTS clients whose temperature, top-k, top-p, min-p, repetition penalty and max_tokens
   differ from request to request ("mixed"; every client's max_tokens add up to the same total,
   see `balanced_lengths`). Every request is streamed (SSE, with usage) and
   checked (status 200, OpenAI shape, `data: [DONE]` last, token counts): served tokens/s, time
   to first token (p50/p99), whole latency (p50/p99), errors; ratios new / base.
3. Bad input: MALFORMED requests (broken and fuzzed JSON, wrong types, huge and non-finite
   numbers, invalid UTF-8, oversized bodies with and without Content-Length, deep nesting, ...),
   each must be answered by a 4xx JSON error; then /health must say ok, /metrics must parse, a
   normal completion must work; then Ctrl-C must stop the server cleanly.
Exits 1 if anything failed. Everything is bounded: --time-limit seconds per phase.

    flock /tmp/quill-bench.lock .venv/bin/python benchmarks/serve_load.py --base-tree ../engine-base
    flock /tmp/quill-bench.lock .venv/bin/python benchmarks/serve_load.py --quick     # new server only, small
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.machine import cpu_name  # noqa: E402
from benchmarks.script import text_file  # noqa: E402
from quillgpt.checkpoint import load_run  # noqa: E402
from quillgpt.model import count_params  # noqa: E402

PROMPTS = ["ROMEO:", "JULIET:\nO ", "First Citizen:\n", "KING HENRY", "To be, or not", "\n", "", "What "]


def machine() -> str:
    cpu = cpu_name()
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, Python {platform.python_version()}"


def train_small_run(out: Path, tree: Path = ROOT) -> Path:
    """A small char-level GPT (2 layers, 64 wide, context 64): 100 steps on tiny-shakespeare,
    trained by `tree`'s package (the older one when comparing: a newer package reads an older
    run's config, not the other way round)."""
    data = text_file("shakespeare")  # quill's cached copy, downloaded once
    keys = {"n_layer": 2, "n_head": 2, "n_embd": 64, "block_size": 64, "batch_size": 16, "max_iters": 100,
            "eval_interval": 50, "eval_iters": 5, "warmup_iters": 10, "device": "cpu", "sample_tokens": 0}
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in keys.items()]
    env = {**os.environ, "PYTHONPATH": str(tree)}
    subprocess.run([sys.executable, "-m", "quillgpt.cli", "train", "--data", str(data), "--out", str(out / "run"),
                    "--no-progress", *flags], cwd=tree, env=env, check=True, capture_output=True)
    return out / "run"


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q / 100 * len(values) + 0.5) - 1))]


def sampling_settings(rng: random.Random, max_tokens: int, mixed_settings: bool, mixed_lengths: bool) -> dict:
    """One request's settings in the API's names: identical (temperature 0.8, top-k 40) or each its
    own temperature, top-k, top-p, min-p and repetition penalty; max_tokens, or one of half, one and
    one and a half times it (benchmarks/engine_mix.py draws the same)."""
    out: dict = {"temperature": 0.8, "top_k": 40}
    if mixed_settings:
        out = {"temperature": rng.choice([0.0, 0.5, 0.8, 1.0, 1.2]), "top_k": rng.choice([None, 10, 40]),
               "top_p": rng.choice([None, 0.9, 0.95]), "min_p": rng.choice([None, 0.05]),
               "repetition_penalty": rng.choice([None, 1.1])}
    out["max_tokens"] = rng.choice([max_tokens // 2, max_tokens, max_tokens * 3 // 2]) if mixed_lengths else max_tokens
    return out


def request_mix(clients: int, requests: int, max_tokens: int, mixed: bool, seed: int = 0) -> list[list[dict]]:
    """Each client's requests (all streamed): identical settings, or settings that differ from
    request to request and lengths of max_tokens / 2, max_tokens and 3 / 2 max_tokens in a
    random order, which add up to the same total for every client (`balanced_lengths`)."""
    rng = random.Random(seed)
    out = []
    for c in range(clients):
        lengths = balanced_lengths(rng, requests, max_tokens) if mixed else [max_tokens] * requests
        out.append([{"prompt": rng.choice(PROMPTS), "seed": c * 1000 + i, "stream": True,
                     **sampling_settings(rng, max_tokens, mixed, False), "max_tokens": n}
                    for i, n in enumerate(lengths)])
    return out


def balanced_lengths(rng: random.Random, requests: int, max_tokens: int) -> list[int]:
    """`requests` lengths, half, one and one and a half times max_tokens, shuffled, adding up to
    about requests x max_tokens. Each client sends its requests one after another, so with
    lengths drawn independently the run ends with the longest client alone: for 16 clients x 6
    requests drawn so, the longest asked 408 tokens against a mean of 304, so that the batch is
    at most 75% full on average (the rest is the load's tail, not the server)."""
    lengths = [max_tokens // 2, max_tokens * 3 // 2, max_tokens] * (requests // 3)
    lengths += [[], [max_tokens], [max_tokens // 2, max_tokens * 3 // 2]][requests % 3]
    rng.shuffle(lengths)
    return lengths


# --- the server in its own process ---------------------------------------------------------

def start_server(run_dir: Path, tree: Path = ROOT) -> tuple[subprocess.Popen, str]:
    """`quill serve` of the package in `tree` (its own directory first on the path)."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    proc = subprocess.Popen([sys.executable, "-m", "quillgpt.cli", "serve", str(run_dir), "--port", "0",
                             "--device", "cpu", "--log-level", "warning"],
                            stderr=subprocess.PIPE, text=True, cwd=tree, env=env)
    line = proc.stderr.readline()
    m = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
    if not m:
        proc.kill()
        raise SystemExit(f"quill serve did not start: {line}{proc.stderr.read()}")
    url = f"http://127.0.0.1:{m.group(1)}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise SystemExit("quill serve did not answer /health")
        time.sleep(0.1)


# --- load ----------------------------------------------------------------------------------

async def one_request(client: httpx.AsyncClient, url: str, body: dict) -> dict:
    """Send one request; return its latency, first-chunk time, tokens, and an error string or None."""
    payload = {k: v for k, v in body.items() if v is not None}
    if body["stream"]:
        payload["stream_options"] = {"include_usage": True}
    t0 = time.perf_counter()
    first = None
    try:
        if not body["stream"]:
            r = await client.post(f"{url}/v1/completions", json=payload)
            if r.status_code != 200:
                return {"error": f"HTTP {r.status_code}: {r.text[:200]}"}
            data = r.json()
            tokens = data["usage"]["completion_tokens"]
            choice = data["choices"][0]
            if data["object"] != "text_completion" or not isinstance(choice["text"], str):
                return {"error": f"bad body {str(data)[:200]}"}
        else:
            tokens, done, usage_seen = 0, False, False
            async with client.stream("POST", f"{url}/v1/completions", json=payload) as r:
                if r.status_code != 200:
                    return {"error": f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"}
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    if first is None:
                        first = time.perf_counter() - t0
                    if line == "data: [DONE]":
                        done = True
                        continue
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        return {"error": f"stream error {chunk['error']}"}
                    if chunk.get("usage"):
                        tokens, usage_seen = chunk["usage"]["completion_tokens"], True
            if not done or not usage_seen:
                return {"error": "stream ended without usage and [DONE]"}
        if not 0 < tokens <= body["max_tokens"]:
            return {"error": f"completion_tokens {tokens}"}
        return {"latency": time.perf_counter() - t0, "first": first, "tokens": tokens,
                "stream": body["stream"], "error": None}
    except (httpx.HTTPError, ValueError, KeyError) as e:
        return {"error": f"{type(e).__name__}: {e}"}


async def load(url: str, mix: list[list[dict]]) -> tuple[list[dict], float]:
    limits = httpx.Limits(max_connections=len(mix) + 8, max_keepalive_connections=len(mix) + 8)
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(300.0)) as client:

        async def run_client(bodies: list[dict]) -> list[dict]:
            return [await one_request(client, url, b) for b in bodies]

        t0 = time.perf_counter()
        per_client = await asyncio.gather(*(run_client(b) for b in mix))
        return [r for rs in per_client for r in rs], time.perf_counter() - t0


# --- bad input -----------------------------------------------------------------------------

def malformed_bodies(count: int, vocab_size: int, block_size: int) -> list[tuple[str, bytes, dict]]:
    """(kind, body, extra headers): `count` requests that must each get a 4xx JSON error."""
    rng = random.Random(1)
    good = {"prompt": "ROMEO:", "max_tokens": 8}
    wrong_values = {
        "prompt": [5, None, 1.5, True, {"a": 1}, ["ok", 3], []],
        "max_tokens": [0, -1, "8", 8.5, True, 10**30, 1e400, 4096, [8]],
        "temperature": ["hot", -0.5, [1], {"t": 1}, False],
        "top_p": [0, -0.1, 1.01, "0.9", 2],
        "top_k": [-1, 2.5, "10", True],
        "seed": [-1, 2**70, "1", 1.5],
        "n": [0, -2, 1000, "2", True],
        "stream": ["yes", 1, [True]],
        "stop": [5, [""], ["ok", 1], {"s": 1}],
        "logprobs": [-1, "2", 10**6, 2.5],
        "model": ["gpt-4", 7],
    }
    makers = [
        ("truncated JSON", lambda: json.dumps(good).encode()[: rng.randint(1, 20)]),
        ("fuzzed JSON", lambda: bytes(b if rng.random() > 0.15 else rng.choice(b'{}[]",:\\x0')
                                      for b in json.dumps(good).encode()) + b"{"),
        ("random bytes", lambda: bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))),
        ("invalid UTF-8", lambda: b'{"prompt": "ROM' + rng.choice([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x80"])
         + b'", "max_tokens": 8}'),
        ("not an object", lambda: rng.choice([b"[]", b"3", b'"prompt"', b"null", b"true", b"[{}]"])),
        ("missing prompt", lambda: json.dumps({"max_tokens": 8, "temperature": 0.5}).encode()),
        ("non-finite number", lambda: b'{"prompt": "A", "temperature": ' + rng.choice([b"NaN", b"Infinity",
                                                                                      b"-Infinity"]) + b"}"),
        ("deep nesting", lambda: b"[" * rng.randint(10_000, 200_000)),
        ("prompt too long", lambda: json.dumps({"prompt": "a" * (block_size + rng.randint(1, 500))}).encode()),
        ("unknown character", lambda: json.dumps({"prompt": "ROMEO \u20ac\u4e2d"}).encode()),
        ("empty body", lambda: b""),
    ]
    for key, values in wrong_values.items():
        for v in values:
            makers.append((f"wrong {key}", lambda key=key, v=v: json.dumps({**good, key: v}).encode()))
    out: list[tuple[str, bytes, dict]] = []
    big = b'{"prompt": "' + b"a" * (1 << 20) + b'"}'
    for i in range(count):
        if i % 25 == 0:
            out.append(("oversized body", big, {}))
        elif i % 25 == 1:
            out.append(("oversized body, chunked", big, {"chunked": True}))
        else:
            kind, make = makers[i % len(makers)]
            out.append((kind, make(), {}))
    return out


async def bad_input(url: str, bodies: list[tuple[str, bytes, dict]]) -> list[str]:
    failures: list[str] = []
    sem = asyncio.Semaphore(16)
    async with httpx.AsyncClient(timeout=httpx.Timeout(60.0)) as client:

        async def send(kind: str, body: bytes, extra: dict) -> None:
            async with sem:
                content: bytes | object = body
                if extra.get("chunked"):
                    async def chunks():
                        for i in range(0, len(body), 65536):
                            yield body[i : i + 65536]
                    content = chunks()
                try:
                    r = await client.post(f"{url}/v1/completions", content=content,
                                          headers={"content-type": "application/json"})
                    err = r.json().get("error", {})
                    if not (400 <= r.status_code < 500 and isinstance(err.get("message"), str)):
                        failures.append(f"{kind}: HTTP {r.status_code} {r.text[:120]}")
                except (httpx.HTTPError, ValueError) as e:
                    failures.append(f"{kind}: {type(e).__name__}: {e}")

        await asyncio.gather(*(send(*b) for b in bodies))
    return failures


# --- scenarios and report ---------------------------------------------------------------------

def scenario(url: str, mix: list[list[dict]], time_limit: float) -> dict:
    """One load on one server: served tokens/s, TTFT and latency percentiles (ms), errors."""
    results, wall = asyncio.run(asyncio.wait_for(load(url, mix), time_limit))
    good = [r for r in results if not r["error"]]
    first = [r["first"] * 1000 for r in good if r["first"] is not None]
    lat = [r["latency"] * 1000 for r in good]
    return {"tps": sum(r["tokens"] for r in good) / wall, "wall": wall, "n": len(results),
            "ttft50": pct(first, 50) if first else float("nan"), "ttft99": pct(first, 99) if first else float("nan"),
            "lat50": pct(lat, 50) if lat else float("nan"), "lat99": pct(lat, 99) if lat else float("nan"),
            "errors": [r["error"] for r in results if r["error"]]}


def print_scenarios(figures: dict[str, dict[str, dict]], servers: list[str]) -> None:
    cols = [("served tokens/s", "tps", ".0f"), ("TTFT p50 ms", "ttft50", ".0f"), ("TTFT p99 ms", "ttft99", ".0f"),
            ("latency p50 ms", "lat50", ".0f"), ("latency p99 ms", "lat99", ".0f")]
    head = "| scenario | figure | " + " | ".join(servers) + (" | new / base |" if len(servers) > 1 else " |")
    print(head)
    print("| --- | --- | " + " | ".join("---:" for _ in servers) + (" | ---: |" if len(servers) > 1 else " |"))
    for name, per_server in figures.items():
        for label, key, fmt in cols:
            values = [per_server[s][key] for s in servers]
            row = f"| {name} | {label} | " + " | ".join(f"{v:{fmt}}" for v in values)
            print(row + (f" | **{values[1] / values[0]:.2f}x** |" if len(values) > 1 else " |"))
        errors = [len(per_server[s]["errors"]) for s in servers]
        print(f"| {name} | errors | " + " | ".join(map(str, errors)) + (" | |" if len(servers) > 1 else " |"))
    print("\nserved tokens/s of each round: " + "; ".join(
        f"{name} on {s} " + ", ".join(f"{v:.0f}" for v in per[s]["all_tps"]) for name, per in figures.items()
        for s in servers))
    if "mixed" in figures and "identical" in figures:
        s = servers[-1]
        print(f"\n{s}: mixed settings at {figures['mixed'][s]['tps'] / figures['identical'][s]['tps']:.0%} "
              f"of identical settings' tokens/s")


def run_scenarios(run_dir: Path, args: argparse.Namespace, scenarios: dict[str, list[list[dict]]]
                  ) -> tuple[dict[str, dict[str, dict]], list[str], tuple[subprocess.Popen, str]]:
    """Every scenario on every server, `args.rounds` times (the order of the servers alternates
    from one load to the next); each figure the median over the rounds, errors of all rounds."""
    trees = {"new": ROOT} if not args.base_tree else {"base": Path(args.base_tree).resolve(), "new": ROOT}
    servers = list(trees)
    procs = {name: start_server(run_dir, tree) for name, tree in trees.items()}
    runs: dict[str, dict[str, list[dict]]] = {name: {s: [] for s in servers} for name in scenarios}
    try:
        k = 0
        for r in range(args.rounds):
            for name, mix in scenarios.items():
                for server in servers if k % 2 == 0 else servers[::-1]:
                    runs[name][server].append(scenario(procs[server][1], mix, args.time_limit))
                    print(f"  round {r + 1}: {name} on {server}: done", flush=True)
                k += 1
    finally:
        for name in servers:
            if name != "new":
                stop(procs[name][0])
    figures = {name: {s: median_figures(got) for s, got in per.items()} for name, per in runs.items()}
    return figures, servers, procs["new"]


def median_figures(rounds: list[dict]) -> dict:
    out = {key: statistics.median(r[key] for r in rounds) for key in rounds[0] if key != "errors"}
    out["errors"] = [e for r in rounds for e in r["errors"]]
    out["all_tps"] = [r["tps"] for r in rounds]
    return out


def stop(proc: subprocess.Popen) -> int | str:
    proc.send_signal(signal.SIGINT)
    try:
        return proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        return "killed"


def metrics_parse(url: str) -> bool:
    """/metrics is Prometheus text: every sample line a name and a number, TYPE lines known."""
    r = httpx.get(f"{url}/metrics", timeout=10)
    try:
        for line in r.text.splitlines():
            if line.startswith("# TYPE "):
                assert line.split(" ")[3] in ("counter", "gauge", "histogram")
            elif line and not line.startswith("#"):
                float(line.rsplit(" ", 1)[1])
    except (AssertionError, IndexError, ValueError):
        return False
    return r.status_code == 200 and "quill_generated_tokens_total" in r.text


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", help="run directory to serve (default: train a small one)")
    ap.add_argument("--save-run", help="keep the small run trained here in this directory")
    ap.add_argument("--base-tree", help="a checkout of the package to compare with (served from there)")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=24, help="requests per client (default 24: some 10 s per load)")
    ap.add_argument("--lone", type=int, default=64, help="requests of the one-client-at-a-time scenario (default 64)")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=3, help="times each load runs on each server (medians)")
    ap.add_argument("--malformed", type=int, default=200)
    ap.add_argument("--time-limit", type=float, default=600, help="seconds for each load and the bad input")
    ap.add_argument("--quick", action="store_true", help="4 clients x 3 requests, 4 lone, 50 malformed, 1 round")
    args = ap.parse_args()
    if args.quick:
        args.clients, args.requests, args.lone, args.malformed, args.rounds = 4, 3, 4, 50, 1

    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        run_dir = Path(args.run) if args.run else train_small_run(Path(args.save_run or tmp),
                                                                      Path(args.base_tree or ROOT).resolve())
        train_s = time.perf_counter() - t
        run = load_run(run_dir)
        m = run.config.model
        print(f"machine: {machine()}")
        trained = "" if args.run else f" (trained here, {train_s:.0f} s)"
        print(f"model: {run_dir} - {count_params(run.model):,} parameters, {m.n_layer} layers, "
              f"n_embd {m.n_embd}, context {m.block_size}, vocabulary {m.vocab_size}{trained}")
        scenarios = {"lone": request_mix(1, args.lone, args.max_tokens, mixed=True, seed=1),
                     "identical": request_mix(args.clients, args.requests, args.max_tokens, mixed=False),
                     "mixed": request_mix(args.clients, args.requests, args.max_tokens, mixed=True)}
        figures, servers, (proc, url) = run_scenarios(run_dir, args, scenarios)
        try:
            bodies = malformed_bodies(args.malformed, m.vocab_size, m.block_size)
            t = time.perf_counter()
            failures = asyncio.run(asyncio.wait_for(bad_input(url, bodies), args.time_limit))
            bad_s = time.perf_counter() - t
            health = httpx.get(f"{url}/health", timeout=10).json()
            metrics_ok = metrics_parse(url)
            after = httpx.post(f"{url}/v1/completions", json={"prompt": "ROMEO:", "max_tokens": 8}, timeout=60)
            alive = proc.poll() is None
        finally:
            code = stop(proc)

        print(f"\nload: lone = 1 client x {args.lone} requests; identical / mixed = {args.clients} clients x "
              f"{args.requests} requests; max_tokens {args.max_tokens} (mixed: {args.max_tokens // 2} to "
              f"{args.max_tokens * 3 // 2}, the same total per client); every request streamed; loopback\n")
        print_scenarios(figures, servers)
        errors = [e for per in figures.values() for f in per.values() for e in f["errors"]]
        print(f"errors: {len(errors)}")
        for e in errors[:10]:
            print("  ", e)
        kinds = sorted({k for k, _, _ in bodies})
        print(f"\nbad input: {len(bodies)} malformed requests ({len(kinds)} kinds) in {bad_s:.1f} s: "
              f"{len(bodies) - len(failures)} answered 4xx JSON errors, {len(failures)} not")
        for f in failures[:10]:
            print("  ", f)
        print(f"afterwards: /health {health.get('status')!r} (completed {health.get('completed')}, "
              f"cancelled {health.get('cancelled')}), /metrics parses {metrics_ok}, completion HTTP "
              f"{after.status_code}, server alive {alive}, exit status after Ctrl-C {code}")
        ok = (not errors and not failures and health.get("status") == "ok" and after.status_code == 200
              and alive and code == 0 and metrics_ok)
        print(f"machine: {machine()}")
        print("PASS" if ok else "FAIL")
        return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
