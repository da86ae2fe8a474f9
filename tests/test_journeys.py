"""The journeys a newcomer takes, as the docs print them, in a fresh clone, in a plain shell.

`tests/test_docs_commands.py` runs each `quill` command through `quillgpt.cli.main` in this
process. This test is the newcomer's side of it: a copy of the clone's files (what `git clone`
gives) in a new directory, a `$QUILL_CACHE` seeded with tiny-shakespeare and GPT-2's ranks (what
a first download leaves), and every command of each journey run by `bash` in order, with none of
this project on PATH and no virtual environment active:

- README.md: `make demo`, then the tour: train → sample → sft → chat `--message` → eval → serve
  and the official openai client → export (GGUF);
- docs/eval.md, over the API: a tiny exportable run, `export-hf`, `quill serve`, the harness's own
  `lm-eval` scoring it over HTTP, and `quill eval --tasks` in process.

It fails on the first command that does not work as printed (exit status, a traceback, or a
Python block that raises). `[server]` lines start in the background and run until the journey's
section ends; the Python blocks of that section run while they are up.

What differs from a newcomer's machine, and only this: pip works offline (`PIP_NO_INDEX`, no
build isolation) and the clone's `.venv` sees this environment's packages through a `.pth` file,
so `make demo` and `pip install -e '.[eval]'` find every dependency installed; the programs those
packages install (`lm-eval`, ...) are written into the clone's `.venv/bin` as pip would; commands
that train get the docs test's tiny override appended (and `make demo` its `DEMO_FLAGS`); the
ports the docs name are replaced by free ones; and the hub is marked offline.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from test_docs_commands import SHELL_BLOCKS, TINY, split_comment

REPO = Path(__file__).resolve().parent.parent
# (document, the section's heading, only the commands that start so: None for all)
JOURNEYS = [
    ("README.md", "## The two commands", ("make demo",)),
    ("README.md", "## A tour", None),
    ("docs/eval.md", "## Over the API: logprobs", None),
]
TRAINS = re.compile(r"^\.venv/bin/quill (train|sft|ladder)\b")
PORT = re.compile(r"\b(8000|8123)\b")  # the ports the docs name
READER_FILES = {"mytext.txt": 60_000}  # the text a reader brings (characters of tiny-shakespeare)

pytestmark = pytest.mark.slow


@dataclass
class Step:
    doc: str
    line: int
    kind: str  # "shell" or "python"
    text: str
    server: bool = False

    @property
    def where(self) -> str:
        return f"{self.doc}:{self.line}: {self.text.strip().splitlines()[0]}"


def section(text: str, heading: str) -> list[tuple[int, str]]:
    """The numbered lines of the section that starts with `heading`, up to the next heading of
    the same or a higher level."""
    lines = text.splitlines()
    level = len(heading) - len(heading.lstrip("#"))
    start = next(i for i, line in enumerate(lines) if line.startswith(heading))
    end = next((j for j in range(start + 1, len(lines))
                if re.match(rf"^#{{1,{level}}} ", lines[j])), len(lines))
    return [(i + 1, lines[i]) for i in range(start, end)]


def steps_of(doc: str, heading: str, only: tuple[str, ...] | None) -> list[Step]:
    """Shell commands (continuations joined) and Python blocks of a section, in order."""
    out: list[Step] = []
    numbered = section((REPO / doc).read_text(encoding="utf-8"), heading)
    i = 0
    while i < len(numbered):
        number, line = numbered[i]
        m = re.match(r"^```(\S*)\s*$", line)
        i += 1
        if not m:
            continue
        body: list[tuple[int, str]] = []
        while i < len(numbered) and not numbered[i][1].startswith("```"):
            body.append(numbered[i])
            i += 1
        i += 1
        if m.group(1) == "python":
            out.append(Step(doc, body[0][0], "python", "\n".join(t for _, t in body)))
        elif m.group(1) in SHELL_BLOCKS:
            pending, first = "", 0
            for n, t in body:
                first = first or n
                if t.endswith("\\"):
                    pending += t[:-1] + " "
                    continue
                code, comment = split_comment((pending + t).strip())
                pending = ""
                if code and (only is None or code.startswith(only)):
                    out.append(Step(doc, first, "shell", code, server="[server]" in comment))
                first = 0
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def newcomer_env(home: Path, cache: Path) -> dict[str, str]:
    """A login shell's environment: no virtual environment, nothing of this project on PATH."""
    venv = Path(sys.prefix)
    path = [p for p in os.environ.get("PATH", "/usr/bin:/bin").split(os.pathsep)
            if p and Path(p).resolve() != (venv / "bin").resolve() and ".venv" not in Path(p).parts]
    env = {k: v for k, v in os.environ.items()
           if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "QUILL_CACHE")
           and not k.startswith(("PYTEST", "COV_"))}
    env.update(PATH=os.pathsep.join(path), HOME=str(home), QUILL_CACHE=str(cache),
               PIP_NO_INDEX="1", PIP_NO_BUILD_ISOLATION="0", PIP_DISABLE_PIP_VERSION_CHECK="1",
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               DEMO_FLAGS=" ".join(TINY), COLUMNS="120")
    return env


def clone_files(dest: Path) -> None:
    """What `git clone` of this checkout gives: the tracked files (with their changes) and the
    new ones git does not ignore."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=REPO, capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        src = REPO / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


def prepare_venv(clone: Path, env: dict[str, str]) -> None:
    """`.venv` as `python3 -m venv` makes it, seeing this environment's packages (the stand-in for
    a download), with their programs in `.venv/bin` as pip writes them."""
    # --without-pip: pip and setuptools come from here too (ensurepip's older setuptools cannot
    # build an editable install without the network)
    subprocess.run([sys._base_executable, "-m", "venv", "--without-pip", str(clone / ".venv")], check=True, env=env)
    python = clone / ".venv" / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True, env=env).stdout.strip()
    Path(site, "_installed_packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n", encoding="utf-8")
    ours = Path(sys.prefix) / "bin"
    for script in ours.iterdir():
        target = clone / ".venv" / "bin" / script.name
        if target.exists() or script.name == "quill" or not script.is_file():
            continue
        head = script.read_bytes()[:200]
        if head.startswith(b"#!") and b"python" in head.split(b"\n", 1)[0]:
            rest = script.read_text(encoding="utf-8").split("\n", 1)[1]
            target.write_text(f"#!{python}\n{rest}", encoding="utf-8")
            target.chmod(0o755)


@pytest.fixture
def newcomer(tmp_path, shakespeare, gpt2_cache):
    clone, home, cache = tmp_path / "quillgpt", tmp_path / "home", tmp_path / "cache"
    for d in (clone, home, cache):
        d.mkdir()
    shutil.copy(shakespeare, cache / "tinyshakespeare.txt")
    shutil.copy(gpt2_cache, cache / gpt2_cache.name)
    clone_files(clone)
    text = shakespeare.read_text(encoding="utf-8")
    for name, chars in READER_FILES.items():
        (clone / name).write_text(text[:chars], encoding="utf-8")
    git = ["git", "-c", "user.name=newcomer", "-c", "user.email=newcomer@example.invalid"]
    for command in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "a fresh clone, and a text of mine"]):
        subprocess.run(git + command, cwd=clone, check=True, capture_output=True)
    env = newcomer_env(home, cache)
    prepare_venv(clone, env)
    return clone, env


def wait_for(url: str, proc: subprocess.Popen, log: Path, timeout: float = 600) -> None:
    import httpx

    deadline = time.monotonic() + timeout  # a hang guard, not a speed limit
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the server exited ({proc.returncode}):\n{log.read_text()[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"the server did not answer within {timeout} s:\n{log.read_text()[-2000:]}")


def run_journey(steps: list[Step], clone: Path, env: dict[str, str], ports: dict[str, str]) -> list[str]:
    """Runs the steps in order; the servers it starts stop at the end (Ctrl-C). Returns what each
    step printed."""
    servers: list[subprocess.Popen] = []
    printed: list[str] = []
    try:
        for n, step in enumerate(steps):
            text = PORT.sub(lambda m: ports.setdefault(m.group(1), str(free_port())), step.text)
            if step.kind == "python":
                proc = subprocess.run([str(clone / ".venv/bin/python"), "-c", text], cwd=clone, env=env,
                                      capture_output=True, text=True, timeout=600)
            elif step.server:
                if "--port" not in text:  # the default port, 8000, as the docs' clients use it
                    text += f" --port {ports.setdefault('8000', str(free_port()))}"
                log = clone.parent / f"server-{n}.log"
                proc = subprocess.Popen(["bash", "-c", text], cwd=clone, env=env, stdout=log.open("w"),
                                        stderr=subprocess.STDOUT, start_new_session=True)
                servers.append(proc)
                port = re.search(r"--port (\d+)", text).group(1)
                wait_for(f"http://127.0.0.1:{port}", proc, log)
                printed.append(log.read_text())
                continue
            else:
                if TRAINS.match(text):
                    text += " " + " ".join(shlex.quote(w) for w in TINY)
                proc = subprocess.run(["bash", "-c", text], cwd=clone, env=env, capture_output=True, text=True,
                                      timeout=900)
            said = proc.stdout + proc.stderr
            with open(clone.parent / "journey.log", "a", encoding="utf-8") as log:
                log.write(f"$ {text}\n{said}\n")
            assert proc.returncode == 0 and "Traceback" not in said, (
                f"{step.where}\n  as run: {text}\n  exit {proc.returncode}:\n{said[-3000:]}")
            printed.append(said)
    finally:
        for proc in servers:
            os.killpg(proc.pid, signal.SIGINT)
        for proc in servers:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
    return printed


def test_the_journeys_are_found_in_the_docs():
    steps = {heading: steps_of(doc, heading, only) for doc, heading, only in JOURNEYS}
    tour = [s.text for s in steps["## A tour"]]
    order = ["quill sample", "reverse_words.py", "quill sft", "quill chat", "quill eval", "quill serve",
             "from openai import OpenAI", "quill export-gguf"]
    found = [next(i for i, t in enumerate(tour) if key in t) for key in order]
    assert found == sorted(found), tour  # the tour runs train -> sample -> sft -> chat -> eval -> serve -> export
    assert [s.text for s in steps["## The two commands"]] == ["make demo"]
    http = [s.text for s in steps["## Over the API: logprobs"]]
    assert any(t.startswith(".venv/bin/lm-eval run") for t in http) and any(s.server for s in
                                                                           steps["## Over the API: logprobs"])


def test_a_newcomer_follows_the_docs_in_a_fresh_clone(newcomer):
    clone, env = newcomer
    ports: dict[str, str] = {}
    printed = []
    for doc, heading, only in JOURNEYS:
        printed += run_journey(steps_of(doc, heading, only), clone, env, ports)
    said = "\n".join(printed)
    # what the steps are for, beyond their exit status
    assert (clone / "runs/shakespeare-char-cpu/model.safetensors").is_file()      # make demo
    assert "JULIET:" in said                                                      # quill sample
    assert (clone / "runs/reverse/tokenizer.json").is_file()                      # quill sft
    assert "quill_verse_choice" in said and "quill_sonnets" in said               # the harness's tables
    assert (clone / "out/reverse.gguf").is_file()                                 # export-gguf
    assert (clone / "out/tiny-bpe-hf/tokenizer.json").is_file()
    # the recipes wrote under runs/ and out/ only: git sees nothing new in the clone
    status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=clone,
                            capture_output=True, text=True, check=True).stdout
    assert status == "", f"files the journeys left outside runs/ and out/:\n{status}"
