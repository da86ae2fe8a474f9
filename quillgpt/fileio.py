"""Atomic file writes: write a temporary file beside the target, fsync, rename.

A crash at any instant leaves either the old file or the new one, never a half-written one.
Files get the permissions any program's files get (0644 under the usual umask 022), not the
0600 of a bare temporary file.

A temporary's name carries its writer's process id (`.NAME.PID.XXXXXXXX.tmp`), so that
`sweep_temporaries` can remove what a killed writer (SIGKILL, power loss) left behind on the
next start, and never touch the file of a writer that is still running. A full disk is one
`QuillError` naming the file (`disk_full`).
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import stat
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from .errors import QuillError

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
STALE_AFTER_S = 60.0  # a dead writer's temporary is removed once this old (clock skew, shared disks)
LEGACY_STALE_AFTER_S = 3600.0  # temporaries named without a process id: removed when this old
# .NAME.PID.XXXXXXXX.tmp (a file or checkpoint directory), .NAME.PID.removed.tmp (a checkpoint
# being deleted), .NAME.tmp-PID / .NAME.old-PID (a prepared directory being staged or replaced)
TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[A-Za-z0-9_]+\.tmp$")
STAGING_NAME = re.compile(r"^\.(?P<name>.+)\.(?:tmp|old)-(?P<pid>\d+)$")
LEGACY_TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.[a-z0-9_]{8}\.tmp$")


def _initial_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK_AT_START = _initial_umask()


def current_umask() -> int:
    """The process's umask (read without changing it where the system shows it)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return _UMASK_AT_START


class DiskFull(QuillError):
    """The disk (or the user's quota) filled up while writing `path`."""

    def __init__(self, path: str | Path, reason: str = os.strerror(errno.ENOSPC)):
        super().__init__(f"cannot write {path}: the disk is full ({reason})")
        self.path, self.reason = path, reason


def disk_full(e: OSError, path: str | Path) -> QuillError | None:
    """The one-line error for a full disk (or quota) while writing `path`; None for other errors."""
    if e.errno in DISK_FULL:
        return DiskFull(path, os.strerror(e.errno))
    return None


@contextmanager
def reporting_disk_full(path: str | Path) -> Iterator[None]:
    """Inside: a full disk becomes `disk_full`'s one-line error naming `path`."""
    try:
        yield
    except DiskFull as e:  # a file inside `path` (a temporary name the user never chose)
        raise DiskFull(path, e.reason) from None
    except OSError as e:
        full = disk_full(e, path)
        if full is None:
            raise
        raise full from None


def temp_prefix(path: Path) -> str:
    """The start of a temporary's name for `path`: hidden, the target's name, this process's id."""
    return f".{path.name}.{os.getpid()}."


def open_regular(path: str | Path, max_bytes: int) -> BinaryIO:
    """`path` opened for reading if it is a regular file of at most `max_bytes` (a link is
    followed); QuillError for a device (a link to /dev/zero), a FIFO or a socket, or a larger
    file: what a run directory, tokenizer or checkpoint holds is read only through here (with
    `read_regular`). Opened without blocking: a FIFO with no writer would hang open(). A missing
    file or a directory raises FileNotFoundError or IsADirectoryError as open() does."""
    path = Path(path)
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
        if not stat.S_ISREG(st.st_mode):
            raise QuillError(f"{path} is not a regular file (a device, FIFO or socket); refusing to read it")
        if st.st_size > max_bytes:
            raise QuillError(f"{path} is {st.st_size:,} bytes, more than such a file can hold "
                             f"({max_bytes:,}); refusing to read it")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def confined(path: str | Path, root: str | Path) -> Path:
    """`path`, if it lies inside `root` once every link on the way is followed; else QuillError.
    A run directory (or prepared data) may come from a stranger: a link inside it may point to
    another of its files, never out of it (to /etc/passwd, or a key in the user's home)."""
    path = Path(path)
    try:
        real, base = path.resolve(), Path(root).resolve()
    except (OSError, RuntimeError) as e:  # a loop of links
        raise QuillError(f"cannot follow the links of {path}: {e}") from None
    if real != base and base not in real.parents:
        raise QuillError(f"{path} is a link that leads outside {root}; refusing to read it")
    return path


def read_regular(path: str | Path, max_bytes: int) -> bytes:
    """The bytes of the regular file `path`, at most `max_bytes` of them (see `open_regular`)."""
    with open_regular(path, max_bytes) as f:
        parts = [f.read(os.fstat(f.fileno()).st_size)]
        total = len(parts[0])
        while chunk := f.read(1 << 20):  # a file that grows while it is read
            parts.append(chunk)
            total += len(chunk)
            if total > max_bytes:
                raise QuillError(f"{path} is more than {max_bytes:,} bytes, more than such a file can hold; "
                                 f"refusing to read it")
    return parts[0] if len(parts) == 1 else b"".join(parts)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=temp_prefix(path), suffix=".tmp")
    try:
        if hasattr(os, "fchmod"):  # mkstemp's 0600 -> what the umask gives any new file
            os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(e, OSError) and (full := disk_full(e, path)) is not None:
            raise full from None
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


def make_temp_dir(parent: Path, name: str) -> Path:
    """A fresh directory `.NAME.PID.XXXXXXXX.tmp` in `parent`, with the umask's permissions."""
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".{name}.{os.getpid()}.", suffix=".tmp"))
    os.chmod(tmp, 0o777 & ~current_umask())
    return tmp


def process_alive(pid: int) -> bool:
    """Whether process `pid` exists on this machine (True when that cannot be told)."""
    if os.name != "posix":
        return True
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def sweep_temporaries(directory: Path, names: Iterable[str] | None = None) -> list[Path]:
    """Remove the temporaries that killed writers left in `directory`; returns what was removed.

    Only our own temporary names are considered (optionally only for the targets in `names`),
    and one is removed only when its writer's process is gone and it has not changed for
    STALE_AFTER_S (names without a process id, from older versions: LEGACY_STALE_AFTER_S), so a
    write in progress is never disturbed."""
    wanted = set(names) if names is not None else None
    removed: list[Path] = []
    try:
        entries = list(Path(directory).iterdir())
    except OSError:
        return removed
    now = time.time()
    for entry in entries:
        if not entry.name.startswith("."):
            continue
        m = TEMP_NAME.match(entry.name) or STAGING_NAME.match(entry.name)
        legacy = None if m else LEGACY_TEMP_NAME.match(entry.name)
        match = m or legacy
        if match is None or (wanted is not None and match.group("name") not in wanted):
            continue
        if m is not None and process_alive(int(m.group("pid"))):
            continue
        try:
            age = now - entry.lstat().st_mtime
        except OSError:
            continue
        if age < (STALE_AFTER_S if m is not None else LEGACY_STALE_AFTER_S):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            try:
                entry.unlink()
            except OSError:
                continue
        removed.append(entry)
    return removed


def check_apart(out: str | Path, inputs: list[str | Path], what: str = "--out") -> None:
    """QuillError when the output `out` is one of the `inputs`, lies inside one, or holds one:
    replacing it would delete (or write into) what is being read. Inputs that do not exist on
    disk (a URL, a known name) are skipped."""
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


LOCK_FILE = ".quill.lock"  # in a run directory while a process writes it


class RunLock:
    """One writer per run directory: an exclusive `flock` on DIR/.quill.lock, held while a
    process trains into DIR (the system drops it when the process dies, however it dies). The
    file names its holder's process id; it is removed when the lock is let go. A second writer
    is refused in one line naming the holder."""

    def __init__(self, directory: str | Path, enabled: bool = True):
        self.directory, self.enabled = Path(directory), enabled  # disabled: a process that writes nothing
        self.fd: int | None = None

    @property
    def path(self) -> Path:
        return self.directory / LOCK_FILE

    def acquire(self, create: bool = False) -> None:
        """Take the lock, if not held yet (`create`: make the directory first, else it must
        exist); QuillError when another process holds it."""
        try:
            import fcntl
        except ImportError:  # no flock here (Windows): one writer is the user's care
            return
        if not self.enabled or self.fd is not None:
            return
        if create:
            self.directory.mkdir(parents=True, exist_ok=True)
        while self.fd is None:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666 & ~current_umask())
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = os.read(fd, 200).decode("utf-8", "replace").strip() or "unknown"
                os.close(fd)
                raise QuillError(f"{self.directory} is being written by another process ({holder}); "
                                 f"a run directory takes one writer at a time: wait for it to finish, "
                                 f"or stop it") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # the holder let go and removed the file between our open and flock
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.write(fd, f"pid {os.getpid()}\n".encode())
            self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            try:
                os.unlink(self.path)
            except OSError:
                pass
            os.close(self.fd)  # closing lets go of the flock
            self.fd = None
