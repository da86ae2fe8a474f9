"""A chat run through Hugging Face: export-hf writes the chat tokens and the Jinja chat_template,
transformers' apply_chat_template gives quill's ids and its greedy generation quill's reply
token for token; import-hf reads such a checkpoint back as a chat run."""

from __future__ import annotations

import json
import random

import pytest
import torch
from conftest import make_run

from quillgpt import checkpoint as ckpt
from quillgpt.chat import end_ids, has_chat_template, jinja_template, render, replies
from quillgpt.cli import main
from quillgpt.config import ModelConfig, load_config
from quillgpt.generate import stream_ids
from quillgpt.sampling import Sampling
from quillgpt.sft import sft_trainer
from quillgpt.tokenizers.bpe import ByteBPETokenizer

transformers = pytest.importorskip("transformers")
from transformers import AutoTokenizer, GPT2LMHeadModel  # noqa: E402

VERSE = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n" * 20
CONVS = [
    [{"role": "user", "content": "turn: nobler"}],
    [{"role": "system", "content": "be brief"}, {"role": "user", "content": "turn: mind"}],
    [{"role": "user", "content": "turn: the"}, {"role": "assistant", "content": "eht"},
     {"role": "user", "content": "and  'tis?\n"}],
]


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory):
    """A GPT-2-shaped model with a byte-level BPE, fine-tuned for a few steps on conversations."""
    root = tmp_path_factory.mktemp("chat-hf")
    base = make_run(root / "base", ModelConfig(block_size=64, n_layer=2, n_head=2, n_embd=32),
                    ByteBPETokenizer.train(VERSE, 320))
    rng = random.Random(0)
    with open(root / "chats.jsonl", "w", encoding="utf-8") as f:
        for _ in range(30):
            w = "".join(rng.choice("abehimnorstu") for _ in range(rng.randint(3, 6)))
            f.write(json.dumps({"messages": [{"role": "user", "content": f"turn: {w}"},
                                             {"role": "assistant", "content": w[::-1]}]}) + "\n")
    cfg = load_config(None, {"data": str(root / "chats.jsonl"), "out": str(root / "chat"), "init_from": str(base),
                             "batch_size": 8, "max_iters": 6, "eval_interval": 3, "eval_iters": 1,
                             "learning_rate": 3e-3, "sample_tokens": 0, "device": "cpu"})
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QUILL_CACHE", str(root / "cache"))
        sft_trainer(cfg, progress=False, log=lambda m: None).run()
    return root / "chat"


@pytest.fixture(scope="module")
def exported(chat_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("exported") / "hf"
    assert main(["export-hf", str(chat_run), str(out)]) == 0
    return out


def quill_greedy_ids(run, prompt: list[int], n: int) -> list[int]:
    """quill's greedy reply ids, up to and including the token that ends it."""
    out = []
    stops = end_ids(run.tokenizer)
    for t in stream_ids(run.model, [prompt], Sampling(max_new_tokens=n, temperature=0)):
        out.append(t.item())
        if out[-1] in stops:
            break
    return out


def test_exported_tokenizer_has_the_specials_and_the_template(exported, chat_run):
    run = ckpt.load_run(chat_run)
    config = json.loads((exported / "tokenizer_config.json").read_text())
    assert config["chat_template"] == jinja_template()
    tok = AutoTokenizer.from_pretrained(exported)
    for name, i in run.tokenizer.special_tokens.items():
        assert tok.convert_tokens_to_ids(name) == i
    assert set(tok.all_special_tokens) >= {"<|system|>", "<|user|>", "<|assistant|>", "<|end|>"}
    generation = json.loads((exported / "generation_config.json").read_text())
    assert sorted(generation["eos_token_id"]) == sorted(end_ids(run.tokenizer))


def test_apply_chat_template_and_greedy_generation_equal_quills(exported, chat_run):
    run = ckpt.load_run(chat_run)
    tok = AutoTokenizer.from_pretrained(exported)
    hf = GPT2LMHeadModel.from_pretrained(exported).eval()
    for conv in CONVS:
        ours = render(run.tokenizer, conv, add_generation_prompt=True).ids
        theirs = tok.apply_chat_template(conv, add_generation_prompt=True, tokenize=True, return_dict=False)
        assert theirs == ours
        with torch.no_grad():
            out = hf.generate(torch.tensor([theirs]), max_new_tokens=20, do_sample=False)
        reply = out[0, len(theirs):].tolist()
        assert reply == quill_greedy_ids(run, ours, 20), conv
        # and the text: transformers' decoded reply is quill's reply
        text = tok.decode([t for t in reply if t not in end_ids(run.tokenizer)])
        assert text == replies(run.model, run.tokenizer, [conv], max_new_tokens=20, temperature=0)[0]


def test_import_hf_reads_the_chat_template_back(exported, chat_run, tmp_path, capsys):
    assert main(["import-hf", str(exported), str(tmp_path / "back")]) == 0
    assert "chat template" in capsys.readouterr().err
    back, run = ckpt.load_run(tmp_path / "back"), ckpt.load_run(chat_run)
    assert has_chat_template(back.tokenizer)
    assert back.tokenizer.special_tokens == run.tokenizer.special_tokens
    assert replies(back.model, back.tokenizer, CONVS, max_new_tokens=12, temperature=0) == \
        replies(run.model, run.tokenizer, CONVS, max_new_tokens=12, temperature=0)
    assert main(["chat", str(tmp_path / "back"), "--message", "turn: nobler", "--temperature", "0",
                 "--max-new-tokens", "12"]) == 0
    assert capsys.readouterr().out == replies(run.model, run.tokenizer, CONVS[:1], max_new_tokens=12,
                                              temperature=0)[0] + "\n"


def test_import_of_another_chat_template_warns(exported, tmp_path, capsys):
    config = json.loads((exported / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    other = tmp_path / "other"
    other.mkdir()
    for f in exported.iterdir():
        (other / f.name).write_bytes(f.read_bytes())
    (other / "tokenizer_config.json").write_text(json.dumps(config))
    assert main(["import-hf", str(other), str(tmp_path / "run")]) == 0
    err = capsys.readouterr().err
    assert "warning:" in err and "not quillgpt's" in err


def test_sft_from_an_exported_hf_directory(exported, chat_run, tmp_path, capsys):
    """--init-from an HF directory whose vocabulary already has the chat tokens: nothing grows."""
    chats = tmp_path / "chats.jsonl"
    chats.write_text("\n".join(json.dumps({"messages": c + [{"role": "assistant", "content": "ok"}]})
                               for c in CONVS * 3) + "\n")
    assert main(["sft", "--init-from", str(exported), "--data", str(chats), "--out", str(tmp_path / "again"),
                 "--max-iters", "2", "--batch-size", "2", "--eval-iters", "1", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "vocabulary grows" not in err
    vocab = ckpt.load_run(chat_run).config.model.vocab_size
    assert ckpt.load_run(tmp_path / "again").config.model.vocab_size == vocab
