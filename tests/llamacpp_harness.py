"""llama.cpp as a reference runtime for the GGUF tests and benchmarks/gguf.py.

llama.cpp comes from npm as node-llama-cpp 3.21.1, whose linux-x64 package ships a prebuilt CPU
build of llama.cpp (no compiler, no download at run time). It is installed once from the pinned
tests/llamacpp/package-lock.json into tests/llamacpp/node_modules, by `make llamacpp` or by the
first test that needs it (the same command, under a lock). Node 20+ and npm must be on PATH.

    llama = LlamaCpp()                                    # installs node-llama-cpp if needed
    llama.run("model.gguf", [{"op": "tokenize", "text": "Hello"}])   # [{"ids": [...]}]

The operations are those of tests/llamacpp/llama.mjs (tokenize, greedy, logprobs, chat,
template, decode_speed, meta); one call loads the model once and runs them in order.
"""

from __future__ import annotations

import fcntl
import json
import math
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

HARNESS = Path(__file__).resolve().parent / "llamacpp"
SCRIPT = HARNESS / "llama.mjs"
PACKAGE = HARNESS / "node_modules" / "node-llama-cpp" / "package.json"
VERSION = "3.21.1"
# The linux-x64 CPU binary only: the optional CUDA and Vulkan builds are hundreds of MB.
INSTALL = ["npm", "ci", "--omit=optional", "--ignore-scripts", "--no-audit", "--no-fund", "--loglevel=error"]


class LlamaCppError(RuntimeError):
    pass


def installed() -> bool:
    try:
        return json.loads(PACKAGE.read_text())["version"] == VERSION
    except (OSError, ValueError, KeyError):
        return False


def install() -> None:
    """node-llama-cpp into tests/llamacpp/node_modules (once; concurrent callers wait)."""
    if installed():
        return
    for tool in ("node", "npm"):
        if shutil.which(tool) is None:
            raise LlamaCppError(f"{tool} is not on PATH: the llama.cpp tests need Node.js 20+ and npm "
                                f"(Debian: apt-get install nodejs npm)")
    with open(HARNESS / ".install.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not installed():
            done = subprocess.run(INSTALL, cwd=HARNESS, capture_output=True, text=True)
            if done.returncode != 0 or not installed():
                raise LlamaCppError(f"npm ci in {HARNESS} failed: {(done.stderr or done.stdout)[-2000:]}")


class LlamaCpp:
    def __init__(self, threads: int = 1):
        install()
        self.threads = threads

    def run(self, model: str | Path, ops: list[dict[str, Any]], context: int = 256,
            timeout: float = 600) -> list[dict[str, Any]]:
        """Run `ops` on `model` in one llama.cpp process; their results, in order."""
        request = {"model": str(model), "threads": self.threads, "context": context, "ops": ops}
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            json.dump(request, f)
        try:
            done = subprocess.run(["node", str(SCRIPT), f.name], capture_output=True, text=True, timeout=timeout)
        finally:
            Path(f.name).unlink()
        if done.returncode != 0:
            raise LlamaCppError(f"llama.cpp failed on {model}: {done.stderr[-3000:]}")
        return json.loads(done.stdout)["results"]


def window_ops(ids: list[int], block_size: int) -> list[dict[str, Any]]:
    """logprobs ops over disjoint windows of `block_size` tokens (quill eval --stride block_size)."""
    return [{"op": "logprobs", "ids": ids[b:b + block_size]} for b in range(0, len(ids), block_size)
            if len(ids[b:b + block_size]) > 1]


def perplexity(results: list[dict[str, Any]]) -> tuple[float, int]:
    """(perplexity, tokens scored) of window_ops' results."""
    logprobs = [lp for r in results for lp in r["logprobs"]]
    return math.exp(-sum(logprobs) / len(logprobs)), len(logprobs)
