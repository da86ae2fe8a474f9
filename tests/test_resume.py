"""Exact resume: checkpoints in RUN/train_state/, interrupted-and-resumed runs equal uninterrupted
ones bit for bit on CPU, SIGTERM/SIGKILL fault injection, corrupt checkpoints, changed configs."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from quillgpt import checkpoint as ckpt
from quillgpt.checkpoint import pack_state, unpack_state
from quillgpt.cli import main
from quillgpt.config import load_config
from quillgpt.errors import QuillError
from quillgpt.train import Trainer, default_preset, resume_config

REPO = Path(__file__).resolve().parent.parent

# A tiny model with dropout, so the RNG state matters for exactness.
TINY = {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 16, "dropout": 0.1, "batch_size": 4,
        "learning_rate": 3e-3, "min_lr": 3e-4, "warmup_iters": 2, "eval_interval": 4, "eval_iters": 2,
        "log_interval": 2, "sample_tokens": 0, "device": "cpu", "seed": 7}


def tiny_cfg(data: Path, out: Path, **extra):
    values = dict(TINY, data=str(data), out=str(out))
    values.update(extra)
    return load_config(default_preset(values), values)  # as `quill train` without --config


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return ckpt.read_safetensors(run_dir / ckpt.MODEL_FILE)


def assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


def quiet(msg: str) -> None:
    pass


@pytest.fixture(autouse=True)
def one_thread():
    """One thread here and in the subprocesses (see env()): bitwise equality needs the same
    thread count everywhere, and tiny models on a shared 2-core machine run faster and steadier
    on one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_pack_state_round_trips_an_optimizer_state_without_pickles():
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    state = {"optimizer": opt.state_dict(), "rng": (3, tuple(range(5)), None), "inf": float("inf")}
    skeleton, tensors = pack_state(state)
    json.dumps(skeleton)  # JSON-able: no pickles anywhere
    back = unpack_state(json.loads(json.dumps(skeleton)), tensors)
    assert back["rng"] == (3, tuple(range(5)), None) and back["inf"] == float("inf")
    opt2 = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt2.load_state_dict(back["optimizer"])
    for p in model.parameters():
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt.state[p][key], opt2.state[p][key])


def test_resume_is_bitwise_identical(small_text, tmp_path):
    full = Trainer(tiny_cfg(small_text, tmp_path / "full", max_iters=12, lr_decay_iters=12),
                   progress=False, log=quiet).run()

    # the same run, stopped at step 6 and resumed to 12 (same schedule: lr_decay_iters 12)
    part = tmp_path / "part"
    Trainer(tiny_cfg(small_text, part, max_iters=6, lr_decay_iters=12, checkpoint_interval=3),
            progress=False, log=quiet).run()
    assert [p.name for p in ckpt.list_checkpoints(part)] == ["step-00000003", "step-00000006"]
    cfg = resume_config(part, overrides={"max_iters": 12}, allow_config_change=True)
    resumed = Trainer(cfg, progress=False, log=quiet, resume=part).run()

    assert resumed.losses == full.losses  # exactly, every step
    assert_identical(weights(part), weights(tmp_path / "full"))
    assert resumed.val_loss == full.val_loss


def test_resume_from_an_older_checkpoint_is_identical(small_text, tmp_path):
    # checkpoints at 5 and 10, logs every 2 steps: step 5 falls between two logs
    full = Trainer(tiny_cfg(small_text, tmp_path / "full", max_iters=10, checkpoint_interval=5,
                            keep_last=3), progress=False, log=quiet).run()
    run = tmp_path / "full"
    # throw away the newest checkpoint: the run continues from step 5 to 10 again
    for p in ckpt.list_checkpoints(run)[-1:]:
        for f in p.iterdir():
            f.unlink()
        p.rmdir()
    assert ckpt.list_checkpoints(run)[-1].name == "step-00000005"
    assert len(ckpt.load_train_state(run).state["losses"]) == 5
    first = weights(run)
    again = Trainer(resume_config(run), progress=False, log=quiet, resume=run).run()
    assert again.losses == full.losses
    assert_identical(weights(run), first)


def test_keep_last_prunes_old_checkpoints_but_keeps_the_best(small_text, tmp_path):
    Trainer(tiny_cfg(small_text, tmp_path / "r", max_iters=12, checkpoint_interval=2, keep_last=2),
            progress=False, log=quiet).run()
    names = [p.name for p in ckpt.list_checkpoints(tmp_path / "r")]
    assert names[-2:] == ["step-00000010", "step-00000012"]
    assert len(names) <= 3
    # no leftovers of temporary directories
    assert not [p for p in (tmp_path / "r" / ckpt.TRAIN_STATE_DIR).iterdir() if p.name.startswith(".")]


def test_corrupt_latest_checkpoint_falls_back_with_a_warning(small_text, tmp_path, capsys):
    run = tmp_path / "r"
    Trainer(tiny_cfg(small_text, run, max_iters=8, checkpoint_interval=4), progress=False, log=quiet).run()
    latest = ckpt.list_checkpoints(run)[-1]
    data = bytearray((latest / ckpt.MODEL_FILE).read_bytes())
    data[-5] ^= 0xFF  # one flipped bit pattern in a weight
    (latest / ckpt.MODEL_FILE).write_bytes(bytes(data))
    warnings: list[str] = []
    state = ckpt.load_train_state(run, warn=warnings.append)
    assert state.step == 4
    assert len(warnings) == 1 and "step-00000008" in warnings[0] and "checksum" in warnings[0]

    # from the CLI: the warning on stderr, and the run finishes from step 4
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "corrupt" in err and "resuming" in err and "from step 4" in err


def test_all_checkpoints_corrupt_is_one_clear_error(small_text, tmp_path, capsys):
    run = tmp_path / "r"
    Trainer(tiny_cfg(small_text, run, max_iters=4, checkpoint_interval=4), progress=False, log=quiet).run()
    for p in ckpt.list_checkpoints(run):
        (p / ckpt.STATE_JSON_FILE).write_text("{}")
    assert main(["train", "--resume", str(run), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "no intact checkpoint" in err and "Traceback" not in err


def test_changed_config_on_resume_lists_the_differences(small_text, tmp_path, capsys):
    run = tmp_path / "r"
    Trainer(tiny_cfg(small_text, run, max_iters=4), progress=False, log=quiet).run()
    before = weights(run)

    assert main(["train", "--resume", str(run), "--n-layer", "3", "--batch-size", "8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "n_layer 2 -> 3" in err[0] and "batch_size 4 -> 8" in err[0] and "cannot change" in err[0]

    assert main(["train", "--resume", str(run), "--max-iters", "6"]) == 2
    err = capsys.readouterr().err
    assert "max_iters 4 -> 6" in err and "--allow-config-change" in err
    assert_identical(weights(run), before)  # nothing overwritten

    with pytest.raises(QuillError, match="n_layer"):
        resume_config(run, overrides={"n_layer": 3}, allow_config_change=True)

    assert main(["train", "--resume", str(run), "--max-iters", "6", "--allow-config-change",
                 "--no-progress"]) == 0
    assert ckpt.list_checkpoints(run)[-1].name == "step-00000006"
    assert ckpt.read_run_config(run).train.max_iters == 6


def test_resume_refuses_other_data(small_text, tmp_path, capsys):
    run = tmp_path / "r"
    Trainer(tiny_cfg(small_text, run, max_iters=2), progress=False, log=quiet).run()
    other = tmp_path / "other.txt"
    other.write_text(small_text.read_text()[::-1], encoding="utf-8")
    assert main(["train", "--resume", str(run), "--data", str(other), "--allow-config-change"]) == 2
    assert "data" in capsys.readouterr().err


def files_of(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


def test_resume_never_downloads_nor_reads_the_data_its_config_names(small_text, tmp_path, capsys, monkeypatch):
    """A run directory may come from a stranger: its config.yaml's data (a URL, any local file) is
    never fetched or read on resume. The data comes from this machine's cache (by fingerprint)
    or from --data, checked against the checkpoint."""
    run = tmp_path / "r"
    Trainer(tiny_cfg(small_text, run, max_iters=4), progress=False, log=quiet).run()
    cfg_text = (run / ckpt.CONFIG_FILE).read_text()
    secret = tmp_path / "secret.txt"
    secret.write_text(small_text.read_text(), encoding="utf-8")
    import urllib.request

    def no_network(*args, **kwargs):
        raise AssertionError("resume tried to download")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    monkeypatch.setenv("QUILL_CACHE", str(tmp_path / "empty-cache"))  # another machine
    for data in ("https://example.com/corpus.txt", str(secret)):
        (run / ckpt.CONFIG_FILE).write_text(cfg_text.replace(f"data: {small_text}", f"data: {data}"))
        assert ckpt.read_run_config(run).train.data == data
        before = files_of(run)
        assert main(["train", "--resume", str(run), "--max-iters", "6", "--allow-config-change",
                     "--no-progress"]) == 2
        [line] = capsys.readouterr().err.strip().splitlines()
        assert "not in this machine's cache" in line and "--data" in line
        assert files_of(run) == before
        assert not (tmp_path / "empty-cache" / "prepared").exists()  # secret.txt was never read
    for name in ("https://example.com/corpus.txt", "shakespeare"):  # a URL, a data set quill downloads
        assert main(["train", "--resume", str(run), "--data", name]) == 2
        assert "never downloads" in capsys.readouterr().err
    # the user points at the data: checked against the checkpoint, then the run goes on
    assert main(["train", "--resume", str(run), "--data", str(small_text), "--max-iters", "6",
                 "--allow-config-change", "--no-progress"]) == 0
    assert ckpt.list_checkpoints(run)[-1].name == "step-00000006"
    assert ckpt.read_run_config(run).train.data == str(small_text)


def test_resume_checks_config_yaml_and_state_json_before_writing_anything(small_text, tmp_path, capsys):
    run = tmp_path / "r"
    Trainer(tiny_cfg(small_text, run, max_iters=4), progress=False, log=quiet).run()
    cfg_text = (run / ckpt.CONFIG_FILE).read_text()
    latest = ckpt.list_checkpoints(run)[-1]
    state_text = (latest / ckpt.STATE_JSON_FILE).read_text()
    manifest_text = (latest / ckpt.MANIFEST_FILE).read_text()

    def tamper(change) -> None:  # rewrite state.json and its checksum, as a careful forger would
        import hashlib

        st = json.loads(state_text)
        change(st)
        data = json.dumps(st).encode()
        (latest / ckpt.STATE_JSON_FILE).write_bytes(data)
        manifest = json.loads(manifest_text)
        manifest["sha256"][ckpt.STATE_JSON_FILE] = hashlib.sha256(data).hexdigest()
        (latest / ckpt.MANIFEST_FILE).write_text(json.dumps(manifest))

    cases = [
        (lambda: (run / ckpt.CONFIG_FILE).write_text(cfg_text.replace("n_embd: 32", "n_embd: 64")),
         "n_embd 32 -> 64"),
        (lambda: (run / ckpt.CONFIG_FILE).write_text(cfg_text.replace("n_layer: 2", "n_layer: 2000")),
         "n_layer"),
        (lambda: tamper(lambda st: st.update(losses="many")), "malformed losses"),
        (lambda: tamper(lambda st: st.update(metrics=[1, 2])), "malformed metrics"),
        (lambda: tamper(lambda st: st.update(step="4")), "step count"),
        (lambda: tamper(lambda st: st["rng"].update(python=[3, [1], None])), "does not fit"),
        (lambda: tamper(lambda st: st.update(optimizer={"state": {}, "param_groups": []})), "does not fit"),
    ]
    for damage, fragment in cases:
        (run / ckpt.CONFIG_FILE).write_text(cfg_text)
        (latest / ckpt.STATE_JSON_FILE).write_text(state_text)
        (latest / ckpt.MANIFEST_FILE).write_text(manifest_text)
        damage()
        before = files_of(run)
        assert main(["train", "--resume", str(run), "--no-progress"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("quill: error:") and fragment in err[0], err
        assert files_of(run) == before  # config.yaml is not rewritten before the checks pass


def test_resume_of_a_missing_or_empty_run_is_an_error(tmp_path, capsys):
    assert main(["train", "--resume", str(tmp_path / "nope")]) == 2
    assert "not a run directory" in capsys.readouterr().err


# --- fault injection in subprocesses ----------------------------------------------------------

def quill_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "quillgpt", "train", "--no-progress", *args]


def tiny_flags(data: Path, out: Path, max_iters: int) -> list[str]:
    flags = []
    for k, v in dict(TINY, data=str(data), out=str(out), max_iters=max_iters).items():
        flags += ["--" + k.replace("_", "-"), str(v)]
    return flags


def env() -> dict[str, str]:
    # the same number of threads as this process: float sums are only bitwise reproducible
    # with the same split of the work
    return dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS=str(torch.get_num_threads()))


def test_sigterm_saves_a_checkpoint_and_resume_is_identical(small_text, tmp_path):
    """The run is nowhere near its end when SIGTERM arrives (max_iters 10**6, while the LR
    schedule ends at step 40 whatever max_iters is), so it stops mid-run on any machine; then it
    resumes to a few steps past the stop and equals a run trained straight to that step."""
    run = tmp_path / "run"
    proc = subprocess.Popen(quill_cmd(*tiny_flags(small_text, run, 10**6), "--lr-decay-iters", "40",
                                      "--checkpoint-interval", "1000", "--log-interval", "1"),
                            env=env(), stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    # wait for training to be under way, then ask it to stop
    for line in proc.stderr:
        if "step 4:" in line:
            break
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate()
    assert proc.returncode == 130, err
    assert "checkpoint saved" in err and "--resume" in err
    stopped = int(ckpt.list_checkpoints(run)[-1].name.split("-")[1])
    assert stopped >= 4
    end = stopped + 6
    assert main(["train", "--resume", str(run), "--no-progress", "--max-iters", str(end),
                 "--allow-config-change"]) == 0
    ref = Trainer(tiny_cfg(small_text, tmp_path / "ref", max_iters=end, lr_decay_iters=40,
                           checkpoint_interval=1000), progress=False, log=quiet).run()
    assert_identical(weights(run), weights(tmp_path / "ref"))
    state = ckpt.load_train_state(run)
    assert state.state["losses"] == ref.losses and len(ref.losses) == end


def latest_step(run: Path) -> int:
    found = ckpt.list_checkpoints(run)
    return int(found[-1].name.split("-")[1]) if found else 0


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_gives_identical_weights(small_text, tmp_path):
    iters = 120
    Trainer(tiny_cfg(small_text, tmp_path / "ref", max_iters=iters, checkpoint_interval=3),
            progress=False, log=quiet).run()
    run = tmp_path / "run"
    rng = random.Random(0)
    kills = 0
    for _ in range(12):
        if ckpt.list_checkpoints(run):
            args = ["--resume", str(run)]
        else:  # killed before the first checkpoint: start over
            args = [*tiny_flags(small_text, run, iters), "--overwrite", "--checkpoint-interval", "3"]
        before = latest_step(run)
        log = tmp_path / "stderr.txt"
        with open(log, "w") as err:
            proc = subprocess.Popen(quill_cmd(*args), env=env(), stderr=err, cwd=tmp_path)
        if kills < 4:
            # once this process has made progress, kill it a random moment later: mid-step,
            # mid-evaluation or in the middle of writing the next checkpoint
            while proc.poll() is None and latest_step(run) <= before:
                time.sleep(0.005)
            time.sleep(rng.uniform(0.0, 0.05))
            if proc.poll() is None:
                proc.kill()  # SIGKILL: no handler runs
                proc.wait()
                kills += 1
                # whatever instant it died at, every complete checkpoint verifies
                for p in ckpt.list_checkpoints(run):
                    assert ckpt.verify_checkpoint(p) is None
                continue
        assert proc.wait() == 0, log.read_text()[-3000:]
        break
    assert kills >= 3
    assert latest_step(run) == iters
    assert_identical(weights(run), weights(tmp_path / "ref"))


def test_overwrite_removes_the_old_runs_checkpoints(small_text, tmp_path):
    run = tmp_path / "r"
    Trainer(tiny_cfg(small_text, run, max_iters=8, checkpoint_interval=2, keep_last=4), progress=False,
            log=quiet).run()
    assert len(ckpt.list_checkpoints(run)) >= 4
    Trainer(tiny_cfg(small_text, run, max_iters=2, seed=9), overwrite=True, progress=False, log=quiet).run()
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step-00000002"]


def test_a_run_directory_takes_one_writer_at_a_time(small_text, tmp_path, capsys):
    """While a process writes a run (train, sft and rl share the Trainer), a second writer is
    refused in one line naming the holder's pid, and changes nothing; the lock goes with its
    holder, whether it lets go or dies."""
    from quillgpt.fileio import LOCK_FILE, RunLock

    run = tmp_path / "r"
    Trainer(tiny_cfg(small_text, run, max_iters=2), progress=False, log=quiet).run()
    assert not (run / LOCK_FILE).exists()  # let go at the end of the run
    resume = ["train", "--resume", str(run), "--max-iters", "3", "--allow-config-change", "--no-progress"]
    holder = subprocess.Popen([sys.executable, "-c", "import sys; from quillgpt.fileio import RunLock; "
                               f"RunLock({str(run)!r}).acquire(); print('held', flush=True); sys.stdin.read()"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = files_of(run)
        for argv in (resume, ["train", "--data", str(small_text), "--out", str(run), "--overwrite",
                              "--no-progress", *[f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]]):
            assert main(argv) == 2
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and f"being written by another process (pid {holder.pid})" in err[0], err
            assert files_of(run) == before
    finally:
        holder.kill()  # dies holding the lock: the system lets go of it, the file stays behind
        holder.wait()
    assert (run / LOCK_FILE).exists()
    assert main(resume) == 0 and not (run / LOCK_FILE).exists()
    assert ckpt.list_checkpoints(run)[-1].name == "step-00000003"
    # in one process too: a Trainer built on a held run is refused
    lock = RunLock(run)
    lock.acquire()
    with pytest.raises(QuillError, match=f"pid {os.getpid()}"):
        Trainer(resume_config(run, overrides={"max_iters": 4}, allow_config_change=True), progress=False,
                log=quiet, resume=run)
    lock.release()
    assert not (run / LOCK_FILE).exists()
