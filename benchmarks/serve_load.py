"""Load and bad input against `quill serve` on loopback, with a small model.

1. Trains a small char-level GPT on tiny-shakespeare (or uses --run) and starts `quill serve` in
   its own process on a free loopback port.
2. Baseline, measured in the same run: the same request mix through `generate()` in process,
   one request at a time (no HTTP, no queue) - the work the server has to do.
3. Load: CLIENTS concurrent clients x REQUESTS requests each, every other one streamed (SSE).
   Every answer is checked (status 200, OpenAI shape, `data: [DONE]` last, token counts); latency
   p50/p90/p99 (and time to first chunk for streams), requests/s and generated tokens/s.
4. Bad input: MALFORMED requests (broken and fuzzed JSON, wrong types, huge and non-finite
   numbers, invalid UTF-8, oversized bodies with and without Content-Length, deep nesting, ...),
   each must be answered by a 4xx JSON error; then /health must say ok and a normal completion
   must work; then Ctrl-C must stop the server cleanly.
Exits 1 if anything failed. Everything is bounded: --time-limit seconds in all.

    flock /tmp/quill-bench.lock .venv/bin/python benchmarks/serve_load.py [--run RUN] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import re
import signal
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
from quillgpt.checkpoint import load_run  # noqa: E402
from quillgpt.config import load_config  # noqa: E402
from quillgpt.generate import generate  # noqa: E402
from quillgpt.model import count_params  # noqa: E402
from quillgpt.train import Trainer  # noqa: E402

SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
PROMPTS = ["ROMEO:", "JULIET:\nO ", "First Citizen:\n", "KING HENRY", "To be, or not", "\n", "", "What "]


def machine() -> str:
    cpu = cpu_name()
    import os

    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, Python {platform.python_version()}"


def train_small_run(out: Path) -> Path:
    """A small char-level GPT (2 layers, 64 wide, context 64): 100 steps on tiny-shakespeare."""
    data = SHAKESPEARE
    if not data.is_file():
        data = out / "verse.txt"
        data.write_text("To be, or not to be, that is the question:\n" * 500, encoding="utf-8")
    cfg = load_config(None, {"data": str(data), "out": str(out / "run"), "n_layer": 2, "n_head": 2,
                             "n_embd": 64, "block_size": 64, "batch_size": 16, "max_iters": 100,
                             "eval_interval": 50, "eval_iters": 5, "warmup_iters": 10,
                             "device": "cpu", "sample_tokens": 0})
    Trainer(cfg, progress=False, log=lambda msg: None).run()
    return out / "run"


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q / 100 * len(values) + 0.5) - 1))]


def request_mix(clients: int, requests: int, max_tokens: int) -> list[list[dict]]:
    """Each client's requests: a prompt, a seed, a temperature; every other one streamed."""
    rng = random.Random(0)
    return [[{"prompt": rng.choice(PROMPTS), "max_tokens": max_tokens, "seed": c * 1000 + i,
              "temperature": rng.choice([0.0, 0.7, 1.0]), "top_k": rng.choice([None, 20]),
              "stream": (c + i) % 2 == 0}
             for i in range(requests)] for c in range(clients)]


# --- the server in its own process ---------------------------------------------------------

def start_server(run_dir: Path) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "quillgpt.cli", "serve", str(run_dir), "--port", "0",
                             "--device", "cpu", "--log-level", "warning"],
                            stderr=subprocess.PIPE, text=True, cwd=ROOT)
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
        "logprobs": [1, 5],
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


# --- report --------------------------------------------------------------------------------

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", help="run directory to serve (default: train a small one)")
    ap.add_argument("--save-run", help="keep the small run trained here in this directory")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--requests", type=int, default=20, help="requests per client")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--malformed", type=int, default=200)
    ap.add_argument("--baseline", type=int, default=64, help="requests in the in-process baseline")
    ap.add_argument("--time-limit", type=float, default=600, help="seconds for the load and bad-input phases")
    ap.add_argument("--quick", action="store_true", help="8 clients x 5 requests, 50 malformed")
    args = ap.parse_args()
    if args.quick:
        args.clients, args.requests, args.malformed, args.baseline = 8, 5, 50, 16

    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        run_dir = Path(args.run) if args.run else train_small_run(Path(args.save_run or tmp))
        train_s = time.perf_counter() - t
        run = load_run(run_dir)
        m = run.config.model
        print(f"machine: {machine()}")
        trained = "" if args.run else f" (trained here, {train_s:.0f} s)"
        print(f"model: {run_dir} - {count_params(run.model):,} parameters, {m.n_layer} layers, "
              f"n_embd {m.n_embd}, context {m.block_size}, vocabulary {m.vocab_size}{trained}")

        mix = request_mix(args.clients, args.requests, args.max_tokens)
        flat = [b for bodies in mix for b in bodies]
        # baseline: the same kind of requests through generate() in this process, one at a time
        torch.set_num_threads(torch.get_num_threads())
        base_tokens, t = 0, time.perf_counter()
        for b in flat[: args.baseline]:
            text = generate(run.model, run.tokenizer, b["prompt"], max_new_tokens=b["max_tokens"],
                            temperature=b["temperature"], top_k=b["top_k"], seed=b["seed"])
            base_tokens += len(run.tokenizer.encode(text))
        base_s = time.perf_counter() - t
        base_tps = base_tokens / base_s
        base_latency = base_s / args.baseline

        proc, url = start_server(run_dir)
        ok = True
        try:
            deadline = time.monotonic() + args.time_limit
            results, wall = asyncio.run(asyncio.wait_for(load(url, mix), args.time_limit))
            errors = [r["error"] for r in results if r["error"]]
            good = [r for r in results if not r["error"]]
            tokens = sum(r["tokens"] for r in good)
            lat = {s: [r["latency"] * 1000 for r in good if r["stream"] == s] for s in (False, True)}
            first = [r["first"] * 1000 for r in good if r["stream"] and r["first"] is not None]

            bodies = malformed_bodies(args.malformed, m.vocab_size, m.block_size)
            remaining = max(1.0, deadline - time.monotonic())
            t = time.perf_counter()
            failures = asyncio.run(asyncio.wait_for(bad_input(url, bodies), remaining))
            bad_s = time.perf_counter() - t
            health = httpx.get(f"{url}/health", timeout=10).json()
            after = httpx.post(f"{url}/v1/completions", json={"prompt": "ROMEO:", "max_tokens": 8}, timeout=60)
            alive = proc.poll() is None
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                code = proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                code = "killed"

        n = len(results)
        print(f"\nload: {args.clients} clients x {args.requests} requests ({n} requests, half streamed), "
              f"max_tokens {args.max_tokens}, loopback")
        print(f"{'':<34}{'p50 ms':>10}{'p90 ms':>10}{'p99 ms':>10}{'n':>6}")
        for name, xs in (("latency, non-streamed", lat[False]), ("latency, streamed (to [DONE])", lat[True]),
                         ("streamed: time to first chunk", first)):
            if xs:
                print(f"{name:<34}{pct(xs, 50):>10.0f}{pct(xs, 90):>10.0f}{pct(xs, 99):>10.0f}{len(xs):>6}")
        served_tps = tokens / wall
        print(f"\n{'':<44}{'served':>12}{'generate() alone':>18}{'ratio':>8}")
        print(f"{'generated tokens/s':<44}{served_tps:>12.0f}{base_tps:>18.0f}{served_tps / base_tps:>8.2f}")
        print(f"{'requests/s':<44}{n / wall:>12.1f}{1 / base_latency:>18.1f}{n / wall * base_latency:>8.2f}")
        print(f"wall {wall:.1f} s for the load; baseline: {args.baseline} requests one at a time in process "
              f"({base_s:.1f} s)")
        print(f"errors: {len(errors)} of {n}")
        for e in errors[:10]:
            print("  ", e)
        kinds = sorted({k for k, _, _ in bodies})
        print(f"\nbad input: {len(bodies)} malformed requests ({len(kinds)} kinds) in {bad_s:.1f} s: "
              f"{len(bodies) - len(failures)} answered 4xx JSON errors, {len(failures)} not")
        for f in failures[:10]:
            print("  ", f)
        print(f"afterwards: /health {health.get('status')!r} (completed {health.get('completed')}, "
              f"cancelled {health.get('cancelled')}), completion HTTP {after.status_code}, "
              f"server alive {alive}, exit status after Ctrl-C {code}")
        ok = (not errors and not failures and health.get("status") == "ok" and after.status_code == 200
              and alive and code == 0 and n == args.clients * args.requests)
        print("PASS" if ok else "FAIL")
        return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
