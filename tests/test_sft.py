"""quill sft: conversations through the ordinary training loop. Masked tokens get no gradient,
the vocabulary grows with the chat tokens, the run is a normal run (metrics, checkpoints, exact
resume, bf16, DDP), bad conversation files are one line and exit 2 (or skipped and counted),
and `quill chat` talks to the result."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from quillgpt import checkpoint as ckpt
from quillgpt.chat import CHAT_TOKENS, Message, add_chat_tokens, has_chat_template, render, replies
from quillgpt.cli import main
from quillgpt.config import load_config
from quillgpt.conversations import ConversationData, read_conversations
from quillgpt.errors import QuillError
from quillgpt.resume import resume_config
from quillgpt.sft import sft_trainer
from quillgpt.train import Trainer

REPO = Path(__file__).resolve().parent.parent
LETTERS = "abdefhilmnorstu"  # all in the verse of conftest's small_text
TINY = {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 48, "batch_size": 8, "learning_rate": 3e-3,
        "min_lr": 3e-4, "warmup_iters": 2, "eval_interval": 4, "eval_iters": 2, "log_interval": 2,
        "sample_tokens": 0, "device": "cpu", "seed": 7}


def quiet(msg: str) -> None:
    pass


def conversation(rng: random.Random) -> dict:
    word = "".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 6)))
    messages = [{"role": "user", "content": f"flip: {word}"}, {"role": "assistant", "content": word[::-1]}]
    if rng.random() < 0.3:
        messages.insert(0, {"role": "system", "content": "be brief"})
    return {"messages": messages}


def write_chats(path: Path, n: int = 60, seed: int = 0) -> Path:
    rng = random.Random(seed)
    path.write_text("".join(json.dumps(conversation(rng)) + "\n" for _ in range(n)), encoding="utf-8")
    return path


@pytest.fixture
def chats(tmp_path) -> Path:
    return write_chats(tmp_path / "chats.jsonl")


@pytest.fixture
def base_run(small_text, tmp_path) -> Path:
    """A few steps of a tiny char GPT on verse: the model SFT starts from."""
    values = dict(TINY, data=str(small_text), out=str(tmp_path / "base"), max_iters=4, dropout=0.1)
    Trainer(load_config(None, values), progress=False, log=quiet).run()
    return tmp_path / "base"


def sft_cfg(chats: Path, out: Path, **extra):
    values = dict(TINY, data=str(chats), out=str(out), max_iters=8)
    values.update(extra)
    return load_config(None, values)


# --- the loss mask -------------------------------------------------------------------------------

def test_masked_tokens_get_no_gradient(chats, base_run, tmp_path):
    """The gradient of the loss with respect to the logits is exactly zero at every position
    whose target is not the assistant's (system, user, role tokens, padding), and non-zero at
    every position whose target is."""
    trainer = sft_trainer(sft_cfg(chats, tmp_path / "chat", init_from=str(base_run)), progress=False, log=quiet)
    x, y = trainer.batches.next()
    assert (y == -1).any() and (y >= 0).any()
    model = trainer.model
    seen = {}

    def keep(module, inputs, output):
        output.retain_grad()
        seen["logits"] = output

    handle = model.lm_head.register_forward_hook(keep)
    _, loss = model(x, y)
    loss.backward()
    handle.remove()
    grad = seen["logits"].grad  # (B, T, vocab)
    per_position = grad.abs().sum(-1)
    assert torch.all(per_position[y == -1] == 0)
    assert torch.all(per_position[y >= 0] > 0)
    # and the scored targets are exactly the assistant's content and <|end|>
    tok = trainer.tokenizer
    for row_x, row_y in zip(x.tolist(), y.tolist()):
        n = max(i for i, t in enumerate(row_y) if t >= 0) + 1  # the rest is padding
        text = tok.decode(row_x[:n] + row_y[n - 1:n])
        learnt = tok.decode([t for t in row_y if t >= 0])
        user = text.split("<|user|>flip: ")[1].split("<|end|>")[0]
        assert learnt == user[::-1] + "<|end|>"


def test_batches_pad_whole_conversations_and_split_by_conversation(chats, base_run):
    convs = read_conversations(chats).conversations
    tok = add_chat_tokens(ckpt.load_run(base_run).tokenizer)
    data = ConversationData.build(tok, convs, block_size=48, val_fraction=0.2)
    assert len(data.train) + len(data.val) == 60 and len(data.val) == 12
    val_texts = {json.dumps([m.__dict__ for m in c]) for c in data.val_conversations}
    train_texts = {json.dumps([m.__dict__ for m in c]) for c in convs} - val_texts
    assert len(val_texts) == 12 and len(train_texts) >= 40
    x, y = data.batches("train", 5, 0, torch.device("cpu")).next()
    # each row is one whole conversation: it starts with a role token, its last target is <|end|>,
    # and after that only padding (targets -1); the batch is as long as its longest conversation
    ends = []
    for row in range(5):
        assert x[row, 0].item() in {tok.special_tokens[t] for t in CHAT_TOKENS}
        scored = (y[row] >= 0).nonzero().flatten()
        assert y[row, scored[-1]].item() == tok.special_tokens["<|end|>"]
        ends.append(scored[-1].item())
    assert max(ends) == x.shape[1] - 1
    # 2 ranks draw one batch of 10 between them: rank r gets the r-th half of the 1-rank draw
    one = data.batches("train", 10, 3, torch.device("cpu")).next()
    for rank in range(2):
        xr, yr = data.batches("train", 5, 3, torch.device("cpu"), rank, 2).next()
        T = xr.shape[1]
        torch.testing.assert_close(xr, one[0][rank * 5:(rank + 1) * 5, :T])
        assert torch.all(one[1][rank * 5:(rank + 1) * 5, T:] == -1)


def test_too_long_conversations_are_truncated_or_dropped_and_counted(chats, base_run):
    convs = read_conversations(chats).conversations
    tok = add_chat_tokens(ckpt.load_run(base_run).tokenizer)
    lengths = [len(render(tok, c).ids) for c in convs]
    block = sorted(lengths)[len(lengths) // 2]  # half of them are too long
    too_long = sum(n > block + 1 for n in lengths)
    truncated = ConversationData.build(tok, convs, block_size=block)
    dropped = ConversationData.build(tok, convs, block_size=block, too_long="drop")
    assert truncated.stats.truncated + truncated.stats.dropped == too_long > 0
    assert dropped.stats.dropped == too_long and dropped.stats.truncated == 0
    assert "truncated" in truncated.describe() and "dropped as too long" in dropped.describe()
    assert all(len(r) <= block for r in truncated.train.inputs)


# --- a run like any other ----------------------------------------------------------------------

def test_sft_from_a_run_grows_the_vocabulary_and_is_a_normal_run(chats, base_run, tmp_path, capsys):
    base = ckpt.load_run(base_run)
    out = tmp_path / "chat"
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]
    code = main(["sft", "--init-from", str(base_run), "--data", str(chats), "--out", str(out),
                 "--max-iters", "8", "--no-progress", "--exact-match-every", "4", *flags])
    err = capsys.readouterr().err
    assert code == 0, err
    assert f"vocabulary grows from {base.tokenizer.vocab_size} to {base.tokenizer.vocab_size + 4}" in err
    assert "54 train / 6 val conversations" in err and "a held-out conversation, greedy" in err
    run = ckpt.load_run(out)
    assert has_chat_template(run.tokenizer) and run.config.model.vocab_size == base.tokenizer.vocab_size + 4
    assert run.config.train.init_from == str(base_run)
    header = (out / "metrics.csv").read_text().splitlines()[0]
    assert "val_exact_match" in header and "val_loss" in header
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["step-00000004", "step-00000008"]
    # the ordinary tokens kept their weights' start: what was learnt before is still there
    reply = replies(run.model, run.tokenizer, [[Message("user", "flip: abd")]], max_new_tokens=8,
                    temperature=0)[0]
    assert isinstance(reply, str) and not any(t in reply for t in CHAT_TOKENS)


def test_new_embedding_rows_start_at_the_mean(chats, base_run, tmp_path):
    base = ckpt.load_run(base_run)
    trainer = sft_trainer(sft_cfg(chats, tmp_path / "chat", init_from=str(base_run)), progress=False, log=quiet)
    wte = trainer.model.transformer.wte.weight.detach()
    old = base.model.transformer.wte.weight.detach()
    n = old.size(0)
    torch.testing.assert_close(wte[:n], old)
    torch.testing.assert_close(wte[n:], old.mean(0, keepdim=True).expand(4, -1))
    assert trainer.model.lm_head.weight is trainer.model.transformer.wte.weight  # still tied


def test_untied_head_grows_too(chats, tmp_path, small_text):
    values = dict(TINY, data=str(small_text), out=str(tmp_path / "base"), max_iters=2, tie_embeddings=False)
    Trainer(load_config(None, values), progress=False, log=quiet).run()
    base = ckpt.load_run(tmp_path / "base")
    trainer = sft_trainer(sft_cfg(chats, tmp_path / "chat", init_from=str(tmp_path / "base")),
                          progress=False, log=quiet)
    head, old = trainer.model.lm_head.weight.detach(), base.model.lm_head.weight.detach()
    torch.testing.assert_close(head[old.size(0):], old.mean(0, keepdim=True).expand(4, -1))
    trainer.run()


def test_sft_resume_is_bitwise_identical(chats, base_run, tmp_path):
    torch.set_num_threads(1)
    full = sft_trainer(sft_cfg(chats, tmp_path / "full", init_from=str(base_run), max_iters=10,
                               lr_decay_iters=10, dropout=0.1), progress=False, log=quiet).run()
    part = tmp_path / "part"
    sft_trainer(sft_cfg(chats, part, init_from=str(base_run), max_iters=5, lr_decay_iters=10, dropout=0.1,
                        checkpoint_interval=5), progress=False, log=quiet).run()
    cfg = resume_config(part, overrides={"max_iters": 10}, allow_config_change=True)
    resumed = sft_trainer(cfg, progress=False, log=quiet, resume=part).run()
    assert resumed.losses == full.losses
    a, b = ckpt.read_safetensors(part / ckpt.MODEL_FILE), ckpt.read_safetensors(tmp_path / "full" / ckpt.MODEL_FILE)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sft_resume_takes_data_where_the_conversations_are_now(chats, base_run, tmp_path, capsys):
    """`quill sft --resume RUN --data FILE`: the run's conversations moved; FILE is read (and
    checked against the checkpoint), never the path config.yaml names when it is gone."""
    run = tmp_path / "chat"
    sft_trainer(sft_cfg(chats, run, init_from=str(base_run), max_iters=4), progress=False, log=quiet).run()
    moved = chats.rename(tmp_path / "moved.jsonl")
    more = ["sft", "--resume", str(run), "--max-iters", "6", "--allow-config-change", "--no-progress"]
    assert main(more) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "never downloads: pass --data" in err, err
    other = write_chats(tmp_path / "other.jsonl", seed=1)
    assert main([*more, "--data", str(other)]) == 2
    assert "training data differs" in capsys.readouterr().err
    assert main([*more, "--data", str(moved)]) == 0, capsys.readouterr().err
    assert ckpt.load_train_state(run).state["config"]["train"]["data"] == str(moved)
    assert len(ckpt.load_train_state(run).state["losses"]) == 6


def test_sft_from_scratch_bf16_and_time_budget(chats, tmp_path, capsys):
    """Without --init-from: a fresh model and a tokenizer built from the conversations; bf16
    autocast and a time budget work as in quill train."""
    out = tmp_path / "fresh"
    code = main(["sft", "--data", str(chats), "--out", str(out), "--n-layer", "1", "--n-head", "2",
                 "--n-embd", "32", "--block-size", "48", "--batch-size", "8", "--max-iters", "6",
                 "--eval-interval", "3", "--eval-iters", "1", "--dtype", "bfloat16", "--time-budget", "60s",
                 "--no-progress"])
    err = capsys.readouterr().err
    assert code == 0, err
    run = ckpt.load_run(out)
    assert run.tokenizer.kind == "char" and has_chat_template(run.tokenizer)
    assert run.config.train.dtype == "bfloat16"
    losses = ckpt.load_train_state(out).state["losses"]
    assert all(l == l for l in losses)  # noqa: E741 - finite, no NaN


# --- bad input -------------------------------------------------------------------------------------

GOOD = json.dumps({"messages": [{"role": "user", "content": "flip: ab"}, {"role": "assistant", "content": "ba"}]})


@pytest.mark.parametrize("bad, fragment", [
    ('{"messages": [', "line 3: not valid JSON"),
    (json.dumps({"messages": [{"role": "bot", "content": "x"}]}), "line 3: message 0: unknown role 'bot'"),
    (json.dumps({"messages": [{"role": "user", "content": ["x"]}]}),
     "line 3: message 0 (user): content must be a string"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}]}), "line 3: no assistant turn"),
    (json.dumps({"messages": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]}),
     "line 3: message 0: roles out of order"),
    (json.dumps({"text": "x"}), "line 3: no \"messages\" field"),
])
def test_bad_conversations_are_one_line_exit_2_or_skipped(tmp_path, capsys, base_run, bad, fragment):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join([GOOD, GOOD, bad] + [GOOD] * 5) + "\n", encoding="utf-8")
    out = tmp_path / "chat"
    args = ["sft", "--init-from", str(base_run), "--data", str(path), "--out", str(out), "--max-iters", "1",
            "--batch-size", "2", "--eval-iters", "1", "--block-size", "32", "--no-progress"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and fragment in err and "--sft-skip-invalid" in err, err
    assert not out.exists()  # nothing written
    assert main(args + ["--sft-skip-invalid"]) == 0
    err = capsys.readouterr().err
    assert "skipped 1 invalid conversation: " + fragment in err
    assert "6 train / 1 val conversations" in err and "1 skipped as invalid" in err


def test_other_bad_inputs(tmp_path, capsys, base_run):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    for data, fragment in ((tmp_path / "none.jsonl", "not found"), (empty, "no valid conversation"),
                           (tmp_path, "is a directory"), (base_run / "config.yaml", ".jsonl file")):
        assert main(["sft", "--init-from", str(base_run), "--data", str(data), "--out", str(tmp_path / "o")]) == 2
        assert fragment in capsys.readouterr().err
    one = tmp_path / "one.jsonl"
    one.write_text(GOOD + "\n")
    assert main(["sft", "--init-from", str(base_run), "--data", str(one), "--out", str(tmp_path / "o")]) == 2
    assert "at least 2" in capsys.readouterr().err
    bad_utf8 = tmp_path / "bin.jsonl"
    bad_utf8.write_bytes(GOOD.encode() + b"\n\xff\xfe\n")
    assert main(["sft", "--init-from", str(base_run), "--data", str(bad_utf8), "--out", str(tmp_path / "o")]) == 2
    assert "line 2: not UTF-8" in capsys.readouterr().err


@pytest.mark.parametrize("too_long", ["truncate", "drop"])
def test_held_out_conversations_longer_than_the_context_get_the_training_sets_rule(tmp_path, capsys, base_run,
                                                                                    too_long):
    """A held-out conversation longer than the context is truncated or dropped as the training
    ones are: the exact-match evaluation and the closing greedy reply use only those that fit
    whole, and a held-out set where none fits whole still ends in a saved run."""
    long = [json.dumps({"messages": [{"role": "user", "content": "to be or not " * 4},
                                     {"role": "assistant", "content": "be"}]}) for _ in range(12)]
    short = json.dumps({"messages": [{"role": "user", "content": "flip: abd"},
                                     {"role": "assistant", "content": "dba"}]})
    base = ["sft", "--init-from", str(base_run), "--max-iters", "4", "--batch-size", "2", "--eval-iters", "1",
            "--eval-interval", "2", "--block-size", "32", "--no-progress", "--exact-match-every", "2",
            "--sft-too-long", too_long, "--val-fraction", "0.5"]
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text("\n".join(long + [short] * 12) + "\n", encoding="utf-8")
    assert main([*base, "--data", str(mixed), "--out", str(tmp_path / "mixed")]) == 0
    err = capsys.readouterr().err
    assert "run saved" in err or ckpt.list_checkpoints(tmp_path / "mixed"), err
    assert "a held-out conversation, greedy: 'flip: abd' ->" in err and "(reference 'dba')" in err
    assert "val_exact_match" in (tmp_path / "mixed" / "metrics.csv").read_text()
    if too_long == "truncate":  # every held-out one is cut: no reply to show, the run still saved
        only_long = tmp_path / "long.jsonl"
        cut = json.dumps({"messages": [{"role": "user", "content": "abd"},
                                       {"role": "assistant", "content": "to be or not " * 4}]})
        only_long.write_text("\n".join([cut] * 8) + "\n", encoding="utf-8")
        assert main([*base, "--data", str(only_long), "--out", str(tmp_path / "long")]) == 0, capsys.readouterr().err
        err = capsys.readouterr().err
        assert "held-out conversation, greedy" not in err and ckpt.list_checkpoints(tmp_path / "long")


def test_the_closing_reply_quotes_messages_shortened(tmp_path, capsys):
    """The closing "held-out conversation" line quotes a long message shortened, never whole (a
    huge one is never there: it does not fit the context whole)."""
    long = json.dumps({"messages": [{"role": "user", "content": "abd " * 50},
                                    {"role": "assistant", "content": "dba " * 50}]})
    path = tmp_path / "long.jsonl"
    path.write_text("\n".join([long] * 4) + "\n", encoding="utf-8")
    assert main(["sft", "--data", str(path), "--out", str(tmp_path / "o"), "--n-layer", "1", "--n-head", "2",
                 "--n-embd", "16", "--max-iters", "1", "--batch-size", "2", "--eval-iters", "1",
                 "--block-size", "450", "--device", "cpu", "--no-progress", "--no-save"]) == 0
    line = next(x for x in capsys.readouterr().err.splitlines() if "held-out conversation" in x)
    assert "abd abd" in line and "abd " * 50 not in line and "dba " * 50 not in line and len(line) < 400, line


def test_parquet_messages_column(tmp_path, chats, base_run):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = [json.loads(line)["messages"] for line in chats.read_text().splitlines()]
    path = tmp_path / "chats.parquet"
    pq.write_table(pa.table({"messages": rows, "id": list(range(len(rows)))}), path)
    from_parquet = read_conversations(path).conversations
    assert from_parquet == read_conversations(chats).conversations
    pq.write_table(pa.table({"text": ["x"]}), tmp_path / "text.parquet")
    with pytest.raises(QuillError, match="text.parquet has no messages column"):
        read_conversations(tmp_path / "text.parquet")
    rows[3] = [{"role": "user", "content": "only a question"}]
    pq.write_table(pa.table({"messages": rows}), path)
    with pytest.raises(QuillError, match="row 3: no assistant turn"):
        read_conversations(path)
    assert len(read_conversations(path, skip_invalid=True).skipped) == 1


# --- quill chat -----------------------------------------------------------------------------------

@pytest.fixture
def chat_run(chats, base_run, tmp_path) -> Path:
    sft_trainer(sft_cfg(chats, tmp_path / "chat", init_from=str(base_run), max_iters=6), progress=False,
                log=quiet).run()
    return tmp_path / "chat"


def quill(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "quillgpt", *args], input=stdin, capture_output=True,
                          text=True, timeout=300, env=env)


def test_quill_chat_message_is_one_greedy_reply(chat_run, capsys):
    run = ckpt.load_run(chat_run)
    expected = replies(run.model, run.tokenizer, [[Message("system", "be brief"), Message("user", "flip: abd")]],
                       max_new_tokens=12, temperature=0)[0]
    assert main(["chat", str(chat_run), "--message", "flip: abd", "--system", "be brief",
                 "--temperature", "0", "--max-new-tokens", "12"]) == 0
    assert capsys.readouterr().out == expected + "\n"


def test_quill_chat_interactive_through_stdin(chat_run):
    """The REPL in a subprocess: messages, /system, /reset, a bad message that does not end
    the session, an unknown command, /exit."""
    run = ckpt.load_run(chat_run)
    settings = dict(max_new_tokens=10, temperature=0)
    first = replies(run.model, run.tokenizer, [[Message("user", "flip: abd")]], **settings)[0]
    second = replies(run.model, run.tokenizer, [[Message("user", "flip: abd"), Message("assistant", first),
                                                 Message("user", "flip: tom")]], **settings)[0]
    with_system = replies(run.model, run.tokenizer, [[Message("system", "be brief"),
                                                      Message("user", "flip: tom")]], **settings)[0]
    stdin = ("flip: abd\nflip: tom\n/reset\n/system be brief\nflip: tom\nflip: \u20ac\n/what\n"
             "/exit\nignored\n")
    proc = quill("chat", str(chat_run), "--temperature", "0", "--max-new-tokens", "10", stdin=stdin)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [first, second, with_system]
    err = proc.stderr
    assert "(conversation cleared)" in err and "(system prompt set)" in err
    assert "quill: error: character '€'" in err and "unknown command /what" in err
    assert "Traceback" not in err


def test_quill_chat_overflow_says_so_and_bad_runs_are_one_line(chat_run, base_run, tmp_path):
    stdin = "".join(f"flip: {w}\n" for w in ["abdef", "hilmn", "ortsu", "abdef", "hilmn", "ortsu"])
    proc = quill("chat", str(chat_run), "--temperature", "0", "--max-new-tokens", "8", stdin=stdin)
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.splitlines()) == 6
    # said once, naming what left the context
    assert proc.stderr.count("outgrew") == 1, proc.stderr
    assert "oldest messages were dropped: user 'flip: abdef', assistant " in proc.stderr
    proc = quill("chat", str(base_run), "--message", "hi")
    assert proc.returncode == 2 and "no chat template" in proc.stderr and len(proc.stderr.splitlines()) == 1
    proc = quill("chat", str(chat_run), "--message", "x", "--temperature", "-1")
    assert proc.returncode == 2 and "temperature" in proc.stderr


# --- DDP ------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_sft_ddp_two_processes_equal_one_process_with_accumulation(chats, base_run, tmp_path, fsdp):
    ref = sft_trainer(sft_cfg(chats, tmp_path / "ref", init_from=str(base_run), gradient_accumulation_steps=2),
                      progress=False, log=quiet).run()
    flags = []
    for k, v in dict(TINY, data=str(chats), out=str(tmp_path / "ddp"), max_iters=8, init_from=str(base_run)).items():
        flags += ["--" + k.replace("_", "-"), str(v)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "quillgpt", "sft", "--no-progress", *flags, *(["--fsdp"] if fsdp else [])]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"2 processes ({'FSDP' if fsdp else 'DDP'})" in proc.stderr and proc.stderr.count("done:") == 1
    assert proc.stderr.count("vocabulary grows") == 1  # rank 0 speaks
    state = ckpt.load_train_state(tmp_path / "ddp")
    tol = 1e-4 if fsdp else 1e-5
    torch.testing.assert_close(torch.tensor(state.state["losses"]), torch.tensor(ref.losses), rtol=tol, atol=tol)
    a = ckpt.read_safetensors(tmp_path / "ddp" / ckpt.MODEL_FILE)
    b = ckpt.read_safetensors(tmp_path / "ref" / ckpt.MODEL_FILE)
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


def test_sft_keeps_every_value_typed_and_uses_its_own_defaults(chats, base_run, small_text, tmp_path, capsys):
    """Left out, fine-tuning's learning rate (3e-5, min_lr 3e-6) and no end sample; typed, even
    equal to quill train's defaults (1e-3, 200), the user's values."""
    short = ["--init-from", str(base_run), "--data", str(chats), "--max-iters", "1", "--batch-size", "2",
             "--eval-iters", "1", "--no-progress", "--device", "cpu"]
    assert main(["sft", *short, "--out", str(tmp_path / "a")]) == 0
    assert f"fine-tuning from {base_run}: learning rate 3e-05" in capsys.readouterr().err
    a = ckpt.read_run_config(tmp_path / "a").train
    assert (a.learning_rate, a.min_lr, a.sample_tokens) == (3e-5, 3e-6, 0)
    assert main(["sft", *short, "--out", str(tmp_path / "b"), "--learning-rate", "1e-3", "--sample-tokens", "200"]) == 0
    assert f"fine-tuning from {base_run}: learning rate 0.001" in capsys.readouterr().err
    b = ckpt.read_run_config(tmp_path / "b").train
    assert (b.learning_rate, b.min_lr, b.sample_tokens) == (1e-3, 1e-4, 200)
    assert main(["train", "--init-from", str(base_run), "--data", str(small_text), "--lr", "1e-3",
                 "--max-iters", "1", "--eval-iters", "1", "--batch-size", "2", "--no-progress", "--no-save",
                 "--sample-tokens", "0", "--n-layer", "3", "--n-head", "2", "--tokenizer", "bpe:300"]) == 0
    err = capsys.readouterr().err
    assert f"fine-tuning from {base_run}: learning rate 0.001" in err
    # what fine-tuning cannot honour (the source's shape and tokenizer) is said, in one line
    [warning] = [line for line in err.splitlines() if line.startswith("warning: fine-tuning keeps")]
    assert "n_layer 3 (the source's: 2)" in warning and "tokenizer bpe:300" in warning
    assert "n_head" not in warning  # given, and the source's anyway


def test_a_conversation_the_source_tokenizer_cannot_encode_names_its_line(tmp_path, capsys, base_run):
    path = tmp_path / "chats.jsonl"
    zed = json.dumps({"messages": [{"role": "user", "content": "flip: zed"}, {"role": "assistant", "content": "dez"}]})
    path.write_text("\n".join([GOOD] * 4 + [zed] + [GOOD] * 4) + "\n", encoding="utf-8")
    args = ["sft", "--init-from", str(base_run), "--data", str(path), "--out", str(tmp_path / "o"),
            "--max-iters", "1", "--batch-size", "2", "--eval-iters", "1", "--no-progress"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "line 5: character 'z'" in err and len(err.strip().splitlines()) == 1
    assert main(args + ["--sft-skip-invalid"]) == 0
    assert "skipped 1 invalid conversation: line 5: character 'z'" in capsys.readouterr().err


def test_a_huge_message_costs_what_the_context_sees(base_run, tmp_path):
    """A message far longer than any context is cut before it is rendered (bounded memory: a
    150 MB one was a MemoryError), and the rows are exactly those of the whole message."""
    import tracemalloc

    from quillgpt.conversations import ConversationData, capped

    tok = add_chat_tokens(ckpt.load_run(base_run).tokenizer)
    huge = [Message("user", "flip: abd"), Message("assistant", "to be or not " * 1_000_000)]  # 13 MB
    short = [Message("user", "flip: abd"), Message("assistant", "dba")]
    tracemalloc.start()
    data = ConversationData.build(tok, [huge, short, huge, short], block_size=48, val_fraction=0.5)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 60_000_000, peak  # the whole message would render to 13 million ids and flags
    whole = render(tok, huge)
    assert data.stats.truncated == 2
    rows = [x.tolist() for x in data.train.inputs + data.val.inputs if len(x) == 48]
    assert rows == [whole.ids[:48]] * 2
    assert capped(short, 48) is short and len(capped(huge, 48)[1].content) < 200_000
