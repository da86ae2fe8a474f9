"""`quill chat RUN --tools calculator[,python]`: one-shot and interactive, the model's calls and
the tools' results shown as such on marked lines; `ChatSession` keeps the calls and results in
its history (and renders them next turn); bad tool names and models that never learnt tools
are one line and exit status 2. The model is scripted (tests/tool_models.py); the run is handed
to the command line in place of loading one from disk."""

from __future__ import annotations

import io
from types import SimpleNamespace

import pytest
from tool_models import ScriptedChat, tool_tokenizer

from quillgpt import cli
from quillgpt.chat import ChatSession, ReplyPart, add_chat_tokens, render
from quillgpt.errors import QuillError
from quillgpt.terminal import DIM, ChatTerminal, tool_line
from quillgpt.tokenizers.char import CharTokenizer


def scripted_run(tok=None):
    tok = tok or tool_tokenizer()
    model = ScriptedChat(tok)
    return SimpleNamespace(model=model, tokenizer=tok, config=SimpleNamespace(model=model.config))


@pytest.fixture
def run(monkeypatch):
    r = scripted_run()
    monkeypatch.setattr(cli, "open_run", lambda args: r)
    return r


def test_chat_message_with_tools_shows_the_call_and_result(run, capsys):
    code = cli.main(["chat", "runs/calc", "--tools", "calculator", "--temperature", "0", "--message", "12*34"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out == '[tool call] calculator {"expression": "12*34"}\n[tool result] 408\n408\n'
    code = cli.main(["chat", "runs/calc", "--tools", "calculator,python", "--temperature", "0",
                     "--message", "python print(2 ** 10)"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out == '[tool call] python {"code": "print(2 ** 10)"}\n[tool result] 1024\n1024\n'


def test_chat_without_tools_is_plain_chat(monkeypatch, capsys):
    plain = scripted_run(add_chat_tokens(CharTokenizer(list(tool_tokenizer().chars))))
    monkeypatch.setattr(cli, "open_run", lambda args: plain)
    assert cli.main(["chat", "runs/calc", "--temperature", "0", "--message", "hello"]) == 0
    assert capsys.readouterr().out == "you said hello\n"


def test_interactive_chat_with_tools(run, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("12*34\nchain 12*34+5\nhi\n"))
    assert cli.main(["chat", "runs/calc", "--tools", "calculator", "--temperature", "0"]) == 0
    out, err = capsys.readouterr()
    assert out == ('[tool call] calculator {"expression": "12*34"}\n[tool result] 408\n408\n'
                   '[tool call] calculator {"expression": "12*34"}\n[tool result] 408\n'
                   '[tool call] calculator {"expression": "408+5"}\n[tool result] 413\n413\n'
                   "you said hi\n")
    assert "tools: calculator" in err


@pytest.mark.parametrize("argv, fragment", [
    (["--tools", "calculator,abacus"], "unknown tool 'abacus'; the built-in tools are calculator, python"),
    (["--tools", "calculator"], "this model has not learnt tools"),
])
def test_bad_tools_are_one_line_and_status_2(monkeypatch, capsys, argv, fragment):
    plain = scripted_run(add_chat_tokens(CharTokenizer(list("abc "))))
    monkeypatch.setattr(cli, "open_run", lambda args: plain)
    assert cli.main(["chat", "runs/calc", *argv, "--message", "1*2"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("quill: error: ")
    assert fragment in err and len(err.strip().splitlines()) == 1


def test_the_session_keeps_calls_and_results_in_its_history():
    r = scripted_run()
    session = ChatSession(r.model, r.tokenizer, sampling={"temperature": 0}, tools="calculator")
    pieces = list(session.send("chain 12*34+5"))
    assert [p.kind for p in pieces if isinstance(p, ReplyPart)] == ["call", "result", "call", "result"]
    assert "".join(p for p in pieces if isinstance(p, str)) == "413"
    assert [m.role for m in session.history] == ["user", "assistant", "tool", "assistant", "tool", "assistant"]
    assert [m.content for m in session.history if m.role == "tool"] == ["408", "413"]
    list(session.send("hi"))
    prompt = render(r.tokenizer, session.history, tools=session.tools.definitions()).ids
    assert r.tokenizer.decode(prompt).count("<|tool|>") == 2  # the next turn reads the earlier rounds
    # a reply stopped right after its call keeps the call and its result, in a valid order
    stopped = session.send("12*34")
    assert next(stopped).kind == "call"
    stopped.close()
    assert [m.role for m in session.history[-4:]] == ["user", "assistant", "tool", "assistant"]
    assert list(session.send("hello")) == ["y", "o", "u", " ", "s", "a", "i", "d", " ", "h", "e", "l", "l", "o"]


def test_tool_lines_are_dimmed_at_a_colour_terminal():
    part = ReplyPart("result", "408\n")
    assert tool_line(part) == "[tool result] 408"
    assert tool_line(part, color=True) == f"{DIM}[tool result] 408\x1b[0m"
    terminal = ChatTerminal(SimpleNamespace())
    assert terminal.show("So: ") == "So: "
    assert terminal.show(ReplyPart("call", "calculator {}")) == "\n[tool call] calculator {}\n"


def test_a_session_needs_tool_tokens_for_tools():
    plain = add_chat_tokens(CharTokenizer(list("abc")))
    with pytest.raises(QuillError, match="has not learnt tools"):
        ChatSession(ScriptedChat(plain), plain, tools="calculator")
