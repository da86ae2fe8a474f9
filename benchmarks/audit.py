"""The reliability audit: every entry point fed hostile and careless input, as an adversarial
user would, through the real command line (`quillgpt.cli.main`, stderr captured) and a real server.

    python benchmarks/audit.py            # prints the table (docs/reliability.md), exit 1 if a case broke
    python benchmarks/audit.py --cases    # and every case, one line each

A case holds when:

- an error case ends in exit status 2 with exactly one line on stderr (`quill: error: ...`; a
  case marked `started` may print the run's own lines first, the error still last and alone),
  no traceback, and no file under the audit's directory changed (sha256 of every file before
  and after, the cache excepted);
- an accepted case (finite but extreme sampling values, ...) ends in exit status 0 with no
  traceback, and changes no file;
- an HTTP case is answered with its 4xx status and an error body in OpenAI's JSON shape (or, for
  accepted ones, 200), never 500, the server logs no traceback, and a normal request right after
  it completes (its latency is in the table: under 2 s is the promise). Two servers run: one
  serves the trained run (no chat template), the other a chat run fine-tuned from it by quill sft;
- a tool-call case (hostile code for the built-in `python` tool, run as the decode engine runs a
  call) ends within its time in an error result naming what was refused, quill's environment
  never reaches the code, and nothing outside the sandbox's directory changes.

Cases that could hang a process or eat its memory if they regressed (a tokenizer whose empty
special token made tiktoken loop forever, a YAML "billion laughs") run in a subprocess with a
time limit and a 8 GB address-space limit. tests/test_audit.py runs the same cases under pytest.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import gzip
import hashlib
import io
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

VERSE = [
    "To be, or not to be, that is the question:",
    "Whether 'tis nobler in the mind to suffer",
    "The slings and arrows of outrageous fortune,",
    "Or to take arms against a sea of troubles",
    "And by opposing end them. To die: to sleep;",
]
TINY = {"n_layer": 1, "n_head": 2, "n_embd": 16, "block_size": 16, "batch_size": 4, "max_iters": 4,
        "eval_interval": 2, "eval_iters": 2, "log_interval": 2, "warmup_iters": 1, "sample_tokens": 0,
        "device": "cpu", "bias": True}
TINY_FLAGS = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items() if k != "device"] + ["--no-progress"]
CACHE = "cache"  # under the audit's directory, excluded from the "no file changed" check


# --- the files the cases use ------------------------------------------------------------------

def write(path: Path, data: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return path


def billion_laughs() -> str:
    """Nine levels of nine aliases: a few hundred bytes of YAML that stand for 9**9 strings."""
    items = ['&a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for prev, name in zip("abcdefgh", "bcdefghi"):
        items.append(f"&{name} [" + ",".join([f"*{prev}"] * 9) + "]")
    items.append("[" + ",".join(["*i"] * 9) + "]")
    return "n_layer: [" + ", ".join(items) + "]\n"


def hostile_tokenizers(root: Path, bpe: Any) -> None:
    """bpe.json and its hostile variants: what a stranger's tokenizer file may say."""
    good = bpe.to_dict()
    eot = good["special_tokens"]["<|endoftext|>"]
    variants = {
        "empty_special": {"special_tokens": {"": eot}},
        "float_special": {"special_tokens": {"<|endoftext|>": float(eot)}},
        "dup_special": {"special_tokens": {"<|endoftext|>": eot, "<|x|>": eot}},
        "range_special": {"special_tokens": {"<|endoftext|>": 10**9}},
        "redos_pattern": {"pattern": "(a+)+$"},
    }
    write(root / "tok" / "bpe.json", json.dumps(good))
    for name, change in variants.items():
        write(root / "tok" / f"{name}.json", json.dumps({**good, **change}))
    write(root / "tok" / "deep.json", "[" * 100_000 + "]" * 100_000)
    many = {f"<|s{i}|>": bpe.vocab_size + i for i in range(20_000)}  # a million took minutes to encode with
    write(root / "tok" / "many_special.json", json.dumps({**good, "special_tokens": {**good["special_tokens"], **many},
                                                          "tokens": good["tokens"] + list(many)}))
    write(root / "tok" / "huge.json", json.dumps({"kind": "char", "chars": [chr(0x4E00 + i % 20000) for i in
                                                                              range(1 << 21)]}))


def conversation_files(root: Path) -> None:
    """chats/: good conversations (on the verse's characters) and files with one bad line (line 4)."""
    words = sorted({w.strip(",.:;'") for line in VERSE for w in line.split()} - {""})

    def conv(user: str, assistant: str) -> str:
        return json.dumps({"messages": [{"role": "user", "content": user},
                                        {"role": "assistant", "content": assistant}]})

    good = [conv(w, w[::-1]) for w in words]
    write(root / "chats" / "chats.jsonl", "\n".join(good) + "\n")
    write(root / "chats" / "other.jsonl", "\n".join(conv(w[::-1], w) for w in words) + "\n")
    bad_lines = {
        "notjson": '{"messages": [',
        "role": json.dumps({"messages": [{"role": "wizard", "content": "To be"}]}),
        "order": json.dumps({"messages": [{"role": "assistant", "content": "To"}, {"role": "user", "content": "be"}]}),
        "noassistant": json.dumps({"messages": [{"role": "user", "content": "To be"}]}),
        "content": json.dumps({"messages": [{"role": "user", "content": {"text": "To"}},
                                            {"role": "assistant", "content": "be"}]}),
        "deep": '{"messages": ' + "[" * 100_000 + "]" * 100_000 + "}",
        "huge": conv("To be " * 700_000, "or not"),  # 4 MB on one line: truncated to the context
        "huge_bad": conv("To be " * 7_000 + "\u20ac" + "To be " * 693_000, "or not"),  # ... with '€' in it
        "huge_past": conv("To be " * 700_000 + "\u20ac", "or not"),  # ... at its end, past any context
        "huge_assistant": conv("To", "or not " * 1_200_000),  # 8 MB to learn from
    }
    for name, line in bad_lines.items():
        write(root / "chats" / f"{name}.jsonl", "\n".join([*good[:3], line, *good[3:]]) + "\n")
    long = [conv("To be, or not to be " * 3, w) for w in words]  # longer than the context, held out too
    write(root / "chats" / "long.jsonl", "\n".join(long + good[:4]) + "\n")
    write(root / "chats" / "surrogate.jsonl", "\n".join(good[:3] + ['{"messages": [{"role": "user", "content": '
                                                                   '"To \\ud800"}, {"role": "assistant", '
                                                                   '"content": "be"}]}'] + good[3:]) + "\n")
    write(root / "chats" / "binary.jsonl", ("\n".join(good[:3]) + "\n").encode() + b'{"messages": "\xff\xfe"}\n')
    for name, line in tool_lines().items():
        write(root / "chats" / f"{name}.jsonl", "\n".join([*good[:3], json.dumps(line), *good[3:]]) + "\n")
    write(root / "chats" / "bad.parquet", b"PAR1 not a parquet file PAR1")
    rl_task_files(root, words)


def tool_lines() -> dict[str, dict]:
    """Training lines with malformed tool calls (chats/tool_*.jsonl, as line 4)."""
    calc = {"type": "function", "function": {"name": "calculator", "parameters": {
        "type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]}}}

    def line(call: dict, answer_id: str = "c1", tools: Any = None) -> dict:
        return {"messages": [{"role": "user", "content": "To be"},
                             {"role": "assistant", "content": None, "tool_calls": [call]},
                             {"role": "tool", "tool_call_id": answer_id, "content": "or"},
                             {"role": "assistant", "content": "not"}], "tools": tools or [calc]}

    call = {"id": "c1", "type": "function", "function": {"name": "calculator", "arguments": '{"expression": "1"}'}}
    return {
        "tool_noid": line({k: v for k, v in call.items() if k != "id"}),
        "tool_args": line({**call, "function": {"name": "calculator", "arguments": "{expression: 1"}}),
        "tool_orphan": line(call, answer_id="c9"),
        "tool_undefined": line({**call, "function": {"name": "weather", "arguments": "{}"}}),
        "tool_schema": line(call, tools=[{"type": "function", "function": {
            "name": "calculator", "parameters": {"type": "object", "required": ["expression"]}}}]),
    }


def rl_task_files(root: Path, words: list[str]) -> None:
    """rl/: quill rl's tasks (a word; its answer, the word reversed), files with one bad line (line 3),
    and reward files."""
    def task(user: str, **fields: Any) -> str:
        return json.dumps({"messages": [{"role": "user", "content": user}], **fields})

    good = [task(w, answer=w[::-1]) for w in words]
    write(root / "rl" / "tasks.jsonl", "\n".join(good) + "\n")
    bad_lines = {
        "noanswer": task("To"),
        "notjson": '{"messages": [',
        "lastturn": json.dumps({"messages": [{"role": "user", "content": "To"},
                                             {"role": "assistant", "content": "oT"}], "answer": "oT"}),
        "vocab": task("To \u20ac", answer="oT"),
        "long": task("To be " * 2000, answer="eb oT"),
    }
    for name, line in bad_lines.items():
        write(root / "rl" / f"{name}.jsonl", "\n".join([*good[:2], line, *good[2:]]) + "\n")
    write(root / "rl" / "raises.py", "def score(messages, reply, **fields):\n    raise ValueError('no score')\n")
    write(root / "rl" / "broken.py", "def score(reply, task)\n")


def task_files(root: Path) -> None:
    """tasks/: an lm-evaluation-harness task (indexed, never run) and hostile task YAMLs."""
    write(root / "tasks" / "audit.yaml", "task: quill_audit\ndataset_path: json\noutput_type: loglikelihood\n"
                                         "test_split: test\ndoc_to_text: '{{text}}'\ndoc_to_target: '{{target}}'\n")
    write(root / "tasks" / "tagged.yaml", "task: quill_audit_tagged\ndataset_path: !!python/object/apply:os.system "
                                          f"['touch {root / 'pwned'}']\noutput_type: loglikelihood\n")
    write(root / "tasks" / "deep.yaml", "task: quill_audit_deep\nmetadata: " + "[" * 50_000 + "]" * 50_000 + "\n")


def build_chat_run(root: Path) -> None:
    """chat_run: the trained run fine-tuned on chats/chats.jsonl for a few steps (quill sft)."""
    from quillgpt.config import load_config
    from quillgpt.sft import sft_trainer

    cfg = load_config(None, {**TINY, "data": str(root / "chats" / "chats.jsonl"), "out": str(root / "chat_run"),
                             "init_from": str(root / "run")})
    sft_trainer(cfg, progress=False, log=lambda m: None).run()


def build_fixtures(root: Path) -> None:
    """Everything the cases read: texts, a trained run, a chat run fine-tuned from it, a BPE run
    and its HF export, conversation files, task YAMLs, hostile files."""
    from quillgpt import checkpoint as ckpt
    from quillgpt.config import Config, ModelConfig, TrainConfig, load_config
    from quillgpt.hf import export_hf
    from quillgpt.model import GPT
    from quillgpt.tokenizers import ByteBPETokenizer
    from quillgpt.train import Trainer

    text = "\n".join(VERSE * 40) + "\n"
    write(root / "verse.txt", text)
    write(root / "other.txt", text[::-1])
    write(root / "empty.txt", "")
    write(root / "datadir" / "verse.txt", text)
    write(root / "laughs.yaml", billion_laughs())
    write(root / "syntax.yaml", "model:\n  n_layer: [1\n  n_head: 2\n")
    write(root / "deep.yaml", "n_layer: " + "[" * 50_000 + "]" * 50_000 + "\n")
    write(root / "tag.yaml", "n_layer: !!python/object/apply:os.system ['echo pwned']\n")
    write(root / "deep.jsonl", '{"text": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    write(root / "surrogate.jsonl", '{"text": "To be"}\n{"text": "or \\ud800 not"}\n')
    write(root / os.fsdecode(b"named-\xff.txt"), text)  # a file name that is not UTF-8
    packed = gzip.compress(text.encode())
    write(root / "corrupt.txt.gz", packed[: len(packed) // 2] + b"garbage" * 10 + packed[len(packed) // 2:])
    write(root / "truncated.txt.gz", packed[: len(packed) // 2])
    write(root / "notgzip.txt.gz", b"plain text, not gzip")
    cfg = load_config(None, {**TINY, "data": str(root / "verse.txt"), "out": str(root / "run")})
    conversation_files(root)
    task_files(root)
    with env(QUILL_CACHE=str(root / CACHE)):
        Trainer(cfg, progress=False, log=lambda m: None).run()
        build_chat_run(root)
    bpe = ByteBPETokenizer.train(text, 300)
    hostile_tokenizers(root, bpe)
    model_cfg = ModelConfig(block_size=16, n_layer=1, n_head=2, n_embd=16, vocab_size=bpe.vocab_size)
    bpe_run = root / "bpe_run"
    bpe_run.mkdir()
    ckpt.save_config(Config(model=model_cfg, train=TrainConfig(tokenizer="bpe")), bpe_run)
    bpe.save(bpe_run / ckpt.TOKENIZER_FILE)
    ckpt.save_weights(GPT(model_cfg), bpe_run / ckpt.MODEL_FILE)
    export_hf(bpe_run, root / "hf")
    prepared = root / "prepared_bad"
    write(prepared / "train.bin", bytes(range(256)) * 20)  # uint16 ids up to 65,535: far past 58 chars
    write(prepared / "val.bin", bytes(range(256)) * 4)
    shutil.copy(root / "run" / ckpt.TOKENIZER_FILE, prepared / "tokenizer.json")


@contextlib.contextmanager
def env(**values: str) -> Iterator[None]:
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# --- what a case does to the files before it runs ----------------------------------------------

def copy_run(root: Path, name: str, source: str = "run") -> Path:
    dest = root / name
    if not dest.exists():
        shutil.copytree(root / source, dest)
    return dest


def edit_file(path: Path, old: str, new: str) -> None:
    text = path.read_text(encoding="utf-8")
    if old not in text and new in text:
        return  # done by an earlier case
    if old not in text:
        raise RuntimeError(f"{path}: {old!r} not found")
    path.write_text(text.replace(old, new), encoding="utf-8")


def forge_state(run: Path, change: Callable[[dict], None]) -> None:
    """Rewrite the newest checkpoint's state.json and its checksum, as a careful forger would."""
    from quillgpt import checkpoint as ckpt

    latest = ckpt.list_checkpoints(run)[-1]
    st = json.loads((latest / ckpt.STATE_JSON_FILE).read_text())
    change(st)
    data = json.dumps(st).encode()
    (latest / ckpt.STATE_JSON_FILE).write_bytes(data)
    manifest = json.loads((latest / ckpt.MANIFEST_FILE).read_text())
    manifest["sha256"][ckpt.STATE_JSON_FILE] = hashlib.sha256(data).hexdigest()
    (latest / ckpt.MANIFEST_FILE).write_text(json.dumps(manifest))


def nan_weights(run: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(run / "model.safetensors")
    name = next(k for k, t in tensors.items() if t.is_floating_point() and t.dim() == 2)
    tensors[name][0, 0] = float("nan")
    save_file(tensors, run / "model.safetensors")


def retyped_weights(run: Path, change: Callable[[Any], Any]) -> None:
    """One matrix of model.safetensors rewritten in another dtype (`change`)."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(run / "model.safetensors")
    name = next(k for k, t in tensors.items() if t.is_floating_point() and t.dim() == 2)
    tensors[name] = change(tensors[name]).contiguous()
    save_file(tensors, run / "model.safetensors")


HELD_LOCKS: list[Any] = []  # run directories "another writer" holds while the audit runs


def held_run(run: Path) -> None:
    """`run` as while another process trains into it: its lock held (by this process, through
    another open file: a second flock on the same file is refused all the same)."""
    from quillgpt.fileio import RunLock

    if any(lock.directory == run for lock in HELD_LOCKS):
        return  # held for an earlier case
    lock = RunLock(run)
    lock.acquire()
    HELD_LOCKS.append(lock)


def setups(root: Path) -> dict[str, Callable[[], Any]]:
    """Named preparations; each makes a copy of what it damages, so cases stay independent."""
    def run_edit(name: str, old: str, new: str) -> Callable[[], None]:
        return lambda: edit_file(copy_run(root, name) / "config.yaml", old, new)

    def run_tokenizer(name: str, source: str) -> Callable[[], None]:
        return lambda: shutil.copy(root / "tok" / source, copy_run(root, name) / "tokenizer.json")

    def stranger(name: str, data: str) -> Callable[[], None]:
        return run_edit(name, f"data: {root / 'verse.txt'}", f"data: {data}")

    def hf_edit(name: str, change: Callable[[Path], None]) -> Callable[[], None]:
        def go() -> None:
            dest = root / name
            if not dest.exists():  # (a later case reuses the damaged copy as it is)
                shutil.copytree(root / "hf", dest)
                change(dest)
        return go

    def shard_index(target: str) -> Callable[[Path], None]:
        def go(d: Path) -> None:
            (d / "model.safetensors").rename(d.parent / f"{d.name}-outside.safetensors")
            write(d / "model.safetensors.index.json", json.dumps({"weight_map": {"transformer.wte.weight": target}}))
        return go

    def config_value(key: str, value: Any) -> Callable[[Path], None]:
        def go(d: Path) -> None:
            cfg = json.loads((d / "config.json").read_text())
            cfg[key] = value
            (d / "config.json").write_text(json.dumps(cfg))
        return go

    def no_tokenizer(d: Path) -> None:
        for name in ("tokenizer.json", "vocab.json", "merges.txt"):
            (d / name).unlink()

    def special(name: str, file: str, make: Callable[[Path], None], source: str = "run") -> Callable[[], None]:
        def go() -> None:
            for path in [copy_run(root, name, source) / file] if "/" not in file else \
                    sorted(copy_run(root, name, source).glob(file)):
                if path.is_file() and not path.is_symlink():
                    path.unlink()
                    make(path)
        return go

    def metrics(name: str, data: bytes) -> Callable[[], None]:
        return lambda: write(copy_run(root, name) / "metrics.csv", data)

    def chat_state(name: str, change: Callable[[dict], None]) -> Callable[[], None]:
        return lambda: forge_state(copy_run(root, name, "chat_run"), change)

    def chat_edit(name: str, old: str, new: str) -> Callable[[], None]:
        return lambda: edit_file(copy_run(root, name, "chat_run") / "config.yaml", old, new)

    return {
        "shape_edited": run_edit("run_shape", "n_embd: 16", "n_embd: 32"),
        "shape_huge": run_edit("run_huge", "n_embd: 16", "n_embd: 60000"),
        "vocab_edited": run_edit("run_vocab", "vocab_size: ", "vocab_size: 1"),
        "config_laughs": lambda: write(copy_run(root, "run_laughs") / "config.yaml", billion_laughs()),
        "config_syntax": lambda: shutil.copy(root / "syntax.yaml", copy_run(root, "run_syntax") / "config.yaml"),
        "config_tag": lambda: shutil.copy(root / "tag.yaml", copy_run(root, "run_tag") / "config.yaml"),
        "nan_weights": lambda: nan_weights(copy_run(root, "run_nan")),
        "run_held": lambda: held_run(copy_run(root, "run_held")),
        "chat_held": lambda: held_run(copy_run(root, "chat_held", "chat_run")),
        "f64_weights": lambda: retyped_weights(copy_run(root, "run_f64"), lambda t: t.double().fill_(1e300)),
        "int_weights": lambda: retyped_weights(copy_run(root, "run_int"), lambda t: t.int()),
        "complex_weights": lambda: retyped_weights(copy_run(root, "run_cplx"), lambda t: t.to(t.dtype.to_complex())),
        "tok_empty_special": run_tokenizer("run_tok_empty", "empty_special.json"),
        "tok_float_special": run_tokenizer("run_tok_float", "float_special.json"),
        "tok_deep": run_tokenizer("run_tok_deep", "deep.json"),
        "state_losses": lambda: forge_state(copy_run(root, "run_losses"), lambda st: st.update(losses="many")),
        "state_metrics": lambda: forge_state(copy_run(root, "run_metrics"), lambda st: st.update(metrics=[1])),
        "state_rng": lambda: forge_state(copy_run(root, "run_rng"),
                                         lambda st: st["rng"].update(python=[3, [1], None])),
        "state_optimizer": lambda: forge_state(copy_run(root, "run_optim"),
                                               lambda st: st.update(optimizer={"state": {}, "param_groups": []})),
        "stranger_url": stranger("run_url", "https://example.com/corpus.txt"),
        "stranger_file": stranger("run_file", str(root / "other.txt")),
        "metrics_binary": metrics("run_mbin", b"\x00\x01\x02\xff"),
        "metrics_zero": special("run_mzero", "metrics.csv", lambda p: p.symlink_to("/dev/zero")),
        "metrics_fifo": special("run_mfifo", "metrics.csv", os.mkfifo),
        "config_sparse": special("run_sparse", "config.yaml", lambda p: open(p, "wb").truncate(3 << 30)),
        "tokenizer_fifo": special("run_tfifo", "tokenizer.json", os.mkfifo),
        "tokenizer_outside": special("run_tout", "tokenizer.json", lambda p: p.symlink_to("/etc/passwd")),
        "config_outside": special("run_cout", "config.yaml", lambda p: p.symlink_to(root / "run" / "config.yaml")),
        "weights_outside": special("run_wout", "model.safetensors",
                                   lambda p: p.symlink_to(root / "run" / "model.safetensors")),
        "state_outside": special("run_sout", "train_state/*/state.json", lambda p: p.symlink_to("/etc/passwd")),
        "links_inside": lambda: inside_links(copy_run(root, "run_lin")),
        "state_fifo": special("run_sfifo", "train_state/*/state.json", os.mkfifo),
        "metrics_header": metrics("run_mhead", b"a,b\n1,2\n"),
        "metrics_bad_rows": metrics("run_mrows", b"step,train_loss,val_loss\n1,x,\nten,2.5,\n2,2.4,2.6\n3,nan,inf\n"),
        "metrics_huge_field": metrics("run_mhuge", b"step,train_loss\n1," + b"9" * 200_000 + b"\n"),
        "hf_index_up": hf_edit("hf_up", shard_index("../hf_up-outside.safetensors")),
        "hf_index_abs": hf_edit("hf_abs", shard_index(str(root / "hf_abs-outside.safetensors"))),
        "hf_index_list": hf_edit("hf_list", lambda d: (d / "model.safetensors").unlink() or write(
            d / "model.safetensors.index.json", "[1, 2]")),
        "hf_config_str": hf_edit("hf_cstr", config_value("n_embd", "wide")),
        "hf_config_huge": hf_edit("hf_chuge", config_value("n_embd", 10**12)),
        "hf_config_dropout": hf_edit("hf_cdrop", config_value("resid_pdrop", "high")),
        "hf_config_deep": hf_edit("hf_cdeep", lambda d: write(d / "config.json", "[" * 100_000 + "]" * 100_000)),
        "hf_no_tokenizer": hf_edit("hf_notok", no_tokenizer),
        "hf_pickle": hf_edit("hf_pickle", pickled_code),
        "chat_nan": lambda: nan_weights(copy_run(root, "chat_nan", "chat_run")),
        "chat_losses": chat_state("chat_losses", lambda st: st.update(losses="many")),
        "chat_rng": chat_state("chat_rng", lambda st: st["rng"].update(python=[3, [1], None])),
        "chat_data_sha": chat_state("chat_sha", lambda st: st.update(data_sha256="0" * 64)),
        "chat_shape": chat_edit("chat_shape", "n_embd: 16", "n_embd: 32"),
        "chat_url": chat_edit("chat_url", f"data: {root / 'chats' / 'chats.jsonl'}",
                              "data: https://example.com/chats.jsonl"),
    }


def inside_links(run: Path) -> None:
    """The run's files moved into a folder of the run and linked back (relative links): accepted."""
    if (run / "files").is_dir():
        return
    (run / "files").mkdir()
    for name in ("config.yaml", "tokenizer.json", "model.safetensors"):
        (run / name).rename(run / "files" / name)
        (run / name).symlink_to(Path("files") / name)


def pickled_code(d: Path) -> None:
    import torch

    (d / "model.safetensors").unlink()
    torch.save({"weights": torch.zeros(1), "payload": print}, d / "pytorch_model.bin")


@contextlib.contextmanager
def disk_full() -> Iterator[None]:
    """Every fsync fails as on a full disk (ENOSPC)."""
    def no_space(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    real = os.fsync
    os.fsync = no_space
    try:
        yield
    finally:
        os.fsync = real


# --- the cases --------------------------------------------------------------------------------

@dataclass
class Case:
    """One command line. `argv` may name {root}; `setup` is a key of `setups()`."""

    entry: str
    what: str
    argv: list[str]
    setup: str | None = None
    ok: bool = False  # accepted input: exit 0 (else: an error, exit 2)
    fragment: str | None = None  # the error line says this
    started: bool = False  # the run's own lines may come first (the error happens mid-run)
    isolated: bool = False  # in a subprocess with time and memory limits
    full_disk: bool = False
    other_machine: bool = False  # an empty cache: the run's data was never prepared here

    @property
    def id(self) -> str:
        return f"{self.entry}: {self.what}"


def cli_cases() -> list[Case]:
    return core_cases() + chat_cases() + rl_cases() + export_cases() + eval_cases()


def rl_cases() -> list[Case]:
    """quill rl: its tasks, its rewards, its starting model."""
    R = ["rl", "--init-from", "{root}/chat_run", "--out", "{root}/rl_out", *TINY_FLAGS, "--batch-size=2",
         "--rl-group-size=2", "--rl-max-reply-tokens=4", "--data"]
    TASKS = [*R, "{root}/rl/tasks.jsonl"]
    C = Case
    return [
        C("rl", "--data missing", [*R, "{root}/rl/missing.jsonl"], fragment="not found"),
        C("rl", "a task without an answer", [*R, "{root}/rl/noanswer.jsonl"], fragment='line 3: no "answer"'),
        C("rl", "a line that is not JSON", [*R, "{root}/rl/notjson.jsonl"], fragment="line 3: not valid JSON"),
        C("rl", "the last turn the assistant's", [*R, "{root}/rl/lastturn.jsonl"], fragment="line 3: the last"),
        C("rl", "a prompt outside the vocabulary", [*R, "{root}/rl/vocab.jsonl"], fragment="line 3: character"),
        C("rl", "a prompt longer than the context", [*R, "{root}/rl/long.jsonl"], fragment="no room for a reply"),
        C("rl", "--reward an unknown kind", [*TASKS, "--reward", "closest"], fragment="exact, number"),
        C("rl", "--reward a bad regex", [*TASKS, "--reward", "regex:("], fragment="not a regular expression"),
        C("rl", "--reward a missing file", [*TASKS, "--reward", "python:{root}/rl/nothing.py:score"],
          fragment="no such file"),
        C("rl", "--reward a file that does not load", [*TASKS, "--reward", "python:{root}/rl/broken.py:score"],
          fragment="SyntaxError"),
        C("rl", "--reward a function that is not there", [*TASKS, "--reward", "python:{root}/rl/raises.py:other"],
          fragment="no function 'other'"),
        C("rl", "the reward raises (mid-run)", [*TASKS, "--reward", "python:{root}/rl/raises.py:score", "--no-save"],
          started=True, fragment="raised ValueError"),
        C("rl", "--init-from a run without a chat template", [*TASKS, "--init-from", "{root}/run"],
          fragment="no chat template"),
        C("rl", "--init-from NaN weights", [*TASKS, "--init-from", "{root}/chat_nan"], setup="chat_nan",
          fragment="NaN"),
        C("rl", "--out is --init-from", [*TASKS, "--out", "{root}/chat_run", "--overwrite"], fragment="input"),
        C("rl", "learning rate NaN", [*TASKS, "--learning-rate", "nan"], fragment="finite"),
        C("rl", "group size 0", [*TASKS, "--rl-group-size", "0"], fragment="rl_group_size"),
        C("rl", "a tiny run", [*TASKS, "--no-save"], ok=True),
    ]


def export_cases() -> list[Case]:
    """quill export-gguf."""
    C = Case
    return [
        C("export-gguf", "a run that is not there", ["export-gguf", "{root}/nothing", "{root}/x.gguf"],
          fragment="not found"),
        C("export-gguf", "a directory that is no run", ["export-gguf", "{root}/tok", "{root}/x.gguf"],
          fragment="not a run directory"),
        C("export-gguf", "OUT is a directory", ["export-gguf", "{root}/run", "{root}/chats"], fragment="directory"),
        C("export-gguf", "OUT inside the run", ["export-gguf", "{root}/run", "{root}/run/model.safetensors",
                                                "--overwrite"], fragment="inside the input"),
        C("export-gguf", "OUT exists", ["export-gguf", "{root}/run", "{root}/verse.txt"], fragment="--overwrite"),
        C("export-gguf", "--dtype q4", ["export-gguf", "{root}/run", "{root}/x.gguf", "--dtype", "q4"],
          fragment="invalid choice"),
        C("export-gguf", "NaN weights", ["export-gguf", "{root}/run_nan", "{root}/x.gguf"], setup="nan_weights",
          fragment="NaN"),
        C("export-gguf", "config.yaml n_embd edited", ["export-gguf", "{root}/run_shape", "{root}/x.gguf"],
          setup="shape_edited", fragment="expects"),
        C("export-gguf", "tokenizer.json nested 100,000 deep", ["export-gguf", "{root}/run_tok_deep",
                                                                 "{root}/x.gguf"], setup="tok_deep"),
    ]


def chat_cases() -> list[Case]:
    """quill sft and quill chat."""
    F = ["sft", "--init-from", "{root}/run", "--out", "{root}/sft_out", *TINY_FLAGS, "--data"]
    CH = ["chat", "{root}/chat_run", "--seed", "1", "--max-new-tokens", "4", "--message"]
    C = Case
    return [
        C("sft", "--data missing", [*F, "{root}/chats/missing.jsonl"], fragment="not found"),
        C("sft", "--data a .txt file", [*F, "{root}/verse.txt"], fragment=".jsonl file"),
        C("sft", "a line that is not JSON", [*F, "{root}/chats/notjson.jsonl"], fragment="line 4: not valid JSON"),
        C("sft", "an unknown role", [*F, "{root}/chats/role.jsonl"], fragment="unknown role 'wizard'"),
        C("sft", "roles out of order", [*F, "{root}/chats/order.jsonl"], fragment="roles out of order"),
        C("sft", "no assistant turn", [*F, "{root}/chats/noassistant.jsonl"], fragment="no assistant turn"),
        C("sft", "content that is not a string", [*F, "{root}/chats/content.jsonl"],
          fragment="content must be a string"),
        C("sft", "a line nested 100,000 deep", [*F, "{root}/chats/deep.jsonl"], fragment="line 4: not valid JSON"),
        C("sft", "a 4 MB line with a character outside the vocabulary", [*F, "{root}/chats/huge_bad.jsonl"],
          fragment="position 42000"),
        C("sft", "a 4 MB line, a character outside the vocabulary past any context (never seen)",
          [*F, "{root}/chats/huge_past.jsonl", "--no-save"], ok=True),
        C("sft", "an 8 MB assistant message", [*F, "{root}/chats/huge_assistant.jsonl", "--no-save"], ok=True),
        C("sft", "a 4 MB conversation (truncated to the context)", [*F, "{root}/chats/huge.jsonl", "--no-save"],
          ok=True),
        C("sft", "held-out conversations longer than the context", [*F, "{root}/chats/long.jsonl", "--no-save",
                                                                      "--val-fraction", "0.5"], ok=True),
        C("sft", "held-out conversations longer than the context, dropped, --exact-match-every 2",
          [*F, "{root}/chats/long.jsonl", "--no-save", "--val-fraction", "0.5", "--sft-too-long", "drop",
           "--exact-match-every", "2"], ok=True),
        C("sft", "a lone surrogate (\\ud800) in a message", [*F, "{root}/chats/surrogate.jsonl"],
          fragment="line 4: holds a lone surrogate"),
        C("sft", "a lone surrogate, without --init-from", ["sft", "--out", "{root}/sft_out", *TINY_FLAGS, "--data",
                                                         "{root}/chats/surrogate.jsonl"],
          fragment="line 4: holds a lone surrogate"),
        C("sft", "non-UTF-8 bytes", [*F, "{root}/chats/binary.jsonl"], fragment="line 4: not UTF-8"),
        C("sft", "a corrupt .parquet", [*F, "{root}/chats/bad.parquet"], fragment="not a readable Parquet file"),
        C("sft", "--out is --data's directory", [*F, "{root}/chats/chats.jsonl", "--out", "{root}/chats",
                                                 "--overwrite"], fragment="holds the input"),
        C("sft", "--out is --init-from", [*F, "{root}/chats/chats.jsonl", "--out", "{root}/run", "--overwrite"],
          fragment="is the input"),
        C("sft", "--init-from NaN weights", [*F, "{root}/chats/chats.jsonl", "--init-from", "{root}/run_nan"],
          setup="nan_weights", fragment="NaN"),
        C("sft", "--init-from a config.yaml python tag", [*F, "{root}/chats/chats.jsonl", "--init-from",
                                                          "{root}/run_tag"], setup="config_tag", fragment="YAML"),
        C("sft", "--init-from a tokenizer.json nested 100,000 deep", [*F, "{root}/chats/chats.jsonl", "--init-from",
                                                                     "{root}/run_tok_deep"], setup="tok_deep",
          fragment="deeply"),
        C("sft", "--init-from a directory that is no run", [*F, "{root}/chats/chats.jsonl", "--init-from",
                                                            "{root}/datadir"], fragment="not a run directory"),
        C("sft", "learning rate NaN", [*F, "{root}/chats/chats.jsonl", "--learning-rate", "nan"], fragment="finite"),
        C("sft", "--exact-match-every -1", [*F, "{root}/chats/chats.jsonl", "--exact-match-every", "-1"],
          fragment="exact-match-every"),
        C("sft", "--resume: forged state.json losses", ["sft", "--resume", "{root}/chat_losses"], setup="chat_losses",
          fragment="losses"),
        C("sft", "--resume: forged RNG state", ["sft", "--resume", "{root}/chat_rng"], setup="chat_rng",
          fragment="does not fit"),
        C("sft", "--resume: forged data fingerprint", ["sft", "--resume", "{root}/chat_sha"], setup="chat_data_sha",
          fragment="training data differs"),
        C("sft", "--resume: config.yaml edited to another shape", ["sft", "--resume", "{root}/chat_shape"],
          setup="chat_shape", fragment="n_embd 16 -> 32"),
        C("sft", "--resume: a stranger's run naming a URL", ["sft", "--resume", "{root}/chat_url"], setup="chat_url",
          fragment="never downloads"),
        C("sft", "--resume --data of other conversations", ["sft", "--resume", "{root}/chat_run", "--data",
                                                            "{root}/chats/other.jsonl"],
          fragment="training data differs"),
        C("sft", "--resume while another process writes the run", ["sft", "--resume", "{root}/chat_held",
                                                                     "--max-iters", "6", "--allow-config-change"],
          setup="chat_held", fragment="being written by another process (pid"),
        C("sft", "full disk", [*F, "{root}/chats/chats.jsonl", "--out", "{root}/sft_full"], full_disk=True,
          started=True, fragment="the disk is full"),
        C("chat", "a run without a chat template", ["chat", "{root}/run", "--message", "To"],
          fragment="no chat template"),
        C("chat", "--message outside the vocabulary", [*CH, "To \u20ac"], fragment="vocabulary"),
        C("chat", "--system outside the vocabulary", [*CH, "To", "--system", "\u20ac"], fragment="vocabulary"),
        C("chat", "a 12,000-character message", [*CH, "To be " * 2000], fragment="longer than the model's context"),
        C("chat", "temperature NaN", [*CH, "To", "--temperature", "nan"], fragment="temperature"),
        C("chat", "top_p 2", [*CH, "To", "--top-p", "2"], fragment="top_p"),
        C("chat", "max new tokens -1", [*CH, "To", "--max-new-tokens", "-1"], fragment="max_new_tokens"),
        C("chat", "seed over 64 bits", [*CH, "To", "--seed", str(2**70)], fragment="seed"),
        C("chat", "--dtype float16", [*CH, "To", "--dtype", "float16"], fragment="dtype must be one of"),
        C("chat", "temperature 1e-45", [*CH, "To", "--temperature", "1e-45"], ok=True),
        C("chat", "int8 weights", [*CH, "To", "--dtype", "int8"], ok=True),
        C("chat", "NaN weights", ["chat", "{root}/run_nan", "--message", "To"], setup="nan_weights", fragment="NaN"),
        C("chat", "--tools naming no built-in tool", [*CH, "To", "--tools", "calculator,abacus"],
          fragment="unknown tool 'abacus'"),
        C("chat", "--tools for a model that never learnt tools", [*CH, "To", "--tools", "calculator"],
          fragment="has not learnt tools"),
        C("sft", "a tool call without an id", [*F, "{root}/chats/tool_noid.jsonl"], fragment="line 4: "
          "message 1: tool_calls[0]: missing id"),
        C("sft", "tool call arguments that are not JSON", [*F, "{root}/chats/tool_args.jsonl"],
          fragment="arguments is not JSON"),
        C("sft", "a tool message answering no call", [*F, "{root}/chats/tool_orphan.jsonl"],
          fragment="line 4: message 2: a tool message answering no call"),
        C("sft", "a call of a tool the line does not define", [*F, "{root}/chats/tool_undefined.jsonl"],
          fragment="calls 'weather', which the line's tools do not define"),
        C("sft", "a tool schema requiring a property it lacks", [*F, "{root}/chats/tool_schema.jsonl"],
          fragment="required names 'expression'"),
    ]


def eval_cases() -> list[Case]:
    """quill eval --tasks (lm-evaluation-harness) and --dtype wherever it is a flag."""
    E = ["eval", "{root}/run", "--include-path", "{root}/tasks", "--tasks"]
    RUNNABLE = ["eval", "{root}/run", "--include-path", str(REPO / "tests" / "lm_eval_tasks"), "--tasks",
                "quill_verse_choice", "--unknown", "skip", "--no-progress"]
    C = Case
    return [
        C("eval", "--tasks: an unknown task", [*E, "quill_audti"], fragment="did you mean quill_audit"),
        C("eval", "--tasks: a YAML with a python tag", [*E, "quill_audit_tagged"], fragment="unknown task"),
        C("eval", "--tasks: a YAML nested 50,000 deep", [*E, "quill_audit_deep"], fragment="unknown task"),
        C("eval", "--tasks: --include-path missing", ["eval", "{root}/run", "--tasks", "quill_audit",
                                                      "--include-path", "{root}/nothing"],
          fragment="task directory not found"),
        C("eval", "--tasks: --limit -1", [*E, "quill_audit", "--limit", "-1"], fragment="limit"),
        C("eval", "--tasks: --limit NaN", [*E, "quill_audit", "--limit", "nan"], fragment="limit"),
        C("eval", "--tasks: --num-fewshot -1", [*E, "quill_audit", "--num-fewshot", "-1"], fragment="num_fewshot"),
        C("eval", "--tasks: --num-fewshot 1000000", [*E, "quill_audit", "--num-fewshot", "1000000"],
          fragment="num_fewshot"),
        C("eval", "--tasks: --num-fewshot more than the task holds",
          [*RUNNABLE, "--num-fewshot", "999", "--limit", "2"], started=True, fragment="fewer examples"),
        C("eval", "--tasks: --limit 1e19 (the whole task)", [*RUNNABLE, "--limit", "1e19"], ok=True),
        C("eval", "--tasks: --dtype int4", [*E, "quill_audit", "--dtype", "int4"], fragment="dtype must be one of"),
        C("eval", "--data: --dtype fp8", ["eval", "{root}/run", "--data", "{root}/verse.txt", "--dtype", "fp8"],
          fragment="dtype must be one of"),
        C("sample", "--dtype float16", ["sample", "{root}/run", "--dtype", "float16"], fragment="dtype must be one of"),
        C("sample", "--dtype of 300 characters", ["sample", "{root}/run", "--dtype", "x" * 300],
          fragment="xxx...xxx"),
        C("serve", "--dtype half", ["serve", "{root}/run", "--port", "0", "--dtype", "half"],
          fragment="dtype must be one of"),
    ]


def core_cases() -> list[Case]:
    """train, prepare, sample, tokenize, tokenizer train, plot, export-hf, import-hf, eval, ladder, serve."""
    T = ["train", "--data", "{root}/verse.txt", "--out", "{root}/out", *TINY_FLAGS]
    S = ["sample", "{root}/run", "--max-new-tokens", "5", "--seed", "1"]
    C = Case
    return [
        # quill train: flags, config files, data, resume
        C("train", "learning rate NaN", [*T, "--learning-rate", "nan"], fragment="finite"),
        C("train", "beta1 5", [*T, "--beta1", "5"], fragment="beta1"),
        C("train", "weight decay -1", [*T, "--weight-decay", "-1"], fragment="weight_decay"),
        C("train", "warmup -5", [*T, "--warmup-iters", "-5"], fragment="warmup_iters"),
        C("train", "lr_decay_iters 0", [*T, "--lr-decay-iters", "0"], fragment="lr_decay_iters"),
        C("train", "seed -1", [*T, "--seed", "-1"], fragment="seed"),
        C("train", "seed over 64 bits", [*T, "--seed", str(2**70)], fragment="seed"),
        C("train", "n_embd 10^8", [*T, "--n-embd", "100000000"], fragment="n_embd"),
        C("train", "n_layer 1e999", [*T, "--n-layer", "1e999"], fragment="n_layer"),
        C("train", "dropout NaN", [*T, "--dropout", "nan"], fragment="dropout"),
        C("train", "time budget inf", [*T, "--time-budget", "inf"], fragment="time_budget"),
        C("train", "YAML billion laughs", ["train", "--config", "{root}/laughs.yaml"], isolated=True,
          fragment="n_layer"),
        C("train", "YAML syntax error", ["train", "--config", "{root}/syntax.yaml"], fragment="line 3"),
        C("train", "YAML nested 50,000 deep", ["train", "--config", "{root}/deep.yaml"]),
        C("train", "YAML python tag", ["train", "--config", "{root}/tag.yaml"], fragment="YAML"),
        C("train", "--data: .jsonl nested 100,000 deep", [*T, "--data", "{root}/deep.jsonl"], fragment="deeply"),
        C("train", "--data: corrupt .gz", [*T, "--data", "{root}/corrupt.txt.gz"], fragment="gzip"),
        C("train", "--data: truncated .gz", [*T, "--data", "{root}/truncated.txt.gz"], fragment="gzip"),
        C("train", "--data: prepared ids past the vocabulary",
          [*T, "--data", "{root}/prepared_bad", "--tokenizer", "{root}/prepared_bad/tokenizer.json"],
          fragment="outside the tokenizer's vocabulary"),
        C("train", "--out is the data directory", [*T, "--data", "{root}/datadir", "--out", "{root}/datadir",
                                                   "--overwrite"], fragment="input"),
        C("train", "--tokenizer with an empty special token", [*T, "--tokenizer", "{root}/tok/empty_special.json"],
          fragment="non-empty"),
        C("train", "--resume: config.yaml edited to another shape", ["train", "--resume", "{root}/run_shape"],
          setup="shape_edited", fragment="n_embd 16 -> 32"),
        C("train", "--resume: config.yaml edited to a huge model", ["train", "--resume", "{root}/run_huge"],
          setup="shape_huge", fragment="n_embd"),
        C("train", "--resume: forged state.json losses", ["train", "--resume", "{root}/run_losses"],
          setup="state_losses", fragment="losses"),
        C("train", "--resume: forged state.json metrics", ["train", "--resume", "{root}/run_metrics"],
          setup="state_metrics", fragment="metrics"),
        C("train", "--resume: forged RNG state", ["train", "--resume", "{root}/run_rng"], setup="state_rng",
          fragment="does not fit"),
        C("train", "--resume: forged optimizer state", ["train", "--resume", "{root}/run_optim"],
          setup="state_optimizer", fragment="does not fit"),
        C("train", "--resume: a stranger's run naming a URL", ["train", "--resume", "{root}/run_url"],
          setup="stranger_url", other_machine=True, fragment="never downloads"),
        C("train", "--resume: a stranger's run naming a local file", ["train", "--resume", "{root}/run_file"],
          setup="stranger_file", other_machine=True, fragment="never downloads"),
        C("train", "--resume --data URL", ["train", "--resume", "{root}/run", "--data", "https://example.com/x"],
          fragment="never downloads"),
        C("train", "--resume --data of other text", ["train", "--resume", "{root}/run", "--data", "{root}/other.txt",
                                                     "--max-iters", "6", "--allow-config-change"],
          fragment="not the data"),
        C("train", "--resume with a tokenizer.json of an empty special token", ["train", "--resume",
                                                                              "{root}/run_tok_empty"],
          setup="tok_empty_special", fragment="non-empty"),
        C("train", "--resume while another process writes the run", ["train", "--resume", "{root}/run_held",
                                                                       "--max-iters", "6", "--allow-config-change"],
          setup="run_held", fragment="being written by another process (pid"),
        C("train", "--overwrite a run another process writes", [*T, "--out", "{root}/run_held", "--overwrite"],
          setup="run_held", fragment="being written by another process (pid"),
        C("train", "--resume: every state.json a FIFO", ["train", "--resume", "{root}/run_sfifo"],
          setup="state_fifo", isolated=True, fragment="no intact checkpoint"),
        C("train", "--resume: every state.json a link to /etc/passwd", ["train", "--resume", "{root}/run_sout"],
          setup="state_outside", fragment="no intact checkpoint"),
        C("train", "full disk", [*T, "--out", "{root}/out_full"], full_disk=True, started=True,
          fragment="the disk is full"),
        # quill prepare
        C("prepare", "--out is the --data directory", ["prepare", "--data", "{root}/datadir", "--out",
                                                       "{root}/datadir", "--overwrite"], fragment="input"),
        C("prepare", "--out inside --data", ["prepare", "--data", "{root}/datadir", "--out", "{root}/datadir/p"],
          fragment="inside the input"),
        C("prepare", "--out holds --data", ["prepare", "--data", "{root}/datadir/verse.txt", "--out",
                                            "{root}/datadir", "--overwrite"], fragment="holds the input"),
        C("prepare", "--workers -3", ["prepare", "--data", "{root}/verse.txt", "--out", "{root}/p", "--workers", "-3"],
          fragment="workers"),
        C("prepare", "--val-fraction NaN", ["prepare", "--data", "{root}/verse.txt", "--out", "{root}/p",
                                            "--val-fraction", "nan"], fragment="val_fraction"),
        C("prepare", "--max-megabytes NaN", ["prepare", "--data", "{root}/verse.txt", "--out", "{root}/p",
                                             "--max-megabytes", "nan"], fragment="max_megabytes"),
        C("prepare", "a lone surrogate (\\ud800) in a .jsonl line", ["prepare", "--data", "{root}/surrogate.jsonl",
                                                                   "--out", "{root}/p"], fragment="line 2"),
        C("train", "--data a file name that is not UTF-8", [*T, "--data", "{root}/" + os.fsdecode(b"named-\xff.txt"),
                                                            "--no-save"], ok=True),
        C("prepare", "corrupt .gz", ["prepare", "--data", "{root}/corrupt.txt.gz", "--out", "{root}/p"],
          fragment="gzip"),
        C("prepare", "not gzip at all", ["prepare", "--data", "{root}/notgzip.txt.gz", "--out", "{root}/p"],
          fragment="gzip"),
        C("prepare", ".jsonl nested 100,000 deep", ["prepare", "--data", "{root}/deep.jsonl", "--out", "{root}/p"],
          fragment="deeply"),
        C("prepare", "tokenizer with a float id", ["prepare", "--data", "{root}/verse.txt", "--out", "{root}/p",
                                                   "--tokenizer", "{root}/tok/float_special.json"],
          fragment="integers"),
        C("prepare", "full disk", ["prepare", "--data", "{root}/verse.txt", "--out", "{root}/p_full",
                                   "--no-progress"], full_disk=True, fragment="the disk is full"),
        # quill sample
        C("sample", "temperature 1e-45", [*S, "--temperature", "1e-45"], ok=True),
        C("sample", "repetition penalty 1e-45", [*S, "--repetition-penalty", "1e-45"], ok=True),
        C("sample", "top_p 1e-300", [*S, "--top-p", "1e-300"], ok=True),
        C("sample", "all three at once", [*S, "--temperature", "1e-45", "--repetition-penalty", "1e-45",
                                          "--top-p", "1e-300"], ok=True),
        C("sample", "temperature inf", [*S, "--temperature", "inf"], fragment="finite"),
        C("sample", "seed -1", [*S, "--seed", "-1"], fragment="seed"),
        C("sample", "seed over 64 bits", [*S, "--seed", str(2**64)], fragment="seed"),
        C("sample", "17 stop strings", [*S, *[a for i in range(17) for a in ("--stop", f"s{i}")]],
          fragment="stop"),
        C("sample", "NaN weights", ["sample", "{root}/run_nan"], setup="nan_weights", fragment="NaN"),
        C("sample", "config.yaml 3 GB (sparse)", ["sample", "{root}/run_sparse"], setup="config_sparse",
          isolated=True, fragment="bytes"),
        C("sample", "tokenizer.json a FIFO", ["sample", "{root}/run_tfifo"], setup="tokenizer_fifo", isolated=True),
        C("sample", "tokenizer.json a link to /etc/passwd", ["sample", "{root}/run_tout"], setup="tokenizer_outside",
          fragment="leads outside"),
        C("sample", "config.yaml a link to another run's", ["sample", "{root}/run_cout"], setup="config_outside",
          fragment="leads outside"),
        C("sample", "model.safetensors a link to another run's", ["sample", "{root}/run_wout"],
          setup="weights_outside", fragment="leads outside"),
        C("sample", "its files links into a folder of the run", [*S[:1], "{root}/run_lin", *S[2:]],
          setup="links_inside", ok=True),
        C("sample", "float64 weights of 1e300 (infinite as float32)", ["sample", "{root}/run_f64"],
          setup="f64_weights", fragment="once converted from float64"),
        C("sample", "int32 weights", ["sample", "{root}/run_int"], setup="int_weights", fragment="int32"),
        C("sample", "complex weights", ["sample", "{root}/run_cplx"], setup="complex_weights", fragment="complex"),
        C("eval", "float64 weights of 1e300", ["eval", "{root}/run_f64", "--data", "{root}/verse.txt"],
          setup="f64_weights", fragment="once converted from float64"),
        C("serve", "float64 weights of 1e300", ["serve", "{root}/run_f64", "--port", "0"], setup="f64_weights",
          fragment="once converted from float64"),
        C("sample", "config.yaml for a much larger model", ["sample", "{root}/run_huge"], setup="shape_huge",
          fragment="the model of config.yaml"),
        C("sample", "config.yaml vocab_size edited", ["sample", "{root}/run_vocab"], setup="vocab_edited",
          fragment="vocab_size"),
        C("sample", "config.yaml billion laughs", ["sample", "{root}/run_laughs"], setup="config_laughs",
          isolated=True, fragment="n_layer"),
        C("sample", "config.yaml YAML syntax error", ["sample", "{root}/run_syntax"], setup="config_syntax",
          fragment="line 3"),
        C("sample", "config.yaml python tag", ["sample", "{root}/run_tag"], setup="config_tag", fragment="YAML"),
        C("sample", "tokenizer.json with an empty special token", ["sample", "{root}/run_tok_empty"],
          setup="tok_empty_special", isolated=True, fragment="non-empty"),
        C("sample", "tokenizer.json with a float special id", ["sample", "{root}/run_tok_float"],
          setup="tok_float_special", fragment="integers"),
        C("sample", "tokenizer.json nested 100,000 deep", ["sample", "{root}/run_tok_deep"], setup="tok_deep",
          fragment="deeply"),
        # quill tokenize / quill tokenizer train
        C("tokenize", "empty special token", ["tokenize", "hello", "--tokenizer", "{root}/tok/empty_special.json"],
          isolated=True, fragment="non-empty"),
        C("tokenize", "float special id", ["tokenize", "hello", "--tokenizer", "{root}/tok/float_special.json"],
          fragment="integers"),
        C("tokenize", "two specials share an id", ["tokenize", "hi", "--tokenizer", "{root}/tok/dup_special.json"],
          fragment="share an id"),
        C("tokenize", "special id out of range", ["tokenize", "hi", "--tokenizer", "{root}/tok/range_special.json"],
          fragment="integers"),
        C("tokenize", "backtracking regex", ["tokenize", "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa!", "--tokenizer",
                                             "{root}/tok/redos_pattern.json"], fragment="pattern"),
        C("tokenize", "20,000 special tokens", ["tokenize", "hello <|s5|> world", "--tokenizer",
                                                "{root}/tok/many_special.json"], isolated=True,
          fragment="20,001 special tokens"),
        C("tokenize", "JSON nested 100,000 deep", ["tokenize", "hi", "--tokenizer", "{root}/tok/deep.json"],
          fragment="deeply"),
        C("tokenize", "two million characters", ["tokenize", "hi", "--tokenizer", "{root}/tok/huge.json"],
          fragment="more than any tokenizer"),
        C("tokenizer train", "--out is a directory", ["tokenizer", "train", "--data", "{root}/verse.txt", "--out",
                                                      "{root}/datadir"], fragment="directory"),
        C("tokenizer train", "empty --data", ["tokenizer", "train", "--data", "{root}/empty.txt", "--out",
                                              "{root}/t.json"], fragment="empty"),
        C("tokenizer train", "--out is --data", ["tokenizer", "train", "--data", "{root}/verse.txt", "--out",
                                                 "{root}/verse.txt", "--overwrite"], fragment="input"),
        C("tokenizer train", "a 300-character special token", ["tokenizer", "train", "--data", "{root}/verse.txt",
                                                               "--out", "{root}/t.json", "--special-tokens", "x" * 300],
          fragment="longer than"),
        C("tokenizer train", "vocab size 10^9", ["tokenizer", "train", "--data", "{root}/verse.txt", "--out",
                                                 "{root}/t.json", "--vocab-size", "1000000000"], fragment="vocab size"),
        C("tokenizer train", "full disk", ["tokenizer", "train", "--data", "{root}/verse.txt", "--out",
                                           "{root}/t_full.json", "--vocab-size", "300", "--no-progress"],
          full_disk=True, fragment="the disk is full"),
        # quill plot
        C("plot", "binary metrics.csv", ["plot", "{root}/run_mbin"], setup="metrics_binary"),
        C("plot", "metrics.csv a link to /dev/zero", ["plot", "{root}/run_mzero"], setup="metrics_zero",
          fragment="leads outside"),
        C("plot", "metrics.csv a FIFO", ["plot", "{root}/run_mfifo"], setup="metrics_fifo", isolated=True,
          fragment="not a regular file"),
        C("plot", "metrics.csv of other columns", ["plot", "{root}/run_mhead"], setup="metrics_header",
          fragment="no metrics rows"),
        C("plot", "a 200,000-character field", ["plot", "{root}/run_mhuge"], setup="metrics_huge_field"),
        C("plot", "malformed rows among good ones", ["plot", "{root}/run_mrows", "--output", "{root}/plot.png"],
          setup="metrics_bad_rows", ok=True),
        # quill export-hf / import-hf
        C("export-hf", "OUT is the run", ["export-hf", "{root}/bpe_run", "{root}/bpe_run", "--overwrite"],
          fragment="input"),
        C("export-hf", "OUT inside the run", ["export-hf", "{root}/bpe_run", "{root}/bpe_run/hf"],
          fragment="inside the input"),
        C("export-hf", "a char tokenizer", ["export-hf", "{root}/run", "{root}/x"], fragment="byte-level BPE"),
        C("export-hf", "NaN weights", ["export-hf", "{root}/run_nan", "{root}/x"], setup="nan_weights",
          fragment="NaN"),
        C("import-hf", "index naming ../", ["import-hf", "{root}/hf_up", "{root}/x"], setup="hf_index_up",
          fragment="only files inside"),
        C("import-hf", "index naming an absolute path", ["import-hf", "{root}/hf_abs", "{root}/x"],
          setup="hf_index_abs", fragment="only files inside"),
        C("import-hf", "index that is a list", ["import-hf", "{root}/hf_list", "{root}/x"], setup="hf_index_list",
          fragment="index"),
        C("import-hf", "config.json n_embd 'wide'", ["import-hf", "{root}/hf_cstr", "{root}/x"],
          setup="hf_config_str", fragment="n_embd"),
        C("import-hf", "config.json n_embd 10^12", ["import-hf", "{root}/hf_chuge", "{root}/x"],
          setup="hf_config_huge", fragment="n_embd"),
        C("import-hf", "config.json dropout 'high'", ["import-hf", "{root}/hf_cdrop", "{root}/x"],
          setup="hf_config_dropout"),
        C("import-hf", "config.json nested 100,000 deep", ["import-hf", "{root}/hf_cdeep", "{root}/x"],
          setup="hf_config_deep", fragment="deeply"),
        C("import-hf", "no tokenizer files", ["import-hf", "{root}/hf_notok", "{root}/x"], setup="hf_no_tokenizer",
          fragment="--tokenizer gpt2"),
        C("import-hf", "pickled code in pytorch_model.bin", ["import-hf", "{root}/hf_pickle", "{root}/x"],
          setup="hf_pickle", fragment="weights_only"),
        C("import-hf", "OUT is SRC", ["import-hf", "{root}/hf", "{root}/hf", "--overwrite"], fragment="input"),
        # quill eval / quill ladder / quill serve
        C("eval", "NaN weights", ["eval", "{root}/run_nan", "--data", "{root}/verse.txt"], setup="nan_weights",
          fragment="NaN"),
        C("eval", "--stride 0", ["eval", "{root}/run", "--data", "{root}/verse.txt", "--stride", "0"],
          fragment="stride"),
        C("eval", "--batch-size 0", ["eval", "{root}/run", "--data", "{root}/verse.txt", "--batch-size", "0"],
          fragment="batch-size"),
        C("eval", "HF directory without a tokenizer", ["eval", "{root}/hf_notok", "--data", "{root}/verse.txt"],
          setup="hf_no_tokenizer", fragment="tokenizer"),
        C("eval", "--data corrupt .gz", ["eval", "{root}/run", "--data", "{root}/corrupt.txt.gz"]),
        C("ladder", "--out is the data directory", ["ladder", "--data", "{root}/datadir", "--out", "{root}/datadir",
                                                    "--overwrite"], fragment="input"),
        C("ladder", "learning rate NaN", ["ladder", "--data", "{root}/verse.txt", "--learning-rate", "nan"],
          fragment="finite"),
        C("serve", "--host with an empty label", ["serve", "{root}/run", "--host", "a..b"], fragment="host"),
        C("serve", "--host of 300 characters", ["serve", "{root}/run", "--host", "a" * 300], fragment="host"),
        C("serve", "--port 70000", ["serve", "{root}/run", "--port", "70000"], fragment="port"),
        C("serve", "--tools naming no built-in tool", ["serve", "{root}/run", "--tools", "abacus"],
          fragment="unknown tool 'abacus'"),
        C("serve", "--tools for a model that never learnt tools", ["serve", "{root}/chat_run", "--port", "0",
                                                                    "--tools", "python"],
          fragment="has not learnt tools"),
        C("serve", "NaN weights", ["serve", "{root}/run_nan", "--port", "0"], setup="nan_weights", fragment="NaN"),
    ]


# --- running a command-line case ----------------------------------------------------------------

@dataclass
class Result:
    id: str
    entry: str
    held: bool
    detail: str  # the error line (or what broke)
    latency_s: float | None = None  # HTTP: the normal request that followed


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file under `root` (the cache excepted), by relative path."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if rel.parts[0] != CACHE and p.is_file() and not p.is_symlink():
            st = p.stat()  # a file over 64 MB (a sparse one): its size and time, not its bytes
            out[str(rel)] = f"{st.st_size} {st.st_mtime_ns}" if st.st_size > 64 << 20 else \
                hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def run_main(argv: list[str], full: bool) -> tuple[int, str, str]:
    """`quill ARGV` in this process: (exit status, stdout, stderr); an escaping exception is a traceback."""
    import traceback

    from quillgpt.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            with disk_full() if full else contextlib.nullcontext():
                code = main(argv)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:  # noqa: BLE001 - what the audit is looking for
            traceback.print_exc(file=err)
            code = 1
    return code, out.getvalue(), err.getvalue()


def run_isolated(argv: list[str], timeout_s: float = 600.0) -> tuple[int, str, str]:
    """`python -m quillgpt ARGV` with a time limit and an 8 GB address-space limit."""
    def limits() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))

    try:
        proc = subprocess.run([sys.executable, "-m", "quillgpt", *argv], capture_output=True, text=True,
                              timeout=timeout_s, preexec_fn=limits if os.name == "posix" else None,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    except subprocess.TimeoutExpired:
        return -1, "", f"hung: no answer in {timeout_s:.0f} s"
    return proc.returncode, proc.stdout, proc.stderr


def judge(case: Case, code: int, err: str, changed: list[str]) -> tuple[bool, str]:
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("quill: error:")]
    if "Traceback" in err or code == -1:
        return False, next((line for line in reversed(lines) if line.strip()), "traceback")
    if changed:
        return False, f"changed {', '.join(changed[:3])}"
    if case.ok:
        return code == 0, f"exit {code}" + (f": {lines[-1]}" if code and lines else "")
    if code != 2:
        return False, f"exit {code}: {lines[-1] if lines else ''}"
    one_line = len(errors) == 1 and lines[-1] == errors[0] and (case.started or len(lines) == 1)
    if not one_line:
        return False, f"{len(lines)} lines on stderr: {' | '.join(lines[:3])}"
    if case.fragment and case.fragment not in errors[0]:
        return False, f"says {errors[0]!r}, not {case.fragment!r}"
    return True, errors[0]


def run_cli_case(case: Case, root: Path) -> Result:
    if case.setup:
        setups(root)[case.setup]()
    argv = [a.replace("{root}", str(root)) for a in case.argv]
    before = tree_digest(root)
    cache = root / CACHE / ("other-machine" if case.other_machine else "")
    with env(QUILL_CACHE=str(cache)):
        code, _, err = run_isolated(argv) if case.isolated else run_main(argv, case.full_disk)
    after = tree_digest(root)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    if case.ok:  # an accepted case may write what it was asked to write
        changed = [c for c in changed if not c.endswith(".png")]
    held, detail = judge(case, code, err, changed)
    return Result(case.id, case.entry, held, detail)


# --- HTTP ---------------------------------------------------------------------------------------

JSON = {"content-type": "application/json"}
NORMAL = {"prompt": "To", "max_tokens": 4, "seed": 1}


@dataclass
class HttpCase:
    what: str
    body: bytes | None = None  # sent as is (default: the normal request)
    json: dict | None = None
    headers: dict[str, str] = field(default_factory=lambda: dict(JSON))
    status: int = 400
    fragment: str | None = None
    path: str = "/v1/completions"
    method: str = "POST"
    disconnect: bool = False  # send half the body, then hang up
    server: str = "base"  # base: the trained run (no chat template); chat: the chat run

    @property
    def id(self) -> str:
        return f"HTTP: {self.what}"


def http_cases() -> list[HttpCase]:
    return completion_cases() + logprob_cases() + chat_http_cases()


CHAT = "/v1/chat/completions"
USER = [{"role": "user", "content": "To"}]


def fn(name: str, parameters: dict | None = None) -> dict:
    """A tool definition (OpenAI's shape)."""
    return {"type": "function", "function": {"name": name, **({"parameters": parameters} if parameters else {})}}


def deep_schema(depth: int) -> dict:
    schema: dict = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"x": schema}}
    return schema


def chat_http_cases() -> list[HttpCase]:
    """/v1/chat/completions, on the chat run (and once on the run without a chat template)."""
    def H(what: str, **kw: Any) -> HttpCase:
        return HttpCase(f"chat: {what}", path=CHAT, **{"server": "chat", **kw})

    turns = [{"role": "system", "content": "be"}] + [
        {"role": "user" if i % 2 == 0 else "assistant", "content": "To"} for i in range(9_999)]
    return [
        H("a model without a chat template", json={"messages": USER}, server="base", fragment="no chat template"),
        H("messages a string", json={"messages": "To"}, fragment="valid list"),
        H("no messages", json={"messages": []}, fragment="at least 1"),
        H("an unknown role", json={"messages": [{"role": "wizard", "content": "To"}]}, fragment="unknown role"),
        H("roles out of order", json={"messages": [{"role": "assistant", "content": "To"}]},
          fragment="roles out of order"),
        H("content null", json={"messages": [{"role": "user", "content": None}]}, fragment="must be a string"),
        H("an image content part", json={"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}]},
          fragment="only text content parts"),
        H("10,000 messages", json={"messages": turns}, fragment="longer than the model's context"),
        H("content nested 100,000 deep", body=b'{"messages": [{"role": "user", "content": ' + b"[" * 100_000
          + b"]" * 100_000 + b"}]}", fragment="not valid JSON"),
        H("content nested 500 deep", body=b'{"messages": [{"role": "user", "content": ' + b"[" * 500
          + b"]" * 500 + b"}]}", fragment="messages"),
        H("a message outside the vocabulary", json={"messages": [{"role": "user", "content": "To \u20ac"}]},
          fragment="vocabulary"),
        H("a lone surrogate in a message", body=b'{"messages": [{"role": "user", "content": "To \\ud800"}]}',
          fragment="lone surrogate"),
        H("n 17", json={"messages": USER, "n": 17}, fragment="at most 16"),
        H("max_tokens 10^30", json={"messages": USER, "max_tokens": 10**30}, fragment="at most 2048"),
        H("tools", json={"messages": USER, "tools": [{"type": "function", "function": {"name": "f"}}]},
          fragment="tools"),
        H("tools not a list", json={"messages": USER, "tools": {"type": "function"}}, fragment="tools"),
        H("a tool named with a space", json={"messages": USER, "tools": [fn("get weather")]},
          fragment="function.name must be"),
        H("a tool schema of type str", json={"messages": USER, "tools": [fn("f", {"type": "str"})]},
          fragment="not a JSON Schema type"),
        H("a tool schema requiring a property it lacks", json={"messages": USER, "tools": [
            fn("f", {"type": "object", "properties": {}, "required": ["x"]})]}, fragment="required names 'x'"),
        H("a tool schema nested 40 deep", json={"messages": USER, "tools": [fn("f", deep_schema(40))]},
          fragment="nested"),
        H("129 tools", json={"messages": USER, "tools": [fn(f"f{i}") for i in range(129)]}, fragment="at most 128"),
        H("two tools of one name", json={"messages": USER, "tools": [fn("f"), fn("f")]}, fragment="a second tool"),
        H("tool_choice naming a function", json={"messages": USER, "tools": [fn("f")], "tool_choice": {
            "type": "function", "function": {"name": "f"}}}, fragment="tool_choice"),
        H("tool_calls with arguments that are not JSON", json={"messages": [*USER, {
            "role": "assistant", "content": None, "tool_calls": [{"id": "c", "type": "function", "function": {
                "name": "f", "arguments": "{x: 1"}}]}, {"role": "tool", "tool_call_id": "c", "content": "1"}]},
          fragment="is not JSON"),
        H("a tool message answering no call", json={"messages": [*USER, {"role": "tool", "tool_call_id": "c",
                                                                        "content": "1"}]},
          fragment="answering no call"),
        H("functions (legacy tools)", json={"messages": USER, "functions": [{"name": "f", "parameters": {}}]},
          fragment="functions"),
        H("function_call (legacy tool_choice)", json={"messages": USER, "function_call": {"name": "f"}},
          fragment="function_call"),
        H('tool_choice "required" without tools', json={"messages": USER, "tool_choice": "required"},
          fragment="tool_choice"),
        H('tool_choice "none" without tools', json={"messages": USER, "tool_choice": "none", "max_tokens": 4,
                                                   "seed": 1}, status=200),
        H("top_logprobs without logprobs", json={"messages": USER, "top_logprobs": 3}, fragment="logprobs"),
        H("top_logprobs 21", json={"messages": USER, "logprobs": True, "top_logprobs": 21},
          fragment="top_logprobs"),
        H("logprobs true, top_logprobs 20", json={"messages": USER, "logprobs": True, "top_logprobs": 20,
                                                 "max_tokens": 4, "seed": 1}, status=200),
        H("5 stop strings", json={"messages": USER, "stop": list("abcde")}, fragment="at most 4"),
        H("temperature NaN", body=b'{"messages": [{"role": "user", "content": "To"}], "temperature": NaN}',
          fragment="finite"),
        H("temperature 1e-45", json={"messages": USER, "temperature": 1e-45, "max_tokens": 4, "seed": 1},
          status=200),
        H("n 16, streamed", json={"messages": USER, "n": 16, "max_tokens": 4, "stream": True, "seed": 1},
          status=200),
    ]


def logprob_cases() -> list[HttpCase]:
    """`logprobs`, `echo` and token-id prompts on /v1/completions."""
    H = HttpCase
    return [
        H("logprobs 6", json={"prompt": "To", "logprobs": 6}, fragment="less than or equal to 5"),
        H("logprobs -1", json={"prompt": "To", "logprobs": -1}, fragment="greater than or equal to 0"),
        H('logprobs "2"', json={"prompt": "To", "logprobs": "2"}, fragment="valid integer"),
        H("logprobs true", json={"prompt": "To", "logprobs": True}, fragment="valid integer"),
        H("a token id past the vocabulary", json={"prompt": [5, 10**6]}, fragment="outside the vocabulary"),
        H("token id -1", json={"prompt": [5, -1]}, fragment="outside the vocabulary"),
        H("token ids nested three deep", json={"prompt": [[[5]]]}, fragment="prompt"),
        H("token ids longer than the context", json={"prompt": [5] * 17, "echo": True, "max_tokens": 0,
                                                     "logprobs": 1}, fragment="context"),
        H("max_tokens 0 without echo", json={"prompt": "To", "max_tokens": 0, "logprobs": 1}, fragment="echo"),
        H("echo, max_tokens 0, logprobs 5", json={"prompt": "To", "echo": True, "max_tokens": 0, "logprobs": 5},
          status=200),
        H("an empty token-id prompt, echo and logprobs", json={"prompt": [[]], "echo": True, "max_tokens": 2,
                                                               "logprobs": 2, "seed": 1}, status=200),
        H("logprobs 5, echo, n 16, streamed", json={"prompt": "To", "echo": True, "max_tokens": 4, "logprobs": 5,
                                                    "n": 16, "stream": True, "seed": 1}, status=200),
    ]


def completion_cases() -> list[HttpCase]:
    H = HttpCase
    stops = json.dumps([f"s{i}" for i in range(15_000)])
    return [
        H("15,000 stop strings", body=b'{"prompt": "To", "stop": ' + stops.encode() + b"}", fragment="at most 4"),
        H("5 stop strings", json={"prompt": "To", "stop": list("abcde")}, fragment="at most 4"),
        H("a 300-character stop string", json={"prompt": "To", "stop": ["x" * 300]}, fragment="at most 256"),
        H("temperature 1e-45", json={**NORMAL, "temperature": 1e-45}, status=200),
        H("repetition_penalty 1e-45", json={**NORMAL, "repetition_penalty": 1e-45}, status=200),
        H("top_p 1e-300", json={**NORMAL, "top_p": 1e-300}, status=200),
        H("all three at once", json={**NORMAL, "temperature": 1e-45, "repetition_penalty": 1e-45, "top_p": 1e-300},
          status=200),
        H("temperature NaN", body=b'{"prompt": "To", "temperature": NaN}', fragment="finite"),
        H("seed -1", json={"prompt": "To", "seed": -1}),
        H("seed over 64 bits", json={"prompt": "To", "seed": 2**70}),
        H("Host of another site (DNS rebinding)", json=NORMAL, headers={**JSON, "host": "attacker.example"},
          fragment="Host"),
        H("Host of another site, GET", headers={"host": "attacker.example:8000"}, path="/v1/model-card",
          method="GET", fragment="Host"),
        H("cross-origin text/plain POST", body=json.dumps(NORMAL).encode(), headers={"content-type": "text/plain"},
          status=415),
        H("form POST", body=b"prompt=To", headers={"content-type": "application/x-www-form-urlencoded"},
          status=415),
        H("no Content-Type", body=json.dumps(NORMAL).encode(), headers={}, status=415),
        H("JSON nested 200,000 deep", body=b"[" * 200_000),
        H("invalid UTF-8", body=b'{"prompt": "To \xc3"}', fragment="UTF-8"),
        H("a lone surrogate, echo, streamed", body=b'{"prompt": "To \\ud800", "echo": true, "stream": true}',
          fragment="lone surrogate"),
        H("a lone surrogate in a stop string", body=b'{"prompt": "To", "stop": ["\\udfff"]}',
          fragment="lone surrogate"),
        H("a body over 1 MB", body=b'{"prompt": "' + b"a" * (1 << 20) + b'"}', status=413),
        H("a 100 KB model name", json={"prompt": "To", "model": "m" * 100_000}, status=404, fragment="..."),
        H("max_tokens 10^30", body=b'{"prompt": "To", "max_tokens": 1000000000000000000000000000000}'),
        H("n 10^6", json={"prompt": "To", "n": 10**6}),
        H("a prompt outside the vocabulary", json={"prompt": "To \u20ac"}, fragment="vocabulary"),
        H("a prompt longer than the context", json={"prompt": "a" * 200}, fragment="context"),
        H("logprobs 10^9", json={"prompt": "To", "logprobs": 10**9}),
        H("unknown route", path="/v1/nothing", method="GET", status=404),
        H("client hangs up mid-upload", disconnect=True, status=0),
    ]


class LogWatch(logging.Handler):
    """Collects server log records that carry a traceback."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.tracebacks: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info or "Traceback" in record.getMessage():
            self.tracebacks.append(record.getMessage())


def send(url: str, case: HttpCase) -> tuple[int, Any]:
    import httpx

    if case.disconnect:
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port))) as s:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 1000\r\n\r\n{\"prompt\": ")
            time.sleep(0.2)
        return 0, None
    body = case.body if case.body is not None else (json.dumps(case.json).encode() if case.json else None)
    r = httpx.request(case.method, url + case.path, content=body, headers=case.headers, timeout=120)
    try:
        return r.status_code, r.json()
    except ValueError:
        return r.status_code, r.text


def run_http_case(case: HttpCase, urls: dict[str, str], watch: LogWatch) -> Result:
    import httpx

    url = urls[case.server]
    seen = len(watch.tracebacks)
    status, body = send(url, case)
    problems = []
    if status != case.status:
        problems.append(f"status {status}, expected {case.status}")
    if 400 <= case.status and not (isinstance(body, dict) and isinstance(body.get("error"), dict)
                                   and {"message", "type"} <= set(body["error"])):
        problems.append(f"not an OpenAI error body: {str(body)[:80]}")
    message = body["error"]["message"] if isinstance(body, dict) and isinstance(body.get("error"), dict) else ""
    if case.fragment and case.fragment not in message:
        problems.append(f"says {message[:80]!r}, not {case.fragment!r}")
    if len(message) > 400:
        problems.append(f"a {len(message)}-character message")
    start = time.perf_counter()
    after = httpx.post(url + "/v1/completions", json=NORMAL, headers={"host": "localhost"}, timeout=120)
    latency = time.perf_counter() - start
    if after.status_code != 200 or after.json()["usage"]["completion_tokens"] != NORMAL["max_tokens"]:
        problems.append(f"the normal request after it got {after.status_code}")
    time.sleep(0.05)  # let the server finish logging what it logs
    if len(watch.tracebacks) > seen:
        problems.append(f"the server logged a traceback: {watch.tracebacks[-1][:80]}")
    detail = "; ".join(problems) or (f"{status}: {message[:120]}" if message else f"{status}")
    return Result(case.id, "HTTP", not problems, detail, latency)


@contextlib.contextmanager
def running_servers(root: Path) -> Iterator[tuple[dict[str, str], LogWatch]]:
    """Two servers: "base" serves the trained run (no chat template), "chat" the chat run."""
    from quillgpt.checkpoint import load_run
    from quillgpt.serve import BackgroundServer, create_app

    watch = LogWatch()
    loggers = [logging.getLogger(name) for name in ("uvicorn", "uvicorn.error", "uvicorn.asgi", "")]
    for log in loggers:
        log.addHandler(watch)
    try:
        with BackgroundServer(create_app(load_run(root / "run"))) as base, \
                BackgroundServer(create_app(load_run(root / "chat_run"))) as chat:
            yield {"base": base, "chat": chat}, watch
    finally:
        for log in loggers:
            log.removeHandler(watch)


# --- the python tool's sandbox -----------------------------------------------------------------

SECRET = "QUILL_AUDIT_SECRET"  # in quill's environment while the tool runs; it must not reach the code


@dataclass
class ToolCase:
    """Hostile code a model could send the built-in `python` tool (quill chat/serve --tools python),
    run as the engine runs a call. It holds when the call ends within `seconds` in an error
    result saying `fragment`, the secret appears nowhere, and nothing under the audit's
    directory or in the home directory changed."""

    what: str
    code: str
    fragment: str
    seconds: float = 3.0  # the sandbox's own time limit is 5 s

    @property
    def id(self) -> str:
        return f"tool calls: python: {self.what}"


def tool_cases() -> list[ToolCase]:
    T = ToolCase
    pwned = str(Path.home() / "quill-audit-pwned.txt")
    return [
        T("an infinite loop", "while True: pass", "the time limit", seconds=15),
        T("sleeping past the limit", "import time\ntime.sleep(600)", "the time limit", seconds=15),
        T("a fork bomb", "import os\nwhile True:\n    os.fork()", "does not allow os.fork"),
        T("a shell fork bomb", "import subprocess\nsubprocess.run(['sh', '-c', ':(){ :|:& };:'])",
          "does not allow importing subprocess"),
        T("a 10 GB allocation", "x = bytearray(10 * 1024 ** 3)", "MemoryError"),
        T("a list of 10^10 items", "x = [0] * 10 ** 10", "MemoryError"),
        T("writing to the home directory", f"open({pwned!r}, 'w').write('x')", "does not allow writing"),
        T("renaming a file into the home directory", f"open('a', 'w').write('x')\nimport os\nos.rename('a', {pwned!r})",
          "does not allow os.rename"),
        T("reading the environment's secrets", f"import os\nprint(os.environ['{SECRET}'])", f"KeyError: '{SECRET}'"),
        T("reading quill's environment through /proc", "import os\nopen(f'/proc/{os.getppid()}/environ').read()",
          "does not allow reading"),
        T("a 64 MB file", "open('big', 'wb').write(b'x' * (64 << 20))", "File too large"),
        T("a socket", "import socket", "does not allow importing socket"),
        T("ctypes", "import ctypes", "does not allow importing ctypes"),
    ]


def run_tool_case(case: ToolCase, root: Path) -> Result:
    from quillgpt.tools import builtin_tools, run_builtin

    home = Path.home()
    before = tree_digest(root), sorted(os.listdir(home))
    start = time.monotonic()
    with env(**{SECRET: "hunter2-audit"}):
        result = run_builtin(builtin_tools("python"), "python", json.dumps({"code": case.code}))
    took = time.monotonic() - start
    after = tree_digest(root), sorted(os.listdir(home))
    changed = sorted(k for k in before[0].keys() | after[0].keys() if before[0].get(k) != after[0].get(k))
    changed += sorted(f"~/{n}" for n in set(before[1]) ^ set(after[1]))
    line = result.content.strip().splitlines()[-1] if result.content.strip() else ""
    if took > case.seconds:
        held, detail = False, f"took {took:.1f} s (at most {case.seconds:.0f})"
    elif result.ok or not result.content.startswith("error:"):
        held, detail = False, f"ran: {line!r}"
    elif "hunter2-audit" in result.content:
        held, detail = False, "the secret reached the code"
    elif changed:
        held, detail = False, f"changed {', '.join(changed[:3])}"
    elif case.fragment not in result.content:
        held, detail = False, f"says {line!r}, not {case.fragment!r}"
    else:
        held, detail = True, f"{line} ({took:.1f} s)"
    return Result(case.id, "tool calls", held, detail)


# --- the table ----------------------------------------------------------------------------------

def run_all(root: Path, log: Callable[[str], None] = lambda m: None) -> list[Result]:
    build_fixtures(root)
    results = []
    for case in cli_cases():
        results.append(run_cli_case(case, root))
        log(f"{'held ' if results[-1].held else 'BROKE'} {case.id}: {results[-1].detail}")
    for tcase in tool_cases():
        results.append(run_tool_case(tcase, root))
        log(f"{'held ' if results[-1].held else 'BROKE'} {tcase.id}: {results[-1].detail}")
    with running_servers(root) as (urls, watch):
        for hcase in http_cases():
            results.append(run_http_case(hcase, urls, watch))
            log(f"{'held ' if results[-1].held else 'BROKE'} {hcase.id}: {results[-1].detail}")
    return results


def table(results: list[Result]) -> str:
    entries: dict[str, list[Result]] = {}
    for r in results:
        entries.setdefault(r.entry, []).append(r)
    lines = ["| entry point | cases tried | held |", "| --- | ---: | ---: |"]
    for entry, rs in entries.items():
        name = entry if entry in ("HTTP", "tool calls") else "quill " + entry
        lines.append(f"| `{name}` | {len(rs)} | {sum(r.held for r in rs)} |")
    lines.append(f"| all | {len(results)} | {sum(r.held for r in results)} |")
    latencies = [r.latency_s for r in results if r.latency_s is not None]
    if latencies:
        lines.append("")
        median = sorted(latencies)[len(latencies) // 2]
        lines.append(f"The normal request after each hostile HTTP one: median {median:.2f} s, "
                     f"slowest {max(latencies):.2f} s (promise: under 2 s).")
    return "\n".join(lines)


def main() -> None:
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", action="store_true", help="also list every case and what it said")
    parser.add_argument("--keep", metavar="DIR", help="run in DIR (kept) instead of a temporary directory")
    args = parser.parse_args()
    from benchmarks.machine import cpu_name

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.keep or tmp)
        root.mkdir(parents=True, exist_ok=True)
        start = time.time()
        results = run_all(root, log=lambda m: print(m, file=sys.stderr, flush=True))
    print(f"quill reliability audit: {len(results)} cases, {time.time() - start:.0f} s, {cpu_name()}\n")
    print(table(results))
    if args.cases:
        print()
        for r in results:
            print(f"- {'held' if r.held else '**broke**'} — {r.id} — {r.detail}")
    broke = [r for r in results if not r.held]
    if broke:
        print(f"\n{len(broke)} broke:", *(f"  {r.id}: {r.detail}" for r in broke), sep="\n")
    sys.exit(1 if broke else 0)


if __name__ == "__main__":
    main()
