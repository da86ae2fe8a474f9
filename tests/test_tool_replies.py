"""Replies with tools, per row of a batch: a row whose model closes a call of a built-in tool
gets the result forced in (as the template renders a tool message) and goes on; a row that
calls a client's tool ends with finish "tool_calls" and the parsed call; malformed calls are
text (client) or an error result (built-ins); rounds are bounded; rows of one batch differ and
each gets what it would get alone. The model is scripted (tests/tool_models.py), so each row's
calls are known."""

from __future__ import annotations

import json

import pytest
from tool_models import ScriptedChat, tool_tokenizer

from quillgpt.chat import (
    Conversation,
    Message,
    ReplyStream,
    ToolUse,
    add_chat_tokens,
    render,
    reply_request,
    tool_replies,
    tool_result_ids,
)
from quillgpt.engine import complete
from quillgpt.errors import QuillError
from quillgpt.sampling import Sampling
from quillgpt.tokenizers.char import CharTokenizer
from quillgpt.tools import BUILTINS, ToolError, builtin_tools

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
CALC = BUILTINS["calculator"].definition()


@pytest.fixture(scope="module")
def tok():
    return tool_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return ScriptedChat(tok)


def user(text: str, tools=None) -> Conversation:
    return Conversation([Message("user", text)], tools)


def test_rows_of_one_batch_differ_and_each_gets_what_it_gets_alone(model, tok):
    convs = [user("12*34"), user("hello"), user("weather Oslo", [WEATHER]), user("chain 12*34+5"),
             user("bad", [WEATHER])]
    got = tool_replies(model, tok, convs, tools="calculator", temperature=0, max_new_tokens=200)
    # a built-in call: run here, its result forced in, the reply goes on
    assert (got[0].finish, got[0].content, got[0].tool_calls) == ("stop", "408", [])
    assert [m.role for m in got[0].messages] == ["assistant", "tool", "assistant"]
    assert got[0].messages[0].tool_calls[0].name == "calculator"
    assert json.loads(got[0].messages[0].tool_calls[0].arguments) == {"expression": "12*34"}
    call = got[0].messages[0].tool_calls[0]
    assert got[0].messages[1].content == "408" and got[0].messages[1].tool_call_id == call.id
    # no call at all
    assert (got[1].finish, got[1].content) == ("stop", "you said hello")
    assert [m.role for m in got[1].messages] == ["assistant"]
    # a client's tool: the row ends with the parsed call
    assert got[2].finish == "tool_calls" and got[2].content == ""
    assert [(c.name, c.arguments) for c in got[2].tool_calls] == [("get_weather", '{"city": "Oslo"}')]
    assert got[2].tool_calls[0].id.startswith("call_")
    assert got[2].messages[-1].tool_calls == got[2].tool_calls
    # two rounds of built-in calls
    assert got[3].content == "413" and [m.role for m in got[3].messages] == ["assistant", "tool"] * 2 + ["assistant"]
    assert [m.content for m in got[3].messages if m.role == "tool"] == ["408", "413"]
    # a malformed call with built-ins on: a clear error is the result, and the model answers
    assert got[4].finish == "stop" and got[4].content.startswith("got error: the arguments of the calculator call "
                                                                 "is not JSON")
    for conv, reply in zip(convs, got):
        alone = tool_replies(model, tok, [conv], tools="calculator", temperature=0, max_new_tokens=200)[0]
        assert (alone.content, alone.finish) == (reply.content, reply.finish)
        assert [m.role for m in alone.messages] == [m.role for m in reply.messages]


def test_forced_results_are_the_templates_tool_messages(model, tok):
    """The row's ids are exactly the template's rendering of the conversation with the reply's
    messages: what the model reads next time is what it read this time."""
    use = ToolUse.of("calculator")
    conv = user("chain 12*34+5")
    request = reply_request(tok, conv, Sampling(max_new_tokens=80, temperature=0), 2048, use)
    row = complete(model, tok, [request])[0]
    reply = tool_replies(model, tok, [conv], tools=use, temperature=0, max_new_tokens=200)[0]
    whole = render(tok, [*conv, *reply.messages], tools=use.definitions()).ids
    assert request.prompt + row.ids == whole
    assert row.forced.count(True) == len(tool_result_ids(tok, ["408"])) + len(tool_result_ids(tok, ["413"]))
    assert tok.decode(tool_result_ids(tok, ["1", "2"])) == "<|tool|>1<|end|><|tool|>2<|end|><|assistant|>"


def test_a_malformed_call_to_a_client_is_text_with_finish_stop(model, tok):
    got = tool_replies(model, tok, [user("bad", [WEATHER])], temperature=0)[0]
    assert (got.finish, got.content, got.tool_calls) == ("stop", "calculator {expression: 1}", [])
    assert [(m.role, m.content) for m in got.messages] == [("assistant", "calculator {expression: 1}")]
    # a call of a tool nobody defined is no call for the client either; built-ins answer it with an error
    got = tool_replies(model, tok, [user("undefined", [WEATHER])], temperature=0)[0]
    assert (got.finish, got.content, got.tool_calls) == ("stop", "get_time {}", [])
    got = tool_replies(model, tok, [user("undefined")], tools="calculator", temperature=0, max_new_tokens=100)[0]
    assert got.content == "got error: no tool named 'get_time' (tools: calculator)"


def test_history_that_outgrows_the_context_drops_whole_exchanges(tok):
    from quillgpt.chat import fit_history

    use = ToolUse.of("calculator")
    first = [Message("user", "12*34"), *tool_replies(ScriptedChat(tok), tok, [user("12*34")], tools=use,
                                                     temperature=0)[0].messages]
    assert [m.role for m in first] == ["user", "assistant", "tool", "assistant"]
    messages = [Message("system", "be brief"), *first, Message("user", "hi"), Message("assistant", "you said hi"),
                Message("user", "again")]
    whole = len(render(tok, messages, add_generation_prompt=True, tools=use.definitions()).ids)
    kept, dropped = fit_history(tok, messages, whole - 1, use.definitions())
    assert dropped == 4 and [m.role for m in kept] == ["system", "user", "assistant", "user"]
    kept, dropped = fit_history(tok, messages, 1, use.definitions())
    assert dropped == 6 and [m.content for m in kept] == ["be brief", "again"]


def test_tool_rounds_are_bounded(model, tok):
    use = ToolUse(builtin_tools("calculator"), max_rounds=2)
    got = tool_replies(model, tok, [user("loop")], tools=use, temperature=0, max_new_tokens=150)[0]
    results = [m.content for m in got.messages if m.role == "tool"]
    assert results[:2] == ["2", "2"] and len(results) > 2
    assert all(r == "error: no more tool calls in this reply (at most 2 rounds)" for r in results[2:])
    assert got.finish == "length"


def test_stream_parts_show_calls_and_results_in_order(model, tok):
    stream = ReplyStream(model, tok, [user("12*34")], tools="calculator", temperature=0)
    parts = [p for step in stream for p in step[0]]
    assert [(p.kind, p.text) for p in parts] == [("call", 'calculator {"expression": "12*34"}'), ("result", "408"),
                                                ("content", "4"), ("content", "0"), ("content", "8")]
    assert parts[1].call is parts[0].call
    assert stream.replies[0].content == "408"


def test_the_python_tool_runs_in_its_sandbox(model, tok):
    got = tool_replies(model, tok, [user("python print(6 * 7)"), user("python while True: pass")],
                       tools=ToolUse(builtin_tools("python")), temperature=0, max_new_tokens=120)
    assert got[0].content == "42"
    assert got[1].messages[1].content.startswith("error:") and "time limit" in got[1].messages[1].content


def test_tool_choice_none_ends_where_a_call_would_start(model, tok):
    use = ToolUse(builtin_tools("calculator"), calls=False)
    got = tool_replies(model, tok, [user("12*34"), user("hi")], tools=use, temperature=0)
    assert (got[0].finish, got[0].content, got[0].tool_calls) == ("stop", "", [])
    assert got[1].content == "you said hi"


def test_bad_tool_settings_are_one_clear_error(model, tok):
    with pytest.raises(ToolError, match="unknown tool 'abacus'"):
        tool_replies(model, tok, [user("1*2")], tools="calculator,abacus")
    clash = {"type": "function", "function": {"name": "calculator"}}
    with pytest.raises(ToolError, match="'calculator' is a built-in tool here"):
        tool_replies(model, tok, [user("1*2", [clash])], tools="calculator")
    plain = add_chat_tokens(CharTokenizer(list("abc")))
    with pytest.raises(QuillError, match="has not learnt tools"):
        tool_replies(ScriptedChat(plain), plain, [user("abc")], tools="calculator")
