"""Files on disk: permissions follow the umask, killed writers' temporaries are swept on the next
start (a live writer's never), and a full disk is one line naming the file."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from quillgpt import fileio
from quillgpt.cli import main
from quillgpt.errors import QuillError

TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "16", "--batch-size", "4",
        "--eval-iters", "2", "--eval-interval", "2", "--sample-tokens", "0", "--no-progress"]


@pytest.fixture
def umask_022():
    before = os.umask(0o022)
    yield
    os.umask(before)


def dead_pid() -> int:
    """The id of a process that has ended (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def leftover(path: Path, age_s: float = 600.0, directory: bool = False) -> Path:
    if directory:
        path.mkdir()
        (path / "train.bin").write_bytes(b"\0" * 10)
    else:
        path.write_bytes(b"half")
    then = time.time() - age_s
    os.utime(path, (then, then))
    return path


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_files_follow_the_umask(tmp_path, umask_022, small_text):
    fileio.atomic_write_text(tmp_path / "a.txt", "x")
    assert mode(tmp_path / "a.txt") == 0o644
    os.umask(0o077)
    fileio.atomic_write_text(tmp_path / "b.txt", "x")
    assert mode(tmp_path / "b.txt") == 0o600
    os.umask(0o022)
    run = tmp_path / "run"
    assert main(["train", "--data", str(small_text), "--out", str(run), "--max-iters", "2", *TINY]) == 0
    files = [p for p in run.rglob("*") if p.is_file()]
    assert files and all(mode(p) == 0o644 for p in files), {p.name: oct(mode(p)) for p in files}
    assert all(mode(p) == 0o755 for p in run.rglob("*") if p.is_dir())


def test_killed_writers_temporaries_are_swept_on_the_next_start(tmp_path, small_text):
    run = tmp_path / "run"
    assert main(["train", "--data", str(small_text), "--out", str(run), "--max-iters", "2", *TINY]) == 0
    dead, live = dead_pid(), os.getpid()
    stale = [leftover(run / f".model.safetensors.{dead}.abcd1234.tmp"),
             leftover(run / f".metrics.csv.{dead}.x_y_z_12.tmp"),
             leftover(run / ".best.safetensors.k3j4h5g6.tmp", age_s=7200),  # an older version's name
             leftover(run / "train_state" / f".step-00000004.{dead}.qwertyui.tmp", directory=True)]
    kept = [leftover(run / f".model.safetensors.{live}.abcd1234.tmp"),  # a writer still running
            leftover(run / f".config.yaml.{dead}.abcd1234.tmp", age_s=1),  # just written: maybe on another host
            leftover(run / ".notes.k3j4h5g6.tmp", age_s=7200)]  # not a file a run writes
    assert main(["train", "--resume", str(run), "--max-iters", "4", "--allow-config-change",
                 "--no-progress"]) == 0
    assert not [p for p in stale if p.exists()]
    assert all(p.exists() for p in kept)

    # beside `quill prepare --out` and in the cache: killed staging directories
    out = tmp_path / "data" / "prepared"
    out.parent.mkdir()
    staged = [leftover(out.parent / f".prepared.tmp-{dead}", directory=True),
              leftover(out.parent / f".prepared.old-{dead}", directory=True)]
    other = leftover(out.parent / f".mine.tmp-{dead}", directory=True)  # another output's: not ours to judge
    running = leftover(out.parent / f".prepared.tmp-{os.getppid()}", directory=True)  # another live process
    assert main(["prepare", "--data", str(small_text), "--out", str(out), "--no-progress"]) == 0
    assert not [p for p in staged if p.exists()] and other.exists() and running.exists()


def test_sweep_never_touches_a_live_writer(tmp_path):
    """A writer in another process, mid-write: its temporary stays however old it looks."""
    code = ("import os, sys, time; open(sys.argv[1] % os.getpid(), 'w').write('x'); "
            "sys.stdout.write('ready\\n'); sys.stdout.flush(); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / ".model.safetensors.%d.abcd1234.tmp")],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "ready\n"
        [temp] = tmp_path.glob(".model.safetensors.*.tmp")
        os.utime(temp, (0, 0))
        assert fileio.sweep_temporaries(tmp_path) == [] and temp.exists()
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
    assert fileio.sweep_temporaries(tmp_path) == [temp] and not temp.exists()


def no_space(fd: int) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_is_one_line_naming_the_file(tmp_path, small_text, capsys, monkeypatch):
    run = tmp_path / "run"
    assert main(["train", "--data", str(small_text), "--out", str(run), "--max-iters", "2", *TINY]) == 0
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    capsys.readouterr()
    monkeypatch.setattr(os, "fsync", no_space)
    cases = [
        (["prepare", "--data", str(small_text), "--out", str(tmp_path / "p"), "--no-progress"], tmp_path / "p"),
        (["tokenizer", "train", "--data", str(small_text), "--out", str(tmp_path / "t.json"), "--vocab-size",
          "300", "--no-progress"], tmp_path / "t.json"),
        (["train", "--resume", str(run), "--max-iters", "4", "--allow-config-change", "--no-progress"],
         run / "config.yaml"),
        (["export-hf", str(run), str(tmp_path / "hf")], None),  # refused first: a char tokenizer
    ]
    for argv, path in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("quill: error:")]
        assert len(lines) == 1 and "Traceback" not in err and err.strip().splitlines()[-1] == lines[0], err
        if path is not None:
            assert lines[0] == f"quill: error: cannot write {path}: the disk is full (No space left on device)"
    monkeypatch.undo()
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before  # nothing lost
    assert not (tmp_path / "p").exists() and not (tmp_path / "t.json").exists()
    assert not [p for p in tmp_path.rglob(".*") if p.name.endswith(".tmp") or ".tmp-" in p.name]


def test_check_apart():
    fileio.check_apart("out", ["in.txt"])
    with pytest.raises(QuillError, match="is the input"):
        fileio.check_apart(".", ["."])
    with pytest.raises(QuillError, match="holds the input"):
        fileio.check_apart(".", [__file__])
    with pytest.raises(QuillError, match="inside the input"):
        fileio.check_apart(Path(__file__).parent / "sub", [Path(__file__).parent])


def test_only_regular_files_of_a_bounded_size_are_read(tmp_path):
    """fileio.read_regular: a link to /dev/zero, a FIFO with no writer (open() would block) and a
    file over the cap are one QuillError each, at once; missing files and directories raise as
    open() does; a regular file is read whole."""
    good = tmp_path / "good.json"
    good.write_bytes(b"x" * 1000)
    assert fileio.read_regular(good, 1000) == b"x" * 1000
    zero = tmp_path / "zero"
    zero.symlink_to("/dev/zero")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    sparse = tmp_path / "sparse"
    with open(sparse, "wb") as f:
        f.truncate(3 << 30)  # 3 GB of nothing, on no disk space
    for path, fragment in ((zero, "not a regular file"), (fifo, "not a regular file"),
                           (sparse, "3,221,225,472 bytes"), (good, "1,000 bytes")):
        with pytest.raises(QuillError, match=fragment):
            fileio.read_regular(path, 999 if path == good else 1 << 20)
    with pytest.raises(FileNotFoundError):
        fileio.read_regular(tmp_path / "none", 10)
    with pytest.raises(IsADirectoryError):
        fileio.read_regular(tmp_path, 10)


def test_links_may_not_lead_out_of_their_directory(tmp_path):
    """fileio.confined: a link to another file of the directory (relative or absolute, through a
    linked folder) is kept; one that leads out of it (/etc/passwd, a sibling directory, `..`) is a
    QuillError before anything is read; a directory reached through a link is its own root."""
    root = tmp_path / "run"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "real.json").write_text("{}")
    (tmp_path / "secret").write_text("key")
    (root / "rel").symlink_to(Path("sub") / "real.json")
    (root / "abs").symlink_to(root / "sub" / "real.json")
    (root / "dir").symlink_to(root / "sub", target_is_directory=True)
    for name in ("rel", "abs", "dir/real.json", "sub/real.json", "missing"):
        assert fileio.confined(root / name, root) == root / name
    (root / "passwd").symlink_to("/etc/passwd")
    (root / "up").symlink_to(Path("..") / "secret")
    (root / "out").symlink_to(tmp_path, target_is_directory=True)
    for name in ("passwd", "up", "out/secret", "../secret"):
        with pytest.raises(QuillError, match="leads outside"):
            fileio.confined(root / name, root)
    linked = tmp_path / "linked-run"
    linked.symlink_to(root, target_is_directory=True)
    assert fileio.confined(linked / "rel", linked) == linked / "rel"
    (root / "loop").symlink_to(root / "loop")
    with pytest.raises((QuillError, OSError)):
        fileio.read_regular(fileio.confined(root / "loop", root), 10)


def test_special_files_in_a_run_directory_are_one_line(tmp_path, small_text, capsys):
    """metrics.csv as /dev/zero or a FIFO (plot, the server's model card), a 3 GB sparse
    config.yaml (sample), a FIFO state.json (train --resume falls back to the older checkpoint):
    one line, never a hang or a MemoryError."""
    from quillgpt.checkpoint import list_checkpoints
    from quillgpt.serve.routes import final_losses

    run = tmp_path / "run"
    tiny = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "16", "--batch-size", "4",
            "--eval-iters", "1", "--eval-interval", "2", "--sample-tokens", "0", "--device", "cpu", "--no-progress"]
    assert main(["train", "--data", str(small_text), "--out", str(run), "--max-iters", "4", *tiny]) == 0
    (run / "metrics.csv").unlink()
    (run / "metrics.csv").symlink_to("/dev/zero")
    capsys.readouterr()
    assert main(["plot", str(run)]) == 2
    assert "is a link that leads outside" in capsys.readouterr().err
    assert final_losses(run)["step"] is None  # the model card goes without
    (run / "metrics.csv").unlink()
    os.mkfifo(run / "metrics.csv")
    assert main(["plot", str(run)]) == 2
    assert "not a regular file" in capsys.readouterr().err
    newest = list_checkpoints(run)[-1]
    (newest / "state.json").unlink()
    os.mkfifo(newest / "state.json")
    assert main(["train", "--resume", str(run), "--max-iters", "5", "--allow-config-change", "--no-progress"]) == 0
    assert f"{newest / 'state.json'} is not a regular file" in capsys.readouterr().err  # the warning
    with open(run / "config.yaml", "r+b") as f:
        f.truncate(3 << 30)
    assert main(["sample", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("quill: error:") and "3,221,225,472 bytes" in err and "\n" not in err
