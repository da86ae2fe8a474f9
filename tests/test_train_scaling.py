"""Mixed precision, dtype auto, compile fallback, time budget, MFU, TensorBoard, loss.png."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from quillgpt.cli import main
from quillgpt.config import load_config, parse_duration
from quillgpt.distributed import DistInfo
from quillgpt.errors import QuillError
from quillgpt.train import Trainer, lr_at, resolve_dtype

SMALL = {"n_layer": 2, "n_head": 2, "n_embd": 64, "block_size": 32, "dropout": 0.0, "batch_size": 8,
         "learning_rate": 3e-3, "min_lr": 3e-4, "warmup_iters": 5, "eval_interval": 40, "eval_iters": 4,
         "log_interval": 10, "sample_tokens": 0, "device": "cpu", "seed": 11}


def cfg_for(data: Path, out: Path, **extra):
    return load_config(None, dict(SMALL, data=str(data), out=str(out), **extra))


def quiet(msg: str) -> None:
    pass


@pytest.fixture
def one_thread():
    """Small models on a shared 2-core machine: one thread is faster and far steadier (two
    OpenMP threads stall at every barrier when another process takes a core)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def metrics(run: Path) -> list[dict[str, str]]:
    with open(run / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_bf16_on_cpu_reaches_the_fp32_loss_within_2_percent(small_text, tmp_path, one_thread):
    fp32 = Trainer(cfg_for(small_text, tmp_path / "a", max_iters=80, dtype="float32"), save=False,
                   progress=False, log=quiet).run()
    bf16 = Trainer(cfg_for(small_text, tmp_path / "b", max_iters=80, dtype="bfloat16"), save=False,
                   progress=False, log=quiet).run()
    assert fp32.val_loss < 2.6  # it learned something (starts near ln(32) = 3.47)
    assert abs(bf16.val_loss - fp32.val_loss) / fp32.val_loss < 0.02
    assert bf16.losses != fp32.losses  # autocast really ran in bf16


def test_autocast_runs_matmuls_in_bf16_on_cpu():
    from quillgpt.train import autocast_context

    a = torch.randn(4, 4)
    with autocast_context(torch.device("cpu"), "bfloat16"):
        assert (a @ a).dtype == torch.bfloat16
    with autocast_context(torch.device("cpu"), "float32"):
        assert (a @ a).dtype == torch.float32


def test_dtype_auto_picks_bf16_where_the_cpu_has_it():
    native = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu, n_embd=384) == ("bfloat16" if native else "float32")
    assert resolve_dtype("auto", cpu, n_embd=128) == "float32"  # too narrow for bf16 to pay
    assert resolve_dtype("float16", torch.device("cpu")) == "float16"
    with pytest.raises(QuillError, match="auto"):
        load_config(None, {"dtype": "fp8"})


def test_bf16_on_a_cpu_without_it_warns(small_text, tmp_path, monkeypatch):
    import quillgpt.runtime as runtime
    import quillgpt.train as train

    monkeypatch.setattr(runtime, "native_bfloat16", lambda device: False)
    for dtype, warned in (("bfloat16", True), ("float32", False)):
        lines: list[str] = []
        Trainer(cfg_for(small_text, tmp_path / dtype, max_iters=1, dtype=dtype), save=False,
                progress=False, log=lines.append)
        assert any("no native bfloat16" in line for line in lines) is warned, lines
    assert resolve_dtype("auto", torch.device("cpu"), n_embd=1024) == "float32"
    for dtype in ("bfloat16", "float32"):  # a CPU has no documented peak: FLOP/s, no MFU
        assert train.peak_flops(torch.device("cpu"), dtype) is None


class BrokenCompile(torch.nn.Module):
    """What torch.compile returns, failing on its first call with `error`."""

    def __init__(self, module, error: Exception):
        super().__init__()
        self._orig_mod, self.error = module, error

    def forward(self, *args):
        raise self.error


def test_compile_failure_falls_back_to_eager_with_a_message(small_text, tmp_path, monkeypatch):
    from torch._inductor.exc import InvalidCxxCompiler

    monkeypatch.setattr(torch, "compile", lambda m: BrokenCompile(m, InvalidCxxCompiler()))
    logs: list[str] = []
    result = Trainer(cfg_for(small_text, tmp_path / "r", max_iters=4, compile=True), save=False,
                     progress=False, log=logs.append).run()
    assert result.steps == 4
    assert any("torch.compile failed (InvalidCxxCompiler: No working C++ compiler found" in m for m in logs), logs


def model_errors():
    """Errors of the model itself, met on the first compiled call: none is a compiler error."""
    from torch._dynamo.exc import BackendCompilerFailed, TorchRuntimeError

    oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    return [
        (RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x8 and 9x3)"), RuntimeError, "shapes cannot"),
        (TorchRuntimeError("RuntimeError when making fake tensor call: shapes"), TorchRuntimeError, "fake tensor"),
        (oom, QuillError, "CUDA out of memory with batch_size 8"),
        (BackendCompilerFailed(lambda *a: None, oom, None), QuillError, "CUDA out of memory with batch_size 8"),
    ]


@pytest.mark.parametrize("error, raised, message", model_errors(), ids=["shape", "traced", "oom", "oom-in-compiler"])
def test_only_compiler_errors_fall_back_to_eager(small_text, tmp_path, monkeypatch, error, raised, message):
    """A shape bug or out-of-memory on the first compiled step is raised as it is (out of memory
    becomes the one-line advice), never retried eagerly as if the compiler had failed."""
    monkeypatch.setattr(torch, "compile", lambda m: BrokenCompile(m, error))
    logs: list[str] = []
    trainer = Trainer(cfg_for(small_text, tmp_path / "r", max_iters=4, compile=True), save=False,
                      progress=False, log=logs.append)
    with pytest.raises(raised, match=message):
        trainer.run()
    assert not any("torch.compile failed" in m for m in logs), logs


def test_parse_duration():
    assert parse_duration("90s") == 90 and parse_duration("5m") == 300 and parse_duration("1.5h") == 5400
    assert parse_duration("42") == 42
    for bad in ("", "5x", "-1m", "m", "0s"):
        with pytest.raises(QuillError, match="time_budget"):
            parse_duration(bad)


def test_time_budget_fits_the_run_and_its_lr_decay(small_text, tmp_path, one_thread):
    """The budget reads a clock driven by the trainer's own progress (each step costs 50 ms of
    budget), so the plan, and this test, are the same on any machine under any load."""
    from quillgpt.train_control import TimeBudget

    budget = 8.0

    def run(name: str, step_s: float, eval_s: float) -> tuple[int, float, Path]:
        cfg = cfg_for(small_text, tmp_path / name, max_iters=1_000_000, time_budget=f"{budget}s",
                      log_interval=5, eval_interval=50)
        trainer = Trainer(cfg, progress=False, log=quiet)
        evals: list[int] = []
        trainer.evaluator.hooks.append(EvalCounter(evals))
        clock = lambda: step_s * trainer.step + eval_s * len(evals)
        trainer.budget = TimeBudget(cfg.train.time_budget, 0.0, clock=clock)
        result = trainer.run()
        # the schedule was fitted to the steps taken: the last step ran at (nearly) min_lr
        t = cfg.train
        assert t.max_iters == result.steps == t.lr_decay_iters
        assert lr_at(result.steps - 1, cfg) - t.min_lr < 0.05 * (t.learning_rate - t.min_lr)
        assert float(metrics(tmp_path / name)[-1]["lr"]) < t.min_lr + 0.05 * (t.learning_rate - t.min_lr)
        return result.steps, clock(), tmp_path / name

    # 8 s less the 3% reserve, at 50 ms a step
    steps, spent, _ = run("free-evals", 0.05, 0.0)
    assert abs(steps - int(budget * 0.97 / 0.05)) <= 1 and spent <= budget
    # evaluations of 1 s each: the plan reserves two of them and counts them in the time per step
    fewer, spent, _ = run("slow-evals", 0.05, 1.0)
    assert 50 < fewer < steps - 40 and spent <= budget


class EvalCounter:
    """An evaluation hook that only counts the evaluations (the fake clock charges for them)."""

    interval = 1

    def __init__(self, seen: list[int]):
        self.seen = seen

    def __call__(self, model, step: int) -> dict[str, float]:
        self.seen.append(step)
        return {}


def test_metrics_have_model_flops_and_tensorboard_logs(small_text, tmp_path):
    """Achieved model FLOP/s on every timed row; no MFU on a CPU (no documented peak to divide by,
    so no percentage that a busy machine could push past 100%)."""
    run = tmp_path / "r"
    trainer = Trainer(cfg_for(small_text, run, max_iters=20, tensorboard=True), progress=False, log=quiet)
    trainer.run()
    assert [r["step"] for r in metrics(run)] == ["0", "10", "20"]
    for row in trainer.metrics[1:]:
        flops = float(row["flops_per_s"])
        assert flops == pytest.approx(float(row["tokens_per_s"]) * trainer.recorder.flops_per_token, rel=1e-3)
        assert row["mfu"] is None
    assert "flops_per_s" not in metrics(run)[0]  # metrics.csv keeps its columns
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))


def test_mfu_only_against_a_documented_gpu_peak_and_never_above_100_percent(monkeypatch):
    from quillgpt.metrics import GPU_PEAK_FLOPS, RunRecorder, format_flops, peak_flops

    cuda = torch.device("cuda")
    # (name, bf16, float16, float32): float32 runs on TF32 tensor cores where the GPU has them
    # (the loop turns TF32 on); Volta and Turing have none, and no bf16, so their fp32 rate counts
    for name, bf16, fp16, fp32 in (("NVIDIA H100 80GB HBM3", 989e12, 989e12, 494.5e12),
                                   ("NVIDIA A100-SXM4-80GB", 312e12, 312e12, 156e12),
                                   ("Tesla V100-SXM2-16GB", None, 125e12, 15.7e12),
                                   ("Tesla T4", None, 65e12, 8.1e12),
                                   ("NVIDIA GeForce RTX 4090", 165e12, 165e12, 82.6e12),
                                   ("NVIDIA A10G", None, None, None), ("NVIDIA L40", None, None, None),
                                   ("AMD Instinct MI300X", None, None, None)):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device, name=name: name)
        assert (peak_flops(cuda, "bfloat16"), peak_flops(cuda, "float16"), peak_flops(cuda, "float32")) == \
            (bf16, fp16, fp32), name
    assert GPU_PEAK_FLOPS["H200"] == GPU_PEAK_FLOPS["H100"]
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "NVIDIA H100 80GB HBM3")

    class Log:
        tensorboard = None

    said: list[str] = []
    rec = RunRecorder(Log(), None, DistInfo(), Path("."), False, cuda, "bfloat16", flops_per_token=1e9,
                      log=said.append)
    assert rec.mfu(100_000.0) == pytest.approx(1e14 / 989e12) and not said
    # 2e15 FLOP/s would be 202%: the table's entry does not fit; no MFU, and the run says which entry
    assert rec.mfu(2_000_000.0) is None and rec.mfu(3_000_000.0) is None
    assert said == ["warning: MFU would be 202%: 2000.0 TFLOP/s achieved against the peak 989.0 TFLOP/s of "
                    "GPU_PEAK_FLOPS['H100'] (bfloat16) in quillgpt/metrics.py, which does not fit this "
                    "device; no MFU is shown"]
    assert format_flops(2e15) == "2000.0 TFLOP/s" and format_flops(8.12e11) == "812 GFLOP/s"


def test_loss_png_written_at_the_end_and_by_quill_plot(small_text, tmp_path, capsys):
    run = tmp_path / "r"
    Trainer(cfg_for(small_text, run, max_iters=20), progress=False, log=quiet).run()
    png = run / "loss.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    png.unlink()
    assert main(["plot", str(run)]) == 0
    assert png.stat().st_size > 10_000
    assert main(["plot", str(run), "--output", str(tmp_path / "x.png")]) == 0
    assert (tmp_path / "x.png").is_file()
    assert main(["plot", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("quill: error:") and "metrics.csv" in err[-1]
