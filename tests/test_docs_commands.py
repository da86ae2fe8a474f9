"""Every command in the README's and docs/'s command blocks runs as written.

A user copies commands. This test takes each fenced block that holds shell commands (no language,
bash, sh, console) from README.md and docs/*.md, and each `.venv/bin/quill ...` line in it (also
after `&&`, behind `flock LOCK` or `timeout N`):

- checks that it works in the shell a newcomer has after `make demo`: nothing of the project on
  PATH, so every program the clone installs is named with `.venv/bin/` (`quill`, `python`, `pip`,
  `lm-eval`, `torchrun`); `pip install` lines install with `constraints.txt` an extra that
  pyproject.toml has; and what a command writes goes under `runs/` or `out/` (ignored by git);

- runs it through the real command line, `quillgpt.cli.main`, in a fresh directory laid out as a
  clone's root (`configs/`, `benchmarks/` and `tests/lm_eval_tasks/` beside it), with
  `$QUILL_CACHE` seeded with tiny-shakespeare and GPT-2's ranks, the files a reader brings
  (`input.txt`, `mytext.txt`, `corpus_dir/`, `held_out.txt`, `chats.jsonl`, ...) and the run that
  `make demo` leaves (`runs/shakespeare-char-cpu`). The commands of one document run in
  its own directory, in order, so later commands find what earlier ones wrote, and a command that
  collides with an earlier one's run directory fails here as it would for the reader.
- where it trains (`quill train`, `quill sft`, `quill rl`, `quill ladder`), a tiny override is appended: 2
  steps, 1 evaluation batch, batches of 2, an 8-token sample, no torch.compile (compiling takes a
  minute and is tested on its own); a ladder's `--budget-steps` becomes 2 and its `--time-budget` 1s,
  with the step times it plans from fixed at 10 ms, so the plan is the same on any machine.
- a command that cannot run anywhere says so at the end of its line: `[online]` (a hub id or
  data set), `[gpu]` (GPUs; `torchrun` lines must say it), `[server]` (runs until stopped). Those
  are only parsed: the subcommand and every flag must exist.
- `python benchmarks/X.py ...` lines name a script that exists and flags its `--help` lists;
  benchmarks measure for minutes, so they are not run here. The scripts that only write a data
  set, in seconds (`DATA_SCRIPTS`), do run, in order with the `quill` commands that read it.

Python blocks are examples of the library, not commands; they are not run.
"""

from __future__ import annotations

import io
import json
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from quillgpt import ladder_run
from quillgpt.cli import build_parser, main

REPO = Path(__file__).resolve().parent.parent
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SHELL_BLOCKS = {"", "bash", "sh", "shell", "console"}
MARKERS = {"[online]", "[gpu]", "[server]"}
TRAINS = {"train", "sft", "ladder", "rl"}
TINY = ["--max-iters", "2", "--eval-iters", "1", "--batch-size", "2", "--sample-tokens", "8",
        "--compile", "false", "--no-progress"]
LADDER_BUDGETS = {"--budget-steps": "2", "--time-budget": "1s"}
# scripts that write data: no torch, seconds
DATA_SCRIPTS = {"benchmarks/reverse_words.py", "benchmarks/additions.py", "benchmarks/tool_data.py"}
CLONE_DIRS = ["configs", "benchmarks", "tests/lm_eval_tasks"]  # beside the commands, as in a clone
DEMO = ["train", "--config", "shakespeare-char-cpu", "--out", "runs/shakespeare-char-cpu", "--overwrite"]


@dataclass
class DocCommand:
    doc: str
    line: int
    text: str          # the command as written (comment removed)
    argv: list[str]    # after the program name
    kind: str          # "quill", "benchmark" or "torchrun"
    marker: str | None

    @property
    def where(self) -> str:
        return f"{self.doc}:{self.line}: {self.text}"


def split_comment(line: str) -> tuple[str, str]:
    """`code  # comment` -> (code, comment); a # inside quotes or a word is no comment."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip(), line[i + 1:].strip()
    return line.rstrip(), ""


def shell_blocks(text: str):
    """(line number, line) of every line inside a fenced block of shell commands, with
    backslash continuations joined (numbered by their first line)."""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        m = re.match(r"^```(\S*)\s*$", lines[i])
        if not m:
            i += 1
            continue
        lang, i = m.group(1), i + 1
        pending, start = "", 0
        while i < len(lines) and not lines[i].startswith("```"):
            if lang in SHELL_BLOCKS:
                line = lines[i]
                if not pending:
                    start = i + 1
                if line.endswith("\\"):
                    pending += line[:-1] + " "
                else:
                    yield start, pending + line
                    pending = ""
            i += 1
        i += 1


def doc_commands(path: Path) -> list[DocCommand]:
    found = []
    for number, line in shell_blocks(path.read_text(encoding="utf-8")):
        code, comment = split_comment(line.strip())
        code = code.removeprefix("$ ")
        markers = [m for m in MARKERS if m in comment]
        for part in code.split("&&"):
            try:
                words = shlex.split(part)
            except ValueError:
                continue
            while words and words[0] in ("flock", "timeout") and len(words) > 2:
                words = words[2:]
            if not words:
                continue
            kind = None
            if words[0] == "quill" or words[0].endswith("/quill"):
                kind, argv = "quill", words[1:]
            elif words[0] == "torchrun" or words[0].endswith("/torchrun"):
                kind, argv = "torchrun", words[words.index("quillgpt") + 1:] if "quillgpt" in words else []
            elif (words[0] in ("python", "python3") or words[0].endswith("/python")) and len(words) > 1 \
                    and words[1].startswith("benchmarks/"):
                kind, argv = "benchmark", words[1:]
            if kind:
                found.append(DocCommand(path.relative_to(REPO).as_posix(), number, part.strip(), argv, kind,
                                        markers[0] if markers else None))
    return found


ALL = [c for doc in DOCS for c in doc_commands(doc)]


def test_the_docs_commands_are_found():
    quill = [c for c in ALL if c.kind == "quill"]
    assert len(quill) >= 50, len(quill)
    assert {"README.md", "docs/generation.md", "docs/training.md", "docs/data.md"} <= {c.doc for c in quill}
    # the extraction itself: continuation lines, `&&`, wrappers, markers, comments
    without_make = [c for c in quill if c.text.startswith(".venv/bin/quill train")]
    assert without_make and without_make[0].argv[:3] == ["train", "--config", "shakespeare-char-cpu"]
    assert split_comment("quill x --stop '#a' --y  # [gpu] b") == ("quill x --stop '#a' --y", "[gpu] b")


# programs the clone's venv has and a newcomer's PATH does not
VENV_PROGRAMS = {"quill", "python", "python3", "pip", "pip3", "lm-eval", "lm_eval", "torchrun", "pytest"}
OUTPUT_DIRS = ("runs/", "out/")


def shell_commands(path: Path):
    """(line number, words) of every command in the shell blocks of a document, `&&` split."""
    for number, line in shell_blocks(path.read_text(encoding="utf-8")):
        code, _ = split_comment(line.strip())
        for part in code.removeprefix("$ ").split("&&"):
            try:
                words = shlex.split(part)
            except ValueError:
                continue
            while words and words[0] in ("flock", "timeout") and len(words) > 2:
                words = words[2:]
            if words:
                yield number, words


def test_every_command_runs_in_a_newcomers_shell():
    """After `make demo` nothing of the project is on PATH: commands name `.venv/bin/` (the only
    bare python is the system's `python3 -m venv`)."""
    bare = [f"{doc.relative_to(REPO)}:{n}: {' '.join(w)}" for doc in DOCS for n, w in shell_commands(doc)
            if w[0] in VENV_PROGRAMS and w[:3] != ["python3", "-m", "venv"]]
    assert not bare, "write .venv/bin/PROGRAM (a newcomer's shell has no venv on PATH):\n" + "\n".join(bare)


def test_pip_lines_install_an_extra_that_exists_with_the_constraints():
    import tomllib

    extras = set(tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
                 ["optional-dependencies"])
    pips = [(doc, n, w) for doc in DOCS for n, w in shell_commands(doc) if Path(w[0]).name == "pip"]
    assert pips
    for doc, n, words in pips:
        where = f"{doc.relative_to(REPO)}:{n}: {' '.join(words)}"
        assert words[0] == ".venv/bin/pip" and "-c" in words and "constraints.txt" in words, where
        for spec in (w for w in words if w.startswith(".[")):
            assert set(spec[2:-1].split(",")) <= extras, f"{where}: no such extra in pyproject.toml"


def test_recipes_write_under_runs_and_out():
    """What a recipe writes in the clone stays out of git's way: runs/ and out/ are ignored (an
    absolute path, such as a shared file system for several nodes, is the reader's choice)."""
    ignored = (REPO / ".gitignore").read_text(encoding="utf-8").split()
    assert all(d in ignored for d in OUTPUT_DIRS)
    stray = []
    for c in ALL:
        outs = [c.argv[i + 1] for i, w in enumerate(c.argv[:-1]) if w in ("--out", "--json")]
        if c.kind == "quill" and c.argv[:1] in (["export-hf"], ["import-hf"]) and len(c.argv) > 2:
            outs.append(c.argv[2])
        stray += [f"{c.where}: {o}" for o in outs if not o.startswith(OUTPUT_DIRS) and not Path(o).is_absolute()]
    assert not stray, "write under runs/ or out/:\n" + "\n".join(stray)


def test_commands_that_cannot_run_here_are_marked_and_parse():
    parser = build_parser()
    for c in ALL:
        if c.kind == "torchrun":
            assert c.marker == "[gpu]", f"{c.where}: a torchrun line needs the [gpu] marker"
        if c.kind == "quill" and c.argv[:1] == ["serve"]:
            assert c.marker == "[server]", f"{c.where}: quill serve runs until stopped: mark it [server]"
        if c.kind in ("quill", "torchrun") and c.marker:
            args, extra = parser.parse_known_args(c.argv)
            assert extra == [] and getattr(args, "func", None), f"{c.where}: does not parse ({extra})"


def test_benchmark_commands_name_real_scripts_and_flags():
    helps: dict[str, str] = {}
    for c in (c for c in ALL if c.kind == "benchmark"):
        script = REPO / c.argv[0]
        assert script.is_file(), f"{c.where}: {c.argv[0]} does not exist"
        if c.argv[0] not in helps:
            proc = subprocess.run([sys.executable, str(script), "--help"], cwd=REPO, capture_output=True, text=True)
            assert proc.returncode == 0, f"{c.argv[0]} --help: {proc.stderr[-500:]}"
            helps[c.argv[0]] = proc.stdout
        for flag in (a.split("=")[0] for a in c.argv[1:] if a.startswith("--")):
            assert re.search(rf"{re.escape(flag)}\b", helps[c.argv[0]]), f"{c.where}: {flag} is not a flag of it"


# --- running them -----------------------------------------------------------------------------

def shrink(argv: list[str]) -> list[str]:
    """The tiny override for commands that train; others run as written."""
    if not argv or argv[0] not in TRAINS:
        return argv
    argv = list(argv)
    if argv[0] == "ladder":
        for i, word in enumerate(argv[:-1]):
            if word in LADDER_BUDGETS:
                argv[i + 1] = LADDER_BUDGETS[word]
    return argv + TINY


def user_files(root: Path, shakespeare: str) -> None:
    """The files the docs' commands stand for: a reader's own text, documents, a corpus folder, a
    held-out text, conversations."""
    text = shakespeare[:60_000]
    for name in ("input.txt", "mytext.txt", "my.txt", "corpus.txt"):
        (root / name).write_text(text, encoding="utf-8")
    pieces = [text[i:i + 5_000] for i in range(0, len(text), 5_000)]
    (root / "books.jsonl").write_text("".join(json.dumps({"body": p}) + "\n" for p in pieces), encoding="utf-8")
    (root / "corpus.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in pieces), encoding="utf-8")
    for d in ("corpus_dir", "corpus"):
        (root / d).mkdir()
        for i, p in enumerate(pieces[:6]):
            (root / d / f"{i:02d}.txt").write_text(p, encoding="utf-8")
    # tiny-shakespeare's end: its validation split, in none of the files above
    (root / "held_out.txt").write_text(shakespeare[-10_000:], encoding="utf-8")
    words = sorted(set(re.findall(r"\b[a-z]{3,8}\b", text.lower())))[:200]
    chats = [{"messages": [{"role": "user", "content": f"reverse: {w}"}, {"role": "assistant", "content": w[::-1]}]}
             for w in words]
    (root / "chats.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats), encoding="utf-8")


@pytest.fixture
def clone(tmp_path, monkeypatch, shakespeare, gpt2_cache, capsys, request):
    """A directory like a fresh clone's root, after `make demo`, with a seeded cache."""
    import shutil

    root = tmp_path / "clone"
    root.mkdir()
    for name in CLONE_DIRS:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).symlink_to(REPO / name, target_is_directory=True)
    shutil.copy(shakespeare, gpt2_cache.parent / "tinyshakespeare.txt")
    user_files(root, shakespeare.read_text(encoding="utf-8"))
    monkeypatch.chdir(root)
    monkeypatch.setattr(ladder_run, "time_step", lambda cfg: 0.01)
    monkeypatch.setattr(sys, "stdin", io.StringIO("ROMEO:\n"))  # `quill sample --interactive`, `quill chat`
    # tiny models: one thread is as fast, and steadier when other jobs share the cores
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    request.addfinalizer(lambda: torch.set_num_threads(threads))
    assert main(shrink(DEMO)) == 0, capsys.readouterr().err
    capsys.readouterr()
    return root


@pytest.mark.slow
@pytest.mark.parametrize("doc", [d.relative_to(REPO).as_posix() for d in DOCS])
def test_doc_commands_run_as_written(doc, clone, capsys):
    commands = [c for c in ALL if c.doc == doc and not c.marker
                and (c.kind == "quill" or c.kind == "benchmark" and c.argv[0] in DATA_SCRIPTS)]
    failures = []
    for c in commands:
        if c.kind == "benchmark":  # writes the data the next commands read
            proc = subprocess.run([sys.executable, *c.argv], capture_output=True, text=True)
            if proc.returncode != 0:
                failures.append(f"{c.where}\n    exit {proc.returncode}: {proc.stderr.strip()[-300:]}")
            continue
        if c.argv[:1] == ["serve"]:  # it would never return
            failures.append(f"{c.where}\n    not run: quill serve runs until stopped; mark it [server]")
            continue
        code = main(shrink(c.argv))
        out, err = capsys.readouterr()
        if code != 0:
            last = err.strip().splitlines()[-1] if err.strip() else out[-200:]
            failures.append(f"{c.where}\n    exit {code}: {last}")
    assert not failures, "commands that fail as written:\n" + "\n".join(failures)
