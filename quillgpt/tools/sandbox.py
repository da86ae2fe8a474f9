"""The `python` tool: run a snippet of Python in a separate, limited process.

    run_python("print(6 * 7)")              # "42\\n"
    run_python("sum(range(10))")            # "45": a last expression is shown, as in a notebook
    run_python("while True: pass")          # SandboxError: stopped after 5 s (the time limit)

What it does, in order, on POSIX systems (docs/tools.md says the same for users):

- a new temporary directory is the working directory (and HOME and TMPDIR); it is removed
  afterwards, whatever the code did;
- the interpreter is this one, started in isolated mode (`-I`: no PYTHON* variables, no user
  site-packages, no current directory on the path) with an environment of four variables (PATH,
  HOME, TMPDIR, LANG): nothing of quill's environment (tokens, keys) reaches it;
- its own session (a process group the time limit kills as a whole);
- resource limits (setrlimit): CPU seconds, address space (memory), size of any file it writes,
  no new processes (RLIMIT_NPROC 0), 64 open files, no core dumps;
- no network where the platform allows: a new, empty network namespace (Linux, as root or
  where unprivileged user namespaces are enabled);
- run as root, it drops to the user `nobody` (so the OS's own permissions protect root's files);
  the modules in PRELOAD are imported before, since the interpreter's own files may not be
  readable by nobody;
- an audit hook (PEP 578) refuses, from then on: opening a file for writing outside the
  directory, reading one outside it and the Python installation, listing other directories,
  renaming/removing/linking/chmod outside it, sockets, starting or signalling processes
  (fork, exec, spawn, subprocess, kill), ctypes, and the introspection that could reach the hook
  (gc.get_objects, sys._getframe, replacing a function's code);
- stdout and stderr go to files in the directory (so the file-size limit bounds them too); at
  most `Limits.output_chars` characters of them come back.

What it does not isolate: the code runs as the same user as quill (or nobody), on the same
kernel; the audit hook is a guard against ordinary Python, not a security boundary (a bug in a C
extension, or a way around the hook, leaves only the OS limits above); where no network
namespace can be made, the hook alone keeps sockets closed; files other users may read are
readable through C code that bypasses the hook; disk use inside the directory is bounded by the
file-size limit per file and the time limit, not in total. Do not offer it to people you would
not give a shell on the machine.
"""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import QuillError

MAX_CODE_CHARS = 20_000


class SandboxError(QuillError):
    """Code the sandbox stopped or refused: past its time, an error, too large."""


@dataclass
class Limits:
    seconds: float = 5.0  # CPU time, and wall-clock time (the same figure) before it is killed
    memory_mb: int = 512  # address space
    file_mb: int = 16  # the largest file it may write (stdout and stderr included)
    output_chars: int = 2000  # characters of output returned


# Standard-library modules imported before the code runs (needed where the process drops to
# nobody, who may not read the interpreter's files; harmless elsewhere).
PRELOAD = ("math", "cmath", "decimal", "fractions", "statistics", "random", "itertools", "functools",
           "collections", "re", "json", "string", "datetime", "heapq", "bisect", "operator", "textwrap",
           "unicodedata", "traceback", "codeop")

# Runs in the child, before the code: argv = [directory, memory bytes, file bytes, cpu seconds].
LAUNCHER = r'''
import ast, os, resource, signal, sys
d, mem, fsize, cpu = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
root = os.geteuid() == 0
try:
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(0x40000000 if root else 0x50000000) != 0:  # CLONE_NEWNET (| CLONE_NEWUSER)
        pass
    del ctypes, libc
except Exception:
    pass
for m in [m for m in sys.modules if m == "ctypes" or m.startswith(("ctypes.", "_ctypes"))]:
    del sys.modules[m]
for m in PRELOAD:
    try:
        __import__(m)
    except ImportError:
        pass
with open(os.path.join(d, "main.py"), encoding="utf-8") as f:
    code = f.read()
if root:
    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)
for what, value in ((resource.RLIMIT_CPU, cpu), (resource.RLIMIT_AS, mem), (resource.RLIMIT_FSIZE, fsize),
                    (resource.RLIMIT_NPROC, 0), (resource.RLIMIT_NOFILE, 64), (resource.RLIMIT_CORE, 0)):
    resource.setrlimit(what, (value, value))
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a file past the limit: an OSError, not a silent death
READ_ROOTS = tuple({os.path.realpath(p) + os.sep for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)}
                   | {os.path.realpath(d) + os.sep})
HOME = os.path.realpath(d) + os.sep
DENY = frozenset({"socket.__new__", "socket.bind", "socket.connect", "socket.getaddrinfo", "socket.sendto",
                  "os.fork", "os.forkpty", "os.exec", "os.posix_spawn", "os.spawn", "os.system", "os.kill",
                  "os.killpg", "signal.pthread_kill", "subprocess.Popen", "pty.spawn", "os.startfile",
                  "gc.get_objects", "gc.get_referrers", "gc.get_referents", "sys._getframe",
                  "sys._current_frames", "sys.setprofile", "sys.settrace", "sys.remote_exec",
                  "function.__new__", "code.__new__", "os.chroot", "os.setuid", "os.setgid"})
MODIFY = frozenset({"os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.symlink", "os.link", "os.chmod",
                    "os.chown", "os.chflags", "os.lchflags", "os.truncate", "os.utime", "os.mkfifo", "os.mknod",
                    "shutil.rmtree", "shutil.move", "shutil.copyfile", "shutil.chown"})
LIST = frozenset({"os.listdir", "os.scandir", "glob.glob", "glob.glob/2", "os.walk"})
BLOCKED_IMPORTS = ("ctypes", "_ctypes", "_posixsubprocess", "subprocess", "multiprocessing", "_multiprocessing",
                   "socket", "_socket", "ssl", "_ssl", "pty", "_testcapi")

def _inside(path, roots):
    if isinstance(path, int):
        return True  # an open descriptor: how it was opened was checked then
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    full = os.path.realpath(os.path.join(HOME, os.fspath(path)))
    return any((full + os.sep).startswith(r) for r in roots)

def _refuse(event):
    raise PermissionError(f"the python tool does not allow {event}")

def _hook(event, args, _realpath=os.path.realpath):
    if event in DENY or event.startswith("ctypes.") or event.startswith("socket."):
        _refuse(event)
    if event == "open":
        path, mode, flags = args
        writing = (mode is not None and any(c in mode for c in "wax+")) or (
            isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND))
        if path is not None and not _inside(path, (HOME,) if writing else READ_ROOTS):
            _refuse(("writing " if writing else "reading ") + repr(path))
    elif event in MODIFY:
        for p in args:
            if isinstance(p, (str, bytes, os.PathLike)) and not _inside(p, (HOME,)):
                _refuse(f"{event} on {p!r}")
    elif event in LIST:
        p = args[0] if args else "."
        if isinstance(p, (str, bytes, os.PathLike)) and not _inside(p, READ_ROOTS):
            _refuse(f"listing {p!r}")
    elif event == "import" and args and str(args[0]).split(".")[0] in BLOCKED_IMPORTS:
        _refuse(f"importing {args[0]}")
    elif event == "object.__setattr__" and len(args) > 1 and args[1] in ("__code__", "__globals__"):
        _refuse("replacing a function's code")

sys.addaudithook(_hook)
del _hook
tree = compile(code, "<tool>", "exec", ast.PyCF_ONLY_AST)
last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
scope = {"__name__": "__main__", "__builtins__": __builtins__}
exec(compile(tree, "<tool>", "exec"), scope)
if last is not None:
    value = eval(compile(ast.Expression(last.value), "<tool>", "eval"), scope)
    if value is not None:
        print(repr(value))
'''


def _launcher() -> str:
    return f"PRELOAD = {PRELOAD!r}\n" + LAUNCHER


def _tail(path: Path, limit: int) -> str:
    """The file's text, at most `limit` characters (its start, and a note of what was cut)."""
    try:
        with open(path, "rb") as f:
            data = f.read(limit * 4 + 1)
    except OSError:
        return ""
    text = data.decode("utf-8", errors="replace")
    return text if len(text) <= limit else text[:limit] + "\n... (output cut)"


def _error_line(stderr: str) -> str:
    """The last line of a traceback ("ZeroDivisionError: division by zero")."""
    lines = [line for line in stderr.splitlines() if line.strip() and not line.startswith("... (output cut)")]
    return lines[-1].strip() if lines else "it failed"


def run_python(code: str, limits: Limits | None = None) -> str:
    """Run `code` in the sandbox (module docstring); its output, or SandboxError with the
    error's last line (and any output before it)."""
    limits = limits or Limits()
    if not isinstance(code, str):
        raise SandboxError("the code must be a string")
    if len(code) > MAX_CODE_CHARS:
        raise SandboxError(f"the code is longer than {MAX_CODE_CHARS} characters")
    if os.name != "posix":
        raise SandboxError("the python tool needs a POSIX system (its limits are POSIX resource limits)")
    work = Path(tempfile.mkdtemp(prefix="quill-python-", dir=_temp_base()))
    try:
        return _run_in(work, code, limits)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _temp_base() -> str:
    """Where the working directory goes: the usual temporary directory, or /tmp when the child
    will run as nobody and could not reach it (a parent such as /root that others cannot enter)."""
    base = tempfile.gettempdir()
    if os.geteuid() != 0:
        return base
    path = Path(base).resolve()
    if all(p.stat().st_mode & stat.S_IXOTH for p in (path, *path.parents)):
        return base
    return "/tmp"


def _run_in(work: Path, code: str, limits: Limits) -> str:
    (work / "main.py").write_text(code, encoding="utf-8")
    if os.geteuid() == 0:  # the child drops to nobody: its directory must be nobody's
        os.chown(work, 65534, 65534)
    env = {"PATH": "/usr/bin:/bin", "HOME": str(work), "TMPDIR": str(work), "LANG": "C.UTF-8"}
    seconds = max(1, int(limits.seconds + 0.999))
    argv = [sys.executable, "-I", "-X", "utf8", "-c", _launcher(), str(work), str(limits.memory_mb << 20),
            str(limits.file_mb << 20), str(seconds)]
    with open(work / ".stdout", "wb") as out, open(work / ".stderr", "wb") as err:
        proc = subprocess.Popen(argv, cwd=work, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                start_new_session=True)
    start = time.monotonic()
    try:
        code_ = proc.wait(timeout=limits.seconds + 1)
    except subprocess.TimeoutExpired:
        code_ = None
    finally:
        try:  # the whole group, whatever it managed to start
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait()
    elapsed = time.monotonic() - start
    stdout = _tail(work / ".stdout", limits.output_chars)
    if code_ is None or code_ in (-signal.SIGXCPU, -signal.SIGKILL) and elapsed >= limits.seconds - 0.5:
        raise SandboxError(f"stopped after {limits.seconds:g} s (the time limit)")
    if code_ != 0:
        stderr = _tail(work / ".stderr", limits.output_chars)
        reason = _error_line(stderr) if code_ > 0 else f"killed by signal {-code_}"
        if "MemoryError" in reason:
            reason = f"MemoryError: over the memory limit of {limits.memory_mb} MB"
        raise SandboxError(reason + (f" (output before it: {stdout.strip()[:200]})" if stdout.strip() else ""))
    return stdout
