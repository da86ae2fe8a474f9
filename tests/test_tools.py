"""The built-in tools and tool definitions: the calculator against Python's own arithmetic and
its bounds; the python sandbox's hostile cases (a loop, a fork bomb, a 10 GB allocation, writing
to the home directory, reading the environment's secrets, the network) ending in clear errors
with nothing outside its directory changed; OpenAI tool definitions checked."""

from __future__ import annotations

import os
import random
import tempfile
from fractions import Fraction
from pathlib import Path

import pytest

from quillgpt.errors import QuillError
from quillgpt.tools import (
    BUILTINS,
    ToolError,
    builtin_tools,
    check_tool_definitions,
    parse_arguments,
    run_builtin,
    sandbox,
)
from quillgpt.tools.calculator import MAX_DIGITS, CalculatorError, calculate, evaluate
from quillgpt.tools.sandbox import Limits, SandboxError, run_python

# --- the calculator ------------------------------------------------------------------------------

@pytest.mark.parametrize("expression, expected", [
    ("4821 * 37", "178377"), ("4821*37", "178377"), ("4821 x 37", "178377"), ("4821 × 37", "178377"),
    ("(1 + 2) / 8", "0.375"), ("0.1 + 0.2", "0.3"), ("1/3", "0.3333333333333333333333333333"),
    ("2 ** -3", "0.125"), ("-2 ** 2", "-4"), ("2 ** 3 ** 2", "512"), ("2 ^ 10", "1024"), ("(-3) ** 3", "-27"),
    ("7 // 2", "3"), ("-7 // 2", "-4"), ("7 % 3", "1"), ("-7 % 3", "2"), (".5 * 4", "2"), ("10 - 2 - 3", "5"),
    ("8 / 4 / 2", "1"), ("2 * (3 + 4) * 5", "70"), ("  12  ", "12"), ("+-+3", "-3"), ("99999 * 99999", "9999800001"),
    ("10 ** 999", "1" + "0" * 999), ("6 ÷ 4", "1.5"), ("5 − 7", "-2"),
])
def test_calculator_answers(expression, expected):
    assert calculate(expression) == expected


def test_calculator_agrees_with_python_on_random_integer_expressions():
    rng = random.Random(0)
    for _ in range(300):
        terms = [str(rng.randint(0, 10**rng.randint(1, 6))) for _ in range(rng.randint(1, 5))]
        ops = [rng.choice(["+", "-", "*", "//", "%"]) for _ in terms[1:]]
        expression = terms[0] + "".join(f" {o} {t}" for o, t in zip(ops, terms[1:]))
        try:
            expected = eval(expression)  # noqa: S307 - the reference: integers and operators only
        except ZeroDivisionError:
            with pytest.raises(CalculatorError, match="division by zero"):
                calculate(expression)
            continue
        assert calculate(expression) == str(expected), expression


def test_calculator_is_exact_with_decimals():
    assert evaluate("0.1 * 3") == Fraction(3, 10)
    assert calculate("1.25 * 4.4") == "5.5"
    assert calculate("1 / 7 * 7") == "1"


@pytest.mark.parametrize("expression, fragment", [
    ("9 ** 9 ** 9", "digits"), ("10 ** 100000", "digits"), ("2 ** 0.5", "integer"), ("1 / 0", "division by zero"),
    ("1 // 0", "division by zero"), ("5 % 0", "division by zero"), ("0 ** -1", "division by zero"),
    ("1 +", "ends too early"), ("(1 + 2", "not closed"), ("1 2", "after a complete expression"),
    ("abs(1)", "unexpected 'a'"), ("__import__('os')", "unexpected '_'"), ("1e5", "unexpected 'e'"),
    ("", "empty"), ("   ", "empty"), ("(" * 200 + "1" + ")" * 200, "nested"), ("-" * 200 + "1", "nested"),
    ("1" * (MAX_DIGITS + 1), "digits"), ("1+" * 1100 + "1", "longer than"),
    (f"{'9' * 600} * {'9' * 600}", "digits"), ("2 ** 2 ** 2 ** 2 ** 2", "digits"),
])
def test_calculator_refuses_with_a_clear_error(expression, fragment):
    with pytest.raises(CalculatorError, match=fragment):
        calculate(expression)


def test_calculator_errors_are_quill_errors_and_not_strings():
    with pytest.raises(QuillError):
        calculate(42)  # type: ignore[arg-type]


# --- running built-ins ---------------------------------------------------------------------------

def test_run_builtin_gives_results_and_errors_as_text():
    tools = builtin_tools("calculator")
    assert run_builtin(tools, "calculator", '{"expression": "4821*37"}').content == "178377"
    assert run_builtin(tools, "calculator", {"expression": "2+2"}).content == "4"
    for name, arguments, fragment in [
        ("calculator", '{"expression": "1/0"}', "division by zero"),
        ("calculator", '{"expr": "1"}', "takes one argument, 'expression'"),
        ("calculator", '{"expression": 5}', "takes one argument"),
        ("calculator", "[1, 2]", "JSON object"),
        ("calculator", "not json", "not JSON"),
        ("python", '{"code": "1"}', "no tool named 'python' (tools: calculator)"),
    ]:
        result = run_builtin(tools, name, arguments)
        assert not result.ok and result.content.startswith("error: ") and fragment in result.content


def test_builtin_tools_by_name():
    assert list(builtin_tools("calculator, python")) == ["calculator", "python"]
    assert builtin_tools(None) == {} and builtin_tools("") == {}
    with pytest.raises(ToolError, match="unknown tool 'shell'; the built-in tools are calculator, python"):
        builtin_tools("calculator,shell")
    for tool in BUILTINS.values():  # their definitions pass the checks any request's tools pass
        assert check_tool_definitions([tool.definition()]) == [tool.definition()]


def test_parse_arguments():
    assert parse_arguments('{"a": 1}') == {"a": 1}
    with pytest.raises(ToolError, match="JSON object"):
        parse_arguments('"x"')
    with pytest.raises(ToolError, match="not JSON"):
        parse_arguments("[" * 100_000)


# --- tool definitions ------------------------------------------------------------------------------

def fn(**function) -> dict:
    return {"type": "function", "function": {"name": "f", **function}}


@pytest.mark.parametrize("tools, fragment", [
    ("calculator", "must be a list"),
    ([{"type": "retrieval"}], r"tools\[0\] must be"),
    ([{"type": "function"}], "function must be an object"),
    ([fn(name="")], "name must be"),
    ([fn(name="a b")], "name must be"),
    ([fn(name="x" * 65)], "name must be"),
    ([fn(), fn()], "a second tool named 'f'"),
    ([fn(description=3)], "description must be a string"),
    ([fn(parameters="object")], "JSON Schema object"),
    ([fn(parameters={"type": "string"})], "must describe an object"),
    ([fn(parameters={"type": "obj"})], "not a JSON Schema type"),
    ([fn(parameters={"type": "object", "properties": []})], "properties must be an object"),
    ([fn(parameters={"type": "object", "properties": {"a": 1}})], r"properties\.a must be a JSON Schema"),
    ([fn(parameters={"type": "object", "properties": {}, "required": ["a"]})], "not among its properties"),
    ([fn(parameters={"type": "object", "required": "a"})], "required must be a list"),
    ([fn(parameters={"type": "object", "properties": {"a": {"type": "array", "items": 5}}})], "items"),
    ([fn(strict="yes")], "strict"),
    ([fn(name=f"f{i}") for i in range(129)], "at most 128"),
])
def test_bad_tool_definitions_are_named(tools, fragment):
    with pytest.raises(ToolError, match=fragment):
        check_tool_definitions(tools)


def test_a_deep_schema_is_refused_before_recursion_runs_out():
    schema: dict = {"type": "object"}
    for _ in range(10_000):
        schema = {"type": "object", "properties": {"a": schema}}
    with pytest.raises(ToolError, match="nested more than"):
        check_tool_definitions([fn(parameters=schema)])


def test_good_definitions_pass_unchanged():
    tools = [fn(description="adds", parameters={"type": "object", "properties": {
        "a": {"type": "integer"}, "b": {"type": ["number", "null"]},
        "c": {"type": "array", "items": {"type": "string"}}, "d": {"enum": ["x", "y"]}},
        "required": ["a"], "additionalProperties": False}, strict=True),
        {"type": "function", "function": {"name": "g_2-x"}}]
    assert check_tool_definitions(tools) == tools


# --- the python sandbox ------------------------------------------------------------------------------

FAST = Limits(seconds=2)


def test_python_prints_and_shows_a_last_expression():
    assert run_python("print(6 * 7)", FAST) == "42\n"
    assert run_python("x = 3\nx ** 2", FAST) == "9\n"
    assert run_python("import math, fractions\nmath.factorial(20)", FAST) == "2432902008176640000\n"
    assert run_python("None", FAST) == ""


def test_python_errors_end_in_the_errors_last_line():
    with pytest.raises(SandboxError, match="ZeroDivisionError: division by zero"):
        run_python("print('before')\n1 / 0", FAST)
    with pytest.raises(SandboxError, match="SyntaxError"):
        run_python("def (", FAST)


@pytest.mark.parametrize("code, fragment", [
    ("while True: pass", "the time limit"),
    ("import time\ntime.sleep(60)", "the time limit"),
    ("import os\nwhile True:\n    os.fork()", "does not allow os.fork"),
    ("import subprocess\nsubprocess.run(['sh', '-c', ':(){ :|:& };:'])", "does not allow importing subprocess"),
    ("import _posixsubprocess", "does not allow importing _posixsubprocess"),
    ("import os\nos.system('echo hi')", "does not allow os.system"),
    ("import os\nos.kill(os.getppid(), 9)", "does not allow os.kill"),
    ("x = bytearray(10 * 1024 ** 3)", "MemoryError"),
    ("x = [0] * (10 ** 10)", "MemoryError"),
    ("import socket", "does not allow importing socket"),
    ("import ctypes", "does not allow importing ctypes"),
    ("import os\nos.listdir('/')", "does not allow listing '/'"),
    ("open('/etc/passwd').read()", "does not allow reading '/etc/passwd'"),
    ("import os\nopen(f'/proc/{os.getppid()}/environ').read()", "does not allow reading"),
    ("import gc\ngc.get_objects()", "does not allow gc.get_objects"),
    ("open('big', 'wb').write(b'x' * (64 << 20))", "File too large"),
])
def test_python_hostile_code_ends_in_a_clear_error(code, fragment):
    with pytest.raises(SandboxError, match=fragment):
        run_python(code, FAST)


def test_python_cannot_write_outside_its_directory_and_leaves_nothing_behind(monkeypatch):
    made = []

    def mkdtemp(**kw):
        made.append(Path(real_mkdtemp(**kw)))
        return str(made[-1])

    real_mkdtemp = tempfile.mkdtemp
    monkeypatch.setattr(sandbox.tempfile, "mkdtemp", mkdtemp)
    home = Path.home()
    before = sorted(os.listdir(home))
    target = home / "quill-sandbox-pwned.txt"
    with pytest.raises(SandboxError, match="does not allow writing"):
        run_python(f"open({str(target)!r}, 'w').write('x')", FAST)
    with pytest.raises(SandboxError, match="does not allow os.rename"):
        run_python(f"open('a', 'w').write('x')\nimport os\nos.rename('a', {str(home / 'a')!r})", FAST)
    # its own directory is its home: writing there works, and it is removed afterwards
    out = run_python("import os\nopen(os.path.expanduser('~/note.txt'), 'w').write('x')\n"
                     "print(sorted(n for n in os.listdir('.') if not n.startswith('.')))", FAST)
    assert out == "['main.py', 'note.txt']\n"
    assert sorted(os.listdir(home)) == before and not target.exists()
    assert len(made) == 3 and not any(p.exists() for p in made)  # every working directory removed


def test_python_sees_none_of_quills_environment(monkeypatch):
    monkeypatch.setenv("QUILL_SECRET_TOKEN", "hunter2")
    out = run_python("import os\nprint(sorted(os.environ))\nprint('hunter2' in repr(dict(os.environ)))", FAST)
    assert out == "['HOME', 'LANG', 'PATH', 'TMPDIR']\nFalse\n"


def test_python_output_is_cut_and_code_is_bounded():
    out = run_python("print('x' * 100_000)", Limits(seconds=2, output_chars=100))
    assert out.startswith("x" * 100) and out.endswith("(output cut)") and len(out) < 200
    with pytest.raises(SandboxError, match="longer than"):
        run_python("1\n" * 20_000, FAST)


def test_python_has_no_network():
    code = ("import urllib.request\nurllib.request.urlopen('http://127.0.0.1:9', timeout=1)")
    with pytest.raises(SandboxError):
        run_python(code, FAST)
