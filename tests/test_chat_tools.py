"""Tool use in the chat template: conversations with tool_calls and tool messages in OpenAI's
shape, checked; rendered with the tool tokens, the loss on the assistant's calls and answers
only (never the tool list or the results); the Jinja twin gives quill's ids through
transformers' apply_chat_template(..., tools=...); training files with `tools` beside
`messages`; quill sft adds the tool tokens when the data uses tools."""

from __future__ import annotations

import json

import pytest

from quillgpt.chat import (
    CALL_TOKEN,
    CALLS_END_TOKEN,
    CHAT_TOKENS,
    TOOL_TOKENS,
    ConversationError,
    add_chat_tokens,
    check_messages,
    end_ids,
    has_chat_template,
    has_tool_template,
    jinja_template,
    render,
)
from quillgpt.conversations import ConversationData, read_conversations
from quillgpt.errors import QuillError
from quillgpt.tokenizers import ByteBPETokenizer, CharTokenizer
from quillgpt.tools import BUILTINS

CALC = BUILTINS["calculator"].definition()
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city, °C.",
                                            "parameters": {"type": "object", "properties": {
                                                "city": {"type": "string"}}, "required": ["city"]}}}


def call(id_: str, name: str, arguments: str | dict) -> dict:
    return {"id": id_, "type": "function", "function": {"name": name, "arguments": arguments}}


CONV = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 4821 times 37, and the weather in Zürich?"},
    {"role": "assistant", "content": None, "tool_calls": [
        call("call_1", "calculator", '{"expression": "4821*37"}'),
        call("call_2", "get_weather", {"city": "Zürich"})]},
    {"role": "tool", "tool_call_id": "call_2", "content": "21"},
    {"role": "tool", "tool_call_id": "call_1", "content": "178377"},
    {"role": "assistant", "content": "178377; 21 °C."},
    {"role": "user", "content": "Thanks"},
]
TOOLS = [CALC, WEATHER]
TEXT = (json.dumps({"messages": CONV, "tools": TOOLS}, ensure_ascii=False) + "\n") * 3


def char_tokenizer():
    return add_chat_tokens(CharTokenizer.train(TEXT), tools=True)


def test_tool_tokens_are_added_only_when_asked():
    base = CharTokenizer.train(TEXT)
    plain = add_chat_tokens(base)
    assert has_chat_template(plain) and not has_tool_template(plain)
    tok = add_chat_tokens(plain, tools=True)
    assert has_tool_template(tok) and tok.vocab_size == base.vocab_size + 8
    assert [tok.special_tokens[t] for t in CHAT_TOKENS] == [plain.special_tokens[t] for t in CHAT_TOKENS]
    # typed text never produces them
    bpe = add_chat_tokens(ByteBPETokenizer.train(TEXT, 300), tools=True)
    typed = "<|tool_call|>calculator {} <|end_calls|>"
    assert not set(bpe.encode_ordinary(typed)) & {bpe.special_tokens[t] for t in TOOL_TOKENS}
    with pytest.raises(QuillError, match="has not learnt tools"):
        render(plain, CONV[:3], tools=TOOLS)


def test_render_learns_calls_and_answers_never_results_or_the_tool_list():
    tok = char_tokenizer()
    r = render(tok, CONV[:6], tools=TOOLS)
    text = tok.decode(r.ids)
    tools_line = "\n".join(json.dumps(t, ensure_ascii=False) for t in TOOLS)
    assert text == (f"<|tools|>{tools_line}<|end|><|system|>Be brief.<|end|>"
                    "<|user|>What is 4821 times 37, and the weather in Zürich?<|end|>"
                    '<|assistant|><|tool_call|>calculator {"expression": "4821*37"}'
                    '<|tool_call|>get_weather {"city": "Zürich"}<|end_calls|>'
                    "<|tool|>21<|end|><|tool|>178377<|end|><|assistant|>178377; 21 °C.<|end|>")
    learnt = "".join(tok.decode([i]) for i, m in zip(r.ids, r.mask) if m)
    assert learnt == ('<|tool_call|>calculator {"expression": "4821*37"}<|tool_call|>get_weather {"city": "Zürich"}'
                      "<|end_calls|>178377; 21 °C.<|end|>")
    # what generation continues from: the results, then the assistant's turn
    prompt = render(tok, CONV[:5], add_generation_prompt=True, tools=TOOLS)
    assert prompt.ids == r.ids[: len(prompt.ids)]
    assert tok.decode(prompt.ids).endswith("<|tool|>178377<|end|><|assistant|>")


def test_end_ids_leave_calls_to_the_tool_hook_when_tools_are_on():
    tok = char_tokenizer()
    s = tok.special_tokens
    assert s[CALL_TOKEN] not in end_ids(tok) and s[CALLS_END_TOKEN] in end_ids(tok)
    assert s[CALLS_END_TOKEN] not in end_ids(tok, tools=True) and s["<|end|>"] in end_ids(tok, tools=True)


@pytest.mark.parametrize("change, fragment", [
    (lambda c: c[2]["tool_calls"][0].pop("id"), "tool_calls\\[0\\]: missing id"),
    (lambda c: c[2]["tool_calls"][0]["function"].update(arguments="{expression: 1"), "arguments is not JSON"),
    (lambda c: c[2]["tool_calls"][0]["function"].update(arguments="[1]"), "must be a JSON object"),
    (lambda c: c[2]["tool_calls"][0]["function"].update(name="calc ulator"), "function.name must be"),
    (lambda c: c[2]["tool_calls"][0].update(type="code"), 'type must be "function"'),
    (lambda c: c[2]["tool_calls"][1].update(id="call_1"), "two tool calls share an id"),
    (lambda c: c[3].update(tool_call_id="call_9"), "a tool message answering no call of message 2"),
    (lambda c: c[3].pop("tool_call_id"), "missing tool_call_id"),
    (lambda c: c.insert(1, {"role": "tool", "tool_call_id": "x", "content": "1"}), "answering no call"),
    (lambda c: c.pop(4), "before every call of message 2 is answered"),
    (lambda c: c[1].update(tool_calls=[call("c", "calculator", "{}")]), "only assistant messages carry tool_calls"),
    (lambda c: c[2].update(tool_calls=[]), "tool_calls must be a non-empty list"),
    (lambda c: c[2].pop("tool_calls"), "content must be a string"),
    (lambda c: c[3].update(content=None), "content must be a string"),
    (lambda c: c.insert(5, {"role": "user", "content": "hm"}), "roles out of order"),
])
def test_malformed_tool_conversations_name_the_fault(change, fragment):
    conv = json.loads(json.dumps(CONV))
    change(conv)
    with pytest.raises(ConversationError, match=fragment):
        check_messages(conv, for_training=True)


def test_prompts_may_end_with_tool_results_and_training_with_calls():
    check_messages(CONV[:5])  # the results are in: the assistant speaks next
    with pytest.raises(ConversationError, match="not all answered"):
        check_messages(CONV[:4])
    check_messages(CONV[:3], for_training=True)  # learning to call
    with pytest.raises(ConversationError, match="not all answered"):
        check_messages(CONV[:4], for_training=True)
    with pytest.raises(ConversationError, match="the user's \\(or a tool's\\)"):
        check_messages(CONV[:6])


def test_jinja_with_tools_gives_quills_ids_in_transformers(tmp_path):
    pytest.importorskip("transformers")
    from transformers import AutoTokenizer

    from quillgpt.hf import tokenizer_to_hf_files

    tok = add_chat_tokens(ByteBPETokenizer.train(TEXT, 400), tools=True)
    for name, text in tokenizer_to_hf_files(tok, 1024).items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    hf = AutoTokenizer.from_pretrained(tmp_path)
    assert hf.chat_template == jinja_template(tools=True)
    for n in (2, 5, 7):
        ours = render(tok, CONV[:n], add_generation_prompt=True, tools=TOOLS).ids
        theirs = hf.apply_chat_template(CONV[:n], tools=TOOLS, add_generation_prompt=True, tokenize=True,
                                        return_dict=False)
        assert theirs == ours, n
    full = hf.apply_chat_template(CONV[:6], tools=TOOLS, tokenize=True, return_dict=False)
    assert full == render(tok, CONV[:6], tools=TOOLS).ids
    assert hf.apply_chat_template(CONV[1:2], tokenize=True, return_dict=False) == render(tok, CONV[1:2]).ids
    from jinja2.exceptions import TemplateError  # the template's raise_exception, as transformers runs it

    for bad, fragment in [([CONV[1], CONV[3]], "answering no call"), (CONV[:4] + [CONV[5]], "alternate"),
                          ([CONV[1], CONV[1]], "alternate"), ([{"role": "wizard", "content": "x"}], "unknown role")]:
        with pytest.raises(TemplateError, match=fragment):
            hf.apply_chat_template(bad, tokenize=False)


# --- training files --------------------------------------------------------------------------------

def write_lines(path, lines) -> str:
    path.write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines), encoding="utf-8")
    return str(path)


def test_a_training_file_with_tools_trains_on_calls_and_answers(tmp_path):
    line = {"messages": CONV[1:6], "tools": TOOLS}
    path = write_lines(tmp_path / "t.jsonl", [line] * 4)
    convs = read_conversations(path)
    assert convs.conversations[0].tools == TOOLS
    tok = char_tokenizer()
    data = ConversationData.build(tok, convs.conversations, block_size=1024, val_fraction=0.25)
    x, y = data.train.inputs[0], data.train.targets[0]
    learnt = "".join(tok.decode([int(t)]) for t in y if t >= 0)
    assert learnt.startswith("<|tool_call|>calculator") and learnt.endswith("<|end_calls|>178377; 21 °C.<|end|>")
    assert "178377<|end|><|assistant|>" not in learnt and "get_weather\", \"description" not in learnt
    assert int(x[0]) == tok.special_tokens["<|tools|>"]


@pytest.mark.parametrize("line, fragment", [
    ({"messages": CONV[1:6], "tools": [WEATHER]}, "calls 'calculator', which the line's tools do not define"),
    ({"messages": CONV[1:6], "tools": [{"type": "function", "function": {"name": "a b"}}]}, "name must be"),
    ({"messages": CONV[1:6], "tools": "calculator"}, "must be a list"),
    ({"messages": [CONV[1], {"role": "tool", "tool_call_id": "x", "content": "1"}]}, "answering no call"),
])
def test_bad_tool_lines_stop_with_their_line_number(tmp_path, line, fragment):
    good = {"messages": CONV[1:6]}
    path = write_lines(tmp_path / "t.jsonl", [good, good, line])
    with pytest.raises(QuillError, match=f"line 3: .*{fragment}"):
        read_conversations(path)
    assert len(read_conversations(path, skip_invalid=True).conversations) == 2


def test_sft_tokenizer_has_tool_tokens_only_for_tool_data(tmp_path):
    from quillgpt.config import load_config
    from quillgpt.sft import sft_tokenizer

    cfg = load_config(None, {"tokenizer": "char"})
    with_tools = read_conversations(write_lines(tmp_path / "a.jsonl", [{"messages": CONV[1:6], "tools": TOOLS}]))
    plain = read_conversations(write_lines(tmp_path / "b.jsonl", [{"messages": [CONV[1], CONV[5]]}]))
    tok = sft_tokenizer(cfg, with_tools.conversations, None)
    assert has_tool_template(tok)
    render(tok, with_tools.conversations[0])  # every character of the tool list and calls is in it
    assert not has_tool_template(sft_tokenizer(cfg, plain.conversations, None))
