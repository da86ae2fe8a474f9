"""The chat template: special tokens in every tokenizer, messages -> ids + loss mask, the checks
on messages, the Jinja template against transformers, replies and the history that overflows."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import seed_cache

from quillgpt.chat import (
    CHAT_TOKENS,
    ChatSession,
    ConversationError,
    Message,
    add_chat_tokens,
    check_messages,
    end_ids,
    exact_match,
    fit_history,
    has_chat_template,
    jinja_template,
    render,
    replies,
)
from quillgpt.config import ModelConfig
from quillgpt.errors import QuillError
from quillgpt.model import GPT
from quillgpt.tokenizers import (
    ByteBPETokenizer,
    CharTokenizer,
    SyllableTokenizer,
    load_tokenizer,
    tokenizer_from_dict,
)

TEXT = ("To be, or not to be, that is the question: <|end|> whether 'tis nobler in the mind\n"
        "You answer briefly. Be brief. Who said it? Hamlet. And then? The question. Again?\n") * 4
CONV = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "Who said it?"},
    {"role": "assistant", "content": "Hamlet, to be or not to be."},
    {"role": "user", "content": "And then?"},
    {"role": "assistant", "content": "The question."},
]


def gpt2():
    from quillgpt.tokenizers.gpt2 import GPT2_RANKS_NAME, gpt2_tokenizer

    seed_cache(GPT2_RANKS_NAME)
    return gpt2_tokenizer()


def tokenizers():
    return {
        "char": CharTokenizer.train(TEXT + "?HAWY"),
        "syllable": SyllableTokenizer.train(TEXT, 64),
        "bpe": ByteBPETokenizer.train(TEXT, 300),
    }


# --- special tokens in every tokenizer ---------------------------------------------------------

@pytest.mark.parametrize("kind", ["char", "syllable", "bpe", "gpt2"])
def test_chat_tokens_are_appended_specials_that_text_never_produces(kind):
    tok = gpt2() if kind == "gpt2" else tokenizers()[kind]
    assert not has_chat_template(tok)
    chat = add_chat_tokens(tok)
    assert has_chat_template(chat) and chat.vocab_size == tok.vocab_size + 4
    ids = [chat.special_tokens[t] for t in CHAT_TOKENS]
    assert ids == list(range(tok.vocab_size, tok.vocab_size + 4))
    assert add_chat_tokens(chat).to_dict() == chat.to_dict()  # idempotent
    # a user typing the literal string gets ordinary tokens, the same as without the specials
    typed = "a <|user|> b <|end|>"
    if kind != "char":
        assert chat.encode_ordinary(typed) == tok.encode_ordinary(typed)
        assert not set(chat.encode_ordinary(typed)) & set(ids)
    assert chat.decode(ids) == "".join(CHAT_TOKENS)
    # saved and loaded, the same tokenizer; the ordinary tokens keep their ids
    again = tokenizer_from_dict(json.loads(json.dumps(chat.to_dict())))
    assert again == chat and again.encode("To be") == tok.encode("To be")


def test_tokenizer_files_without_specials_are_unchanged():
    """A tokenizer that never met the chat template writes its file as before it existed: char
    and syllable files have no special_tokens at all, BPE's holds only its own <|endoftext|>,
    the last id."""
    for kind, tok in tokenizers().items():
        d = tok.to_dict()
        if kind == "bpe":
            assert d["special_tokens"] == {"<|endoftext|>": tok.vocab_size - 1}, kind
        else:
            assert "special_tokens" not in d, kind


@pytest.mark.parametrize("specials, fragment", [
    ({"": 5}, "non-empty"),
    ({"<|a|>": 4}, "ids must be"),
    ({"<|a|>": 6, "<|b|>": 6}, "ids must be"),
    ({"<|a|>": "5"}, "ids must be"),
    (["<|a|>"], "mapping"),
])
def test_bad_special_tokens_in_a_char_file_are_refused(tmp_path, specials, fragment):
    path = tmp_path / "tok.json"
    path.write_text(json.dumps({"kind": "char", "chars": list("abcde"), "special_tokens": specials}))
    with pytest.raises(QuillError, match=fragment):
        load_tokenizer(path)


# --- messages -> ids + mask --------------------------------------------------------------------

def test_render_marks_only_assistant_content_and_its_end():
    tok = add_chat_tokens(tokenizers()["char"])
    s = tok.special_tokens
    r = render(tok, CONV)
    assert len(r.ids) == len(r.mask)
    learnt = "".join(tok.decode([i]) for i, m in zip(r.ids, r.mask) if m)
    assert learnt == "Hamlet, to be or not to be.<|end|>The question.<|end|>"
    assert r.ids[0] == s["<|system|>"] and r.ids[-1] == s["<|end|>"]
    assert tok.decode(r.ids) == ("<|system|>You answer briefly.<|end|><|user|>Who said it?<|end|>"
                                 "<|assistant|>Hamlet, to be or not to be.<|end|><|user|>And then?<|end|>"
                                 "<|assistant|>The question.<|end|>")
    prompt = render(tok, CONV[:4], add_generation_prompt=True)
    assert prompt.ids == r.ids[: len(prompt.ids)] and prompt.ids[-1] == s["<|assistant|>"]
    assert not prompt.mask[-1]  # the generation prompt is context


def test_a_model_without_the_template_is_told_so():
    with pytest.raises(QuillError, match="no chat template"):
        render(tokenizers()["char"], CONV)


@pytest.mark.parametrize("messages, training, fragment", [
    ("hello", False, "non-empty list"),
    ([], False, "non-empty list"),
    (["hi"], False, "not an object"),
    ([{"role": "bot", "content": "x"}], False, "unknown role 'bot'"),
    ([{"role": "user", "content": 3}], False, "content must be a string, got int"),
    ([{"role": "user"}], False, "content must be a string, got NoneType"),
    ([{"role": "assistant", "content": "x"}], False, "roles out of order"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], False, "roles out of order"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}], False, "only as the first"),
    ([{"role": "system", "content": "a"}], False, "system message alone"),
    ([{"role": "user", "content": "a"}], True, "no assistant turn"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], False, "last message"),
])
def test_bad_messages_are_named(messages, training, fragment):
    with pytest.raises(ConversationError, match=fragment):
        check_messages(messages, for_training=training)


def test_good_messages_pass():
    assert [m.role for m in check_messages(CONV, for_training=True)] == [m["role"] for m in CONV]
    assert len(check_messages(CONV[:4])) == 4


# --- the exported Jinja template gives the same ids (transformers) ------------------------------

@pytest.mark.parametrize("kind", ["bpe", "gpt2"])
def test_jinja_template_gives_quills_ids_in_transformers(tmp_path, kind):
    pytest.importorskip("transformers")
    from transformers import AutoTokenizer

    from quillgpt.hf import tokenizer_to_hf_files

    tok = add_chat_tokens(gpt2() if kind == "gpt2" else tokenizers()["bpe"])
    for name, text in tokenizer_to_hf_files(tok, 128).items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    hf = AutoTokenizer.from_pretrained(tmp_path)
    assert hf.chat_template == jinja_template()
    for conv in (CONV[:2], CONV[1:4], CONV[:4], [{"role": "user", "content": "x <|end|> y"}]):
        ours = render(tok, conv, add_generation_prompt=True).ids
        theirs = hf.apply_chat_template(conv, add_generation_prompt=True, tokenize=True, return_dict=False)
        if "<|end|>" not in conv[-1]["content"]:
            assert theirs == ours, conv
        else:  # transformers reads special strings in message text as the special tokens
            assert theirs != ours and tok.special_tokens["<|end|>"] in theirs
    full = hf.apply_chat_template(CONV, tokenize=True, return_dict=False)
    assert full == render(tok, CONV).ids
    from jinja2.exceptions import TemplateError  # the template's raise_exception, as transformers runs it

    with pytest.raises(TemplateError, match="roles must alternate"):
        hf.apply_chat_template([CONV[1], CONV[1]], tokenize=False)
    with pytest.raises(TemplateError, match="unknown role: tool"):
        hf.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


# --- replies -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny():
    tok = add_chat_tokens(CharTokenizer.train(TEXT + "?HAWY"))
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=96, n_layer=1, n_head=2, n_embd=16)).eval()
    return model, tok


def test_replies_stop_at_end_tokens_and_batch_like_single(tiny):
    model, tok = tiny
    convs = [CONV[1:2], CONV[:2], CONV[1:4]]
    batch = replies(model, tok, convs, max_new_tokens=12, temperature=0.9, seed=5)
    single = [replies(model, tok, [c], max_new_tokens=12, temperature=0.9, seed=5 + i)[0]
              for i, c in enumerate(convs)]
    assert batch == single
    for text in batch:
        assert not any(t in text for t in CHAT_TOKENS)
    assert tok.special_tokens["<|end|>"] in end_ids(tok)
    assert {tok.special_tokens[t] for t in CHAT_TOKENS} == end_ids(tok)  # char: no <|endoftext|>


def test_exact_match_counts_greedy_replies(tiny):
    model, tok = tiny
    reply = replies(model, tok, [CONV[1:2]], max_new_tokens=10, temperature=0)[0]
    right = [Message("user", "Who said it?"), Message("assistant", reply)]
    wrong = [Message("user", "Who said it?"), Message("assistant", reply + "x")]
    assert exact_match(model, tok, [right, wrong, right], max_new_tokens=10) == pytest.approx(2 / 3)


def test_history_that_overflows_drops_the_oldest_turns(tiny):
    model, tok = tiny
    msgs = check_messages(CONV + [{"role": "user", "content": "Again?"}])
    fitted, dropped = fit_history(tok, msgs, 48)
    assert dropped == 4 and fitted[0].role == "system" and fitted[-1].content == "Again?"
    assert len(render(tok, fitted, add_generation_prompt=True).ids) <= 48
    session = ChatSession(model, tok, system="Be brief.", sampling={"max_new_tokens": 8, "temperature": 0})
    dropped = []
    for _ in range(6):
        "".join(session.send("Who said it?"))
        dropped.append(session.dropped)
    assert dropped[0] == 0 and max(dropped) > 0 and len(session.history) < 12
    assert len(render(tok, session.messages(), add_generation_prompt=True).ids) <= 96
    with pytest.raises(QuillError, match="longer than the model's context"):
        "".join(session.send("to be " * 20))
    session.reset()
    assert session.history == []


def test_a_session_needs_a_model_with_the_template(tiny):
    model, _ = tiny
    with pytest.raises(QuillError, match="no chat template"):
        ChatSession(model, tokenizers()["char"])
