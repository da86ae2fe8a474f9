"""The reliability audit (benchmarks/audit.py) as tests: every hostile or careless case through the
real command line ends in one line on stderr and exit status 2 with no file changed (or, where the
input is extreme but valid, exit 0); every hostile HTTP request gets its 4xx JSON error, the
server logs no traceback, and a normal request right after it completes.

`python benchmarks/audit.py` runs the same cases and prints the table in docs/reliability.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import audit  # noqa: E402

CLI_CASES = audit.cli_cases()
HTTP_CASES = audit.http_cases()
TOOL_CASES = audit.tool_cases()


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """The audit's directory: texts, a trained run and a chat run, a BPE run and its HF export,
    conversation files, task YAMLs, hostile files."""
    path = tmp_path_factory.mktemp("audit")
    audit.build_fixtures(path)
    return path


@pytest.mark.parametrize("case", CLI_CASES, ids=[c.id for c in CLI_CASES])
def test_cli_case(root, case):
    result = audit.run_cli_case(case, root)
    assert result.held, result.detail


@pytest.mark.parametrize("case", TOOL_CASES, ids=[c.id for c in TOOL_CASES])
def test_tool_case(root, case):
    result = audit.run_tool_case(case, root)
    assert result.held, result.detail


@pytest.fixture(scope="module")
def server(root):
    pytest.importorskip("fastapi", reason="quill serve needs the serve extra")
    with audit.running_servers(root) as (urls, watch):
        yield urls, watch


@pytest.mark.parametrize("case", HTTP_CASES, ids=[c.id for c in HTTP_CASES])
def test_http_case(server, case):
    urls, watch = server
    result = audit.run_http_case(case, urls, watch)
    assert result.held, result.detail
    assert result.latency_s is not None  # the normal request after it completed (timed by the script)


def test_every_entry_point_is_audited():
    """Each `quill` command has cases here: a new command needs its own."""
    from quillgpt.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    commands = {"tokenizer train" if name == "tokenizer" else name for name in sub.choices}
    assert commands <= {c.entry for c in CLI_CASES}, commands - {c.entry for c in CLI_CASES}
