"""benchmarks/gpu_check.py --smoke: every part of the GPU check runs its code on the CPU with tiny
shapes, so the script cannot rot between the rare runs on a GPU; a part that fails or hangs is
one line in the report and the script still reaches its end."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "gpu_check.py"
BACKENDS = {"flash", "flash (CPU)", "mem-efficient", "cudnn", "math", "overrideable"}


def run_check(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "check.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(out), *args], cwd=REPO,
                          capture_output=True, text=True)
    return proc, json.loads(out.read_text(encoding="utf-8"))


def check_gpt2(g: dict) -> None:
    assert g["flops_per_token"] > 6 * g["params"] > 0  # the weights' 6 N plus attention
    assert g["eager"]["flash_only"] == "works"
    assert g["compiled"]["compile_fallback"] is None
    for variant in ("eager", "compiled", "compiled_at_largest"):
        v = g[variant]
        assert v["tokens_per_s"] > 0 and v["steps_timed"] == 3 and math.isfinite(v["loss"])
        assert v["mfu"] is None or 0 < v["mfu"] < 1
        assert set(v["sdpa"]["backend"].split(", ")) <= BACKENDS, v["sdpa"]
    # no out-of-memory on a CPU: the doubling search runs to its bound
    assert g["largest_micro_batch"] == g["micro_batch_bound"] == 8
    assert list(g["micro_batch_trials"]) == ["2", "4", "8"]


def check_shakespeare(s: dict) -> None:
    curve = s["val_curve"]
    assert s["steps"] == 20 and [step for step, _, _ in curve] == [0, 10, 20]
    assert curve[-1][2] == pytest.approx(s["val_loss"], abs=1e-5)  # metrics.csv keeps 6 decimals
    assert s["val_loss"] < curve[0][2]  # it trained
    assert s["compile_fallback"] is None and s["wall_s"] > 0 and s["tokens_per_s"] > 0


def check_generate(g: dict) -> None:
    assert g["logits_max_abs_diff_fp32"] < 1e-4  # transformers holds the same weights
    for batch in ("batch_1", "batch_4"):
        for name in ("quillgpt", "transformers"):
            assert g[batch][name]["tokens_per_s"] > 0 and g[batch][name]["ttft_ms"] > 0
        assert g[batch]["speedup_vs_transformers"] > 0


def test_smoke_run_measures_every_part(small_text, tmp_path):
    proc, report = run_check(tmp_path, "--data", str(small_text))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    parts = report["parts"]
    assert list(parts) == ["gpt2", "shakespeare", "generate", "resume"]
    assert [name for name, r in parts.items() if "error" in r] == []
    assert report["machine"]["torch"] == torch.__version__ and report["smoke"] is True
    check_gpt2(parts["gpt2"])
    check_shakespeare(parts["shakespeare"])
    check_generate(parts["generate"])
    resume = parts["resume"]["deterministic"]
    assert resume["resume_losses_bitwise"] and resume["resume_weights_bitwise"] and resume["rerun_losses_bitwise"]
    assert resume["resume_losses_max_abs_diff"] == 0.0
    table = proc.stdout[proc.stdout.index("| part | figure | value |"):]
    for name in parts:
        assert f"\n| {name} | " in table


def test_a_failing_part_is_one_line_and_the_script_goes_on(tmp_path):
    proc, report = run_check(tmp_path, "--parts", "gpt2,generate", "--fail", "gpt2", "--hang", "generate",
                             "--cap", "generate=4")
    assert proc.returncode == 1
    parts = report["parts"]
    assert parts["gpt2"]["error"] == "RuntimeError: injected failure (--fail gpt2)"
    # the next part still ran, until its cap
    assert parts["generate"]["error"] == "time cap of 4 s reached (figures so far kept)"
    assert parts["generate"]["cap_s"] == 4.0
    failed = [line for line in proc.stdout.splitlines() if "FAILED" in line]
    assert len(failed) == 2 and "injected failure" in failed[0] and "time cap" in failed[1]
    assert "Traceback" not in proc.stdout + proc.stderr
    assert "| gpt2 | error | RuntimeError: injected failure (--fail gpt2) |" in proc.stdout
    assert "0/2 parts without error" in proc.stdout.splitlines()[-1]

    # the table again from the JSON
    again = subprocess.run([sys.executable, str(SCRIPT), "--table", str(tmp_path / "check.json")], cwd=REPO,
                           capture_output=True, text=True)
    assert again.returncode == 0
    assert again.stdout.strip() in proc.stdout


def test_without_a_gpu_the_full_check_refuses_in_one_line(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the full check would start")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path / "x.json")], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "gpu_check: error: no CUDA device (torch.cuda.is_available() is False); run with --smoke to check "
        "the script on a CPU"]
    assert not (tmp_path / "x.json").exists()
