"""quill export-gguf against the real runtime: llama.cpp (node-llama-cpp's prebuilt CPU build,
tests/llamacpp_harness.py) loads the files and must tokenize, decode and score as quill does.

- a character run (trained here, the demo's shape), GPT-2's tokenizer, a trained BPE (untied,
  without biases) and chat runs (characters and BPE): llama.cpp's greedy continuation equals
  `quill sample --temperature 0`, 100 tokens, and its tokenizer gives quill's ids on a page of
  non-ASCII text; RoPE (llama.cpp's gptneox): the same log-probabilities position by position;
- f16 / bf16 / q8_0: measured against quill (first greedy divergence; perplexity by llama.cpp's
  own scoring and by `quill eval`);
- what cannot be expressed is refused in one line, exit 2, nothing written.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import make_any_run, make_run
from llamacpp_harness import LlamaCpp, perplexity, window_ops

from quillgpt.chat import render, replies
from quillgpt.checkpoint import load_run
from quillgpt.cli import main
from quillgpt.config import ModelConfig
from quillgpt.generate import generate_ids
from quillgpt.tokenizers import ByteBPETokenizer, CharTokenizer, SyllableTokenizer

pytestmark = pytest.mark.llamacpp

# A page with what tokenizers trip on: accents, dashes and curly quotes, Greek, Cyrillic, CJK,
# emoji (4-byte UTF-8), combining marks, digits, contractions, runs of spaces, tabs, blank lines.
PAGE = """Préface — l’été 1789, «Ça ira!» criait-on; naïve Zoë’s café served crème brûlée.
Übermäßig große Straßen in Köln: 3 Brücken, 12 Türme, 1.024 Fenster…
Ἐν ἀρχῇ ἦν ὁ λόγος. Съешь же ещё этих мягких французских булок, да выпей чаю.
東京の桜は美しい。 你好，世界！ 한국어 문장도 있습니다.
Emoji: 🤖🚀👍🏽 and e\u0301 (e + combining acute) vs é; tabs\there,   three spaces,

a blank line above; don't, we'll, they're, I've, it's — 'quoted' "double".
Numbers: 3.14159, 2,718, 1e-9, 0x1F; money: $5, €12, £7, ¥300.
"""
PROMPT = "ROMEO:\nBut soft"
N_TOKENS = 100


@pytest.fixture(scope="module")
def llama() -> LlamaCpp:
    return LlamaCpp(threads=1)


def export(run: Path, out: Path, *flags: str) -> Path:
    assert main(["export-gguf", str(run), str(out), *flags]) == 0
    return out


def quill_greedy(run: Path, prompt: str, capsys, *flags: str) -> str:
    """What `quill sample --temperature 0` prints after the prompt, 100 tokens."""
    capsys.readouterr()
    assert main(["sample", str(run), "--prompt", prompt, "--temperature", "0", "--max-new-tokens",
                 str(N_TOKENS), "--seed", "0", *flags]) == 0
    out = capsys.readouterr().out
    assert out.startswith(prompt) and out.endswith("\n")
    return out[len(prompt):-1]


def check_same_decoding(llama: LlamaCpp, run_dir: Path, gguf: Path, capsys, prompt: str = PROMPT,
                        page: str = PAGE, varied: bool = True) -> None:
    """llama.cpp's ids of `page` and its greedy continuation of `prompt` are quill's; `varied`:
    the continuation has 8 distinct tokens or more (one that depends on its context: a model that
    repeats a token would hide a wrong window or position)."""
    run = load_run(run_dir)
    block = run.config.model.block_size
    prompt_ids = run.tokenizer.encode(prompt)
    got = llama.run(gguf, [{"op": "tokenize", "text": page},
                           {"op": "greedy", "ids": prompt_ids, "n": N_TOKENS, "window": block}], context=block)
    assert got[0]["ids"] == run.tokenizer.encode(page)
    ours = generate_ids(run.model, torch.tensor([prompt_ids]), N_TOKENS, temperature=0.0)[0, len(prompt_ids):]
    assert got[1]["ids"] == ours.tolist()
    assert len(set(ours.tolist())) >= 8 or not varied
    specials = set(run.tokenizer.special_tokens.values())  # quill sample prints no special token's text
    text = run.tokenizer.decode([i for i in got[1]["ids"] if i not in specials])
    assert text == quill_greedy(run_dir, prompt, capsys)


# --- runs ----------------------------------------------------------------------------------------

def decisive_run(path: Path, cfg: ModelConfig, tokenizer, scale: float = 40.0) -> Path:
    """make_run with an untied LM head scaled up: a random model whose greedy choices vary with
    the context and are clear (near-ties would leave the choice to rounding, in either runtime)."""
    from safetensors.torch import load_file, save_file

    cfg.tie_embeddings = False
    run = make_run(path, cfg, tokenizer)
    weights = load_file(run / "model.safetensors")
    weights["lm_head.weight"] = weights["lm_head.weight"] * scale
    save_file(weights, run / "model.safetensors")
    return run


@pytest.fixture(scope="module")
def char_run(tmp_path_factory) -> Path:
    """A character run of the demo's shape (no biases, context 64), trained for a few steps on
    tiny-shakespeare and the page, so its vocabulary holds every character of both."""
    from conftest import data_file

    root = tmp_path_factory.mktemp("gguf-char")
    data = root / "input.txt"
    data.write_text(data_file("tinyshakespeare.txt").read_text(encoding="utf-8") + PAGE * 20, encoding="utf-8")
    out = root / "run"
    assert main(["train", "--config", "shakespeare-char-cpu", "--data", str(data), "--out", str(out),
                 "--n-layer", "2", "--n-head", "2", "--n-embd", "64", "--max-iters", "40", "--warmup-iters", "5",
                 "--eval-interval", "40", "--eval-iters", "1", "--batch-size", "8", "--sample-tokens", "0",
                 "--no-progress"]) == 0
    return out


def test_char_run_decodes_as_quill(llama, char_run, tmp_path, capsys):
    gguf = export(char_run, tmp_path / "char.gguf")
    assert "rwkv" in capsys.readouterr().err  # no special token: the greedy longest-match vocabulary
    check_same_decoding(llama, char_run, gguf, capsys, varied=False)  # a few steps: it repeats itself
    meta = llama.run(gguf, [{"op": "meta", "ids": list(range(20))}], context=64)[0]
    assert meta["eos"] is None and not any(meta["is_eog"])  # no character ends generation


def test_char_run_past_the_context(llama, char_run, tmp_path, capsys):
    """The demo's shape with a decisive random head, whose greedy tokens vary: 100 tokens from a
    14-token prompt cross the 64-token context, where quill's window moves."""
    tok = load_run(char_run).tokenizer
    run = decisive_run(tmp_path / "wide", ModelConfig(n_layer=2, n_head=2, n_embd=64, block_size=64, bias=False), tok)
    check_same_decoding(llama, run, export(run, tmp_path / "wide.gguf"), capsys)


@pytest.mark.slow  # GPT-2's 50,000 merges rebuilt from its ranks, a 50,257-row embedding
def test_gpt2_tokenizer_run(llama, tmp_path, gpt2_cache, capsys):
    from quillgpt.tokenizers.gpt2 import gpt2_tokenizer

    run = decisive_run(tmp_path / "gpt2", ModelConfig(n_layer=2, n_head=2, n_embd=64, block_size=160),
                       gpt2_tokenizer())
    gguf = export(run, tmp_path / "gpt2.gguf")
    check_same_decoding(llama, run, gguf, capsys)
    meta = llama.run(gguf, [{"op": "meta", "ids": [50256, 198, 11]}], context=32)[0]
    assert meta["eos"] == 50256 and meta["is_eog"] == [True, False, False]


def test_trained_bpe_run_untied_without_biases(llama, tmp_path, capsys):
    tok = ByteBPETokenizer.train(PAGE * 3 + "ROMEO: But soft, what light through yonder window breaks?\n" * 20, 400)
    run = decisive_run(tmp_path / "bpe", ModelConfig(n_layer=2, n_head=2, n_embd=64, block_size=128, bias=False), tok)
    check_same_decoding(llama, run, export(run, tmp_path / "bpe.gguf"), capsys)


def test_rope_run_is_gptneox(llama, tmp_path, capsys):
    """RoPE as llama.cpp's gptneox: the same log-probabilities as quill's, position by position,
    over the page (teacher-forced: a random model's greedy path would turn on near-ties)."""
    tok = CharTokenizer.train(PAGE + PROMPT)
    run_dir = make_run(tmp_path / "rope", ModelConfig(n_layer=2, n_head=4, n_embd=64, block_size=128, rope=True,
                                                      rope_base=500.0, tie_embeddings=False), tok)
    gguf = export(run_dir, tmp_path / "rope.gguf")
    assert "gptneox" in capsys.readouterr().err
    run = load_run(run_dir)
    ids = tok.encode(PAGE)[:128]
    got = llama.run(gguf, [{"op": "tokenize", "text": PAGE}, {"op": "logprobs", "ids": ids}], context=128)
    assert got[0]["ids"] == tok.encode(PAGE)
    with torch.no_grad():
        ours = torch.log_softmax(run.model(torch.tensor([ids]))[0][0].double(), -1)
    expected = ours[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    assert torch.allclose(torch.tensor(got[1]["logprobs"], dtype=torch.double), expected, atol=2e-3)


def test_ascii_char_chat_run(llama, tmp_path, capsys):
    """Characters of one byte each have no merges; GGUF's BPE still needs one (an inert one)."""
    from quillgpt.chat import add_chat_tokens

    ascii_page = "First Citizen:\nBefore we proceed any further, hear me speak.\n\tAll: Speak, speak!  "
    tok = add_chat_tokens(CharTokenizer.train(ascii_page + PROMPT))
    run = decisive_run(tmp_path / "ascii", ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=64), tok)
    check_same_decoding(llama, run, export(run, tmp_path / "ascii.gguf"), capsys, page=ascii_page)


CONVERSATION = [{"role": "system", "content": "Answer."}, {"role": "user", "content": "reverse: quill"},
                {"role": "assistant", "content": "lliuq"}, {"role": "user", "content": "reverse: été"}]


def chat_run(root: Path, tokenizer: str) -> Path:
    """A tiny model fine-tuned (seconds of CPU) on conversations whose assistant always says "lliuq"."""
    data = root / "chats.jsonl"
    words = ["quill", "été", "page", "Köln", "naïve", "ink"]
    data.write_text("".join(json.dumps({"messages": [{"role": "system", "content": "Answer."},
                                                     {"role": "user", "content": f"reverse: {w}"},
                                                     {"role": "assistant", "content": "lliuq"}]}) + "\n"
                            for w in words * 8), encoding="utf-8")
    out = root / "run"
    assert main(["sft", "--data", str(data), "--out", str(out), "--tokenizer", tokenizer, "--n-layer", "1",
                 "--n-head", "2", "--n-embd", "32", "--block-size", "64", "--max-iters", "120",
                 "--learning-rate", "3e-3", "--warmup-iters", "5", "--eval-interval", "120", "--eval-iters", "1",
                 "--batch-size", "8", "--sample-tokens", "0", "--no-progress"]) == 0
    return out


@pytest.mark.parametrize("tokenizer", ["char", pytest.param("bpe:300", marks=pytest.mark.slow)])
def test_chat_run_answers_with_its_template(llama, tmp_path, tokenizer, capsys):
    run_dir = chat_run(tmp_path, tokenizer)
    gguf = export(run_dir, tmp_path / "chat.gguf")
    assert "with its chat template" in capsys.readouterr().err
    run = load_run(run_dir)
    ids = render(run.tokenizer, CONVERSATION, add_generation_prompt=True).ids
    chat, native, bad = llama.run(gguf, [
        {"op": "chat", "messages": CONVERSATION, "max_tokens": 24},  # node-llama-cpp's chat session
        {"op": "template", "messages": CONVERSATION},  # llama.cpp's own Jinja engine
        {"op": "template", "messages": CONVERSATION[1:2] * 2},
    ], context=64)
    assert native["ids"] == ids and chat["prompt_ids"] == ids and chat["jinja"]
    assert chat["text"] == replies(run.model, run.tokenizer, [CONVERSATION], max_new_tokens=24, temperature=0)[0]
    assert chat["text"].endswith("liuq") and len(chat["text"]) < 10  # the skill; the reply ended at <|end|>
    assert "roles must alternate" in bad["error"]
    end = run.tokenizer.special_tokens["<|end|>"]
    meta = llama.run(gguf, [{"op": "meta", "ids": [end, 0]}], context=32)[0]
    assert meta["eos"] == end and meta["is_eog"] == [True, False]


TOOLS = [{"type": "function", "function": {"name": "calculator", "description": "Évalue une expression",
                                           "parameters": {"type": "object", "properties": {
                                               "expression": {"type": "string"}}, "required": ["expression"]}}}]
TOOL_CONVERSATION = [
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "", "tool_calls": [{"id": "c1", "type": "function", "function": {
        "name": "calculator", "arguments": "{\"expression\": \"2+2\"}"}}]},
    {"role": "tool", "tool_call_id": "c1", "content": "4"}, {"role": "assistant", "content": "4"},
    {"role": "user", "content": "and 3·3?"}]


def test_tool_run_template_renders_in_llama_cpp(llama, tmp_path):
    from quillgpt.chat import add_chat_tokens

    tok = add_chat_tokens(ByteBPETokenizer.train("What is 2+2? calculator expression " * 20, 300), tools=True)
    run = make_run(tmp_path / "tools", ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=256), tok)
    gguf = export(run, tmp_path / "tools.gguf")
    calls_end = tok.special_tokens["<|end_calls|>"]
    native, meta = llama.run(gguf, [{"op": "template", "messages": TOOL_CONVERSATION, "tools": TOOLS},
                                    {"op": "meta", "ids": [calls_end, tok.special_tokens["<|end|>"]]}], context=256)
    assert native["ids"] == render(tok, TOOL_CONVERSATION, add_generation_prompt=True, tools=TOOLS).ids
    assert meta["is_eog"] == [True, True]  # <|end_calls|>: llama.cpp's end of message


# --- precision -----------------------------------------------------------------------------------

def first_divergence(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


@pytest.mark.slow  # four files, each decoding and scoring 6,000 characters
def test_dtypes_against_quill(llama, char_run, tmp_path, capsys):
    """f16 / bf16 files against quill's bf16 (first greedy divergence, printed: docs/export.md
    has the demo run's); q8_0's perplexity within 1% of f32's, both by llama.cpp's own scoring,
    and f32's equal to `quill eval`'s."""
    from conftest import data_file

    run = load_run(char_run)
    held_out = data_file("tinyshakespeare.txt").read_text(encoding="utf-8")[-6000:]
    ids = run.tokenizer.encode(held_out)
    files = {d: export(char_run, tmp_path / f"{d}.gguf", "--dtype", d) for d in ("f32", "f16", "bf16", "q8_0")}
    prompt = run.tokenizer.encode(PROMPT)
    ppl, greedy = {}, {}
    for dtype, path in files.items():
        results = llama.run(path, [{"op": "greedy", "ids": prompt, "n": N_TOKENS, "window": 64}, *window_ops(ids, 64)],
                            context=64)
        greedy[dtype] = results[0]["ids"]
        ppl[dtype], scored = perplexity(results[1:])
    capsys.readouterr()
    assert main(["eval", str(char_run), "--data", str(write(tmp_path / "held.txt", held_out)), "--stride", "64",
                 "--json", str(tmp_path / "eval.json"), "--no-progress"]) == 0
    quill = json.loads((tmp_path / "eval.json").read_text())
    assert quill["scored"] == scored
    assert ppl["f32"] == pytest.approx(quill["perplexity"], rel=1e-3)
    assert ppl["q8_0"] == pytest.approx(ppl["f32"], rel=0.01)
    quill_bf16 = run.tokenizer.encode(quill_greedy(char_run, PROMPT, capsys, "--dtype", "bfloat16"))
    quill_f32 = run.tokenizer.encode(quill_greedy(char_run, PROMPT, capsys))
    assert greedy["f32"] == quill_f32
    for dtype in ("f16", "bf16"):
        assert ppl[dtype] == pytest.approx(ppl["f32"], rel=0.01)
    print(f"\nperplexity {ppl}; quill eval {quill['perplexity']:.4f}; first greedy divergence from quill bf16: "
          f"{ {d: first_divergence(greedy[d], quill_bf16) for d in greedy} }")


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# --- the file itself -----------------------------------------------------------------------------

def test_metadata(char_run, tmp_path):
    import gguf

    reader = gguf.GGUFReader(export(char_run, tmp_path / "m.gguf", "--dtype", "q8_0"))
    fields = {name: reader.fields[name] for name in reader.fields}

    def text(name):
        f = fields[name]
        return bytes(f.parts[f.data[0]]).decode("utf-8")

    def number(name):
        f = fields[name]
        return int(f.parts[f.data[0]][0])

    assert text("general.architecture") == "gpt2" and text("general.name") == char_run.name
    assert text("quill.config") == (char_run / "config.yaml").read_text(encoding="utf-8")
    assert number("gpt2.context_length") == 64 and number("gpt2.block_count") == 2
    assert number("general.file_type") == gguf.LlamaFileType.MOSTLY_Q8_0
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_qkv.weight"] == "Q8_0" and types["blk.0.attn_norm.bias"] == "F32"
    assert types["position_embd.weight"] == "F32" and "output.weight" not in types  # tied head


# --- what is refused -----------------------------------------------------------------------------

def refused(capsys, argv: list[str], out: Path) -> str:
    before = out.read_bytes() if out.is_file() else None
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("quill: error: ")
    assert (out.read_bytes() if out.is_file() else None) == before
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]  # no temporary left
    return err


@pytest.mark.parametrize("options, named", [
    ({"qk_norm": True}, "qk_norm"), ({"norm": "rmsnorm"}, "norm rmsnorm"),
    ({"activation": "relu2"}, "activation relu2"), ({"logit_softcap": 15.0}, "logit_softcap 15"),
    ({"rope": True, "qk_norm": True}, "qk_norm"),
])
def test_refuses_speedrun_options_llama_cpp_lacks(tmp_path, capsys, options, named):
    run = make_run(tmp_path / "run", ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, **options),
                   CharTokenizer.train("ab\n"))
    err = refused(capsys, ["export-gguf", str(run), str(tmp_path / "x.gguf")], tmp_path / "x.gguf")
    assert named in err and "llama.cpp has no architecture" in err


def test_refuses_ladder_rungs_syllables_and_other_patterns(tmp_path, capsys):
    out = tmp_path / "x.gguf"
    rung = make_any_run(tmp_path / "bigram", ModelConfig(kind="bigram", n_layer=1, n_head=1, n_embd=8, block_size=8),
                        CharTokenizer.train("ab\n"))
    assert "ladder rung" in refused(capsys, ["export-gguf", str(rung), str(out)], out)
    syl = make_run(tmp_path / "syl", ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=16),
                   SyllableTokenizer.train("Albert Einstein war hier\n", 8))
    assert "no pre-tokenizer" in refused(capsys, ["export-gguf", str(syl), str(out)], out)
    lines = ByteBPETokenizer.train("one line\nanother line\n" * 5, 270, within_words=False)
    bpe = make_run(tmp_path / "lines", ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=16), lines)
    assert "lines" in refused(capsys, ["export-gguf", str(bpe), str(out)], out)
    nonl = make_run(tmp_path / "nonl", ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=16),
                    CharTokenizer.train("ab"))
    assert "newline" in refused(capsys, ["export-gguf", str(nonl), str(out)], out)


def test_out_needs_overwrite_and_strangers_runs_are_checked_first(char_run, tmp_path, capsys):
    out = write(tmp_path / "taken.gguf", "mine")
    assert "--overwrite" in refused(capsys, ["export-gguf", str(char_run), str(out)], out)
    assert "directory" in refused(capsys, ["export-gguf", str(char_run), str(tmp_path)], tmp_path / "none.gguf")
    export(char_run, out, "--overwrite")
    assert out.read_bytes()[:4] == b"GGUF"
    # a stranger's run: the config's refusal comes before the weights are read (here: not weights at all)
    stranger = tmp_path / "stranger"
    shutil.copytree(char_run, stranger, ignore=shutil.ignore_patterns("train_state"))
    config = (stranger / "config.yaml").read_text().replace("qk_norm: false", "qk_norm: true")
    (stranger / "config.yaml").write_text(config)
    (stranger / "model.safetensors").write_bytes(b"\xff" * 64)
    new = tmp_path / "new.gguf"
    assert "qk_norm" in refused(capsys, ["export-gguf", str(stranger), str(new)], new)
    (stranger / "config.yaml").write_text(config.replace("qk_norm: true", "qk_norm: false"))
    assert "not a safetensors file" in refused(capsys, ["export-gguf", str(stranger), str(new)], new)
    shutil.copy(char_run / "model.safetensors", stranger / "model.safetensors")
    (stranger / "config.yaml").write_text(config.replace("qk_norm: true", "qk_norm: false")
                                          .replace("n_embd: 64", "n_embd: 4096"))
    assert "expects (174, 4096)" in refused(capsys, ["export-gguf", str(stranger), str(new)], new)
    assert "not found" in refused(capsys, ["export-gguf", str(tmp_path / "nowhere"), str(new)], new)
