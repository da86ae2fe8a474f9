"""Atomic file writes: write a temporary file beside the target, fsync, rename.

A crash at any instant leaves either the old file or the new one, never a half-written one.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def check_apart(out: str | Path, inputs: list[str | Path], what: str = "--out") -> None:
    """QuillError when the output `out` is one of the `inputs`, lies inside one, or holds one:
    replacing it would delete (or write into) what is being read. Inputs that do not exist on
    disk (a URL, a known name) are skipped."""
    from .errors import QuillError

    target = Path(out).expanduser().resolve()
    for item in inputs:
        path = Path(item).expanduser()
        if not path.exists():
            continue
        source = path.resolve()
        if target == source:
            raise QuillError(f"{what} {out} is the input {item}; choose another output")
        if source.is_relative_to(target):
            raise QuillError(f"{what} {out} holds the input {item}; writing it would replace the input")
        if target.is_relative_to(source):
            raise QuillError(f"{what} {out} is inside the input {item}; choose an output outside it")
