"""`quill chat` and `quill sample --interactive` at a real terminal (a pseudo-terminal driven by
pexpect): the arrow keys edit the line, Up recalls the line before, Ctrl-C during a reply stops
it and returns to the prompt with the conversation kept, Ctrl-C at the prompt clears the line,
Ctrl-D leaves with status 0, and the notice that the conversation outgrew the context is said
once, naming what was dropped.

The chat model is a base model whose chat tokens were just added (an SFT run of 0 steps): their
embedding rows are the mean of the others, so with tied embeddings their logit is the mean logit,
never the largest, and a greedy reply never ends by itself. With `--max-new-tokens 100000` every
reply is still running when the test presses Ctrl-C, whatever the machine's speed.
"""

from __future__ import annotations

import io
import json
import os
import random
import signal
import sys
from pathlib import Path

import pexpect
import pytest

from quillgpt.chat import Message, replies
from quillgpt.checkpoint import load_run
from quillgpt.config import load_config
from quillgpt.errors import QuillError
from quillgpt.generate import generate
from quillgpt.sft import sft_trainer
from quillgpt.terminal import preview, print_stream, prompt_loop
from quillgpt.train import Trainer

REPO = Path(__file__).resolve().parent.parent
VERSE = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n" * 40
TINY = {"n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 64, "batch_size": 4, "eval_iters": 1,
        "eval_interval": 20, "log_interval": 10, "warmup_iters": 1, "device": "cpu", "sample_tokens": 0}
LEFT, RIGHT, UP = "\x1b[D", "\x1b[C", "\x1b[A"
NEVER_ENDS = ["--temperature", "0", "--max-new-tokens", "100000"]
SHOWN = 33  # characters of a reply to see before pressing Ctrl-C


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path]:
    """A char model trained a little on verse, and the same model with the chat tokens added."""
    root = tmp_path_factory.mktemp("terminal")
    (root / "verse.txt").write_text(VERSE, encoding="utf-8")
    rng = random.Random(0)
    with open(root / "chats.jsonl", "w", encoding="utf-8") as f:
        for _ in range(20):
            w = "".join(rng.choice("abehimnorstu") for _ in range(4))
            f.write(json.dumps({"messages": [{"role": "user", "content": f"turn: {w}"},
                                             {"role": "assistant", "content": w[::-1]}]}) + "\n")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QUILL_CACHE", str(root / "cache"))
        Trainer(load_config(None, dict(TINY, data=str(root / "verse.txt"), out=str(root / "base"), max_iters=40,
                                       learning_rate=1e-2)), progress=False, log=lambda m: None).run()
        sft_trainer(load_config(None, dict(TINY, data=str(root / "chats.jsonl"), out=str(root / "chat"),
                                           init_from=str(root / "base"), max_iters=0)),
                    progress=False, log=lambda m: None).run()
    return root / "base", root / "chat"


def ignore_ctrl_c() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def spawn(*args: str) -> pexpect.spawn:
    """quill at a terminal. It starts with SIGINT ignored, as anything started in the background by
    a shell without job control does (CI's runner among them): Ctrl-C must work all the same."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", TERM="dumb")
    child = pexpect.spawn(sys.executable, ["-m", "quillgpt", *args], env=env, encoding="utf-8",
                          timeout=120, dimensions=(24, 200), preexec_fn=ignore_ctrl_c)
    child.logfile_read = io.StringIO()
    return child


def on_screen(text: str) -> str:
    """Text as a terminal shows it: the tty turns each newline into CR LF."""
    return text.replace("\n", "\r\n")


def greedy_reply(run_dir: Path, message: str) -> str:
    run = load_run(run_dir)
    return replies(run.model, run.tokenizer, [[Message("user", message)]], max_new_tokens=SHOWN + 8,
                   temperature=0)[0]


def stop_the_reply(child: pexpect.spawn, expected: str) -> None:
    """Wait until the reply's first characters are on the screen, then Ctrl-C."""
    child.expect_exact(on_screen(expected[:SHOWN]))
    child.sendintr()
    child.expect_exact("(reply stopped; the conversation keeps what was shown)")
    child.expect_exact("> ")


def test_quill_chat_at_a_terminal(runs):
    _, chat = runs
    abe, tom = greedy_reply(chat, "turn: abe"), greedy_reply(chat, "turn: tom")
    assert len(abe) > SHOWN and abe != tom
    child = spawn("chat", str(chat), *NEVER_ENDS)
    child.expect_exact("Ctrl-C stops a reply")
    child.expect_exact("> ")
    # typed "turn: be", two steps left, "a": the message is "turn: abe" (no escape codes)
    child.send("turn: be" + LEFT * 2 + "a\r")
    stop_the_reply(child, abe)
    # Up brings the message back. The stopped reply stayed in the conversation: with it the
    # history outgrows the context, and the notice names it as it is dropped
    child.send(UP + "\r")
    child.expect_exact(f"its oldest messages were dropped: user {preview('turn: abe')}, "
                       f"assistant {preview(abe[:SHOWN])}")
    stop_the_reply(child, abe)  # the same message, now alone in the context: the same reply
    child.send("turn: tom\r")  # outgrows the context again, quietly
    stop_the_reply(child, tom)
    child.send("half a line")
    child.expect_exact("half a line")  # readline has the line before Ctrl-C comes
    child.sendintr()  # Ctrl-C at the prompt: the line is dropped, a fresh prompt
    child.expect_exact("> ")
    child.sendeof()  # Ctrl-D leaves
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0, child.logfile_read.getvalue()[-2000:]
    screen = child.logfile_read.getvalue()
    assert screen.count("outgrew") == 1 and "Traceback" not in screen and "\\x1b" not in screen
    assert screen.count("(reply stopped") == 3  # "half a line" was never sent


def test_quill_sample_interactive_at_a_terminal(runs):
    base, _ = runs
    run = load_run(base)
    expected = "To be" + generate(run.model, run.tokenizer, "To be", SHOWN, temperature=0)
    child = spawn("sample", str(base), "--interactive", *NEVER_ENDS)  # a char model: no end token
    child.expect_exact("> ")
    child.send("To e" + LEFT + "b" + RIGHT + "\r")  # "To e", one step left, "b", back to the end: "To be"
    child.expect_exact(on_screen(expected))
    child.sendintr()
    child.expect_exact("(stopped)")
    child.expect_exact("> ")
    child.send("/exit\r")  # /exit leaves too
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0, child.logfile_read.getvalue()[-2000:]


# --- the pieces, in process -----------------------------------------------------------------------

def pieces_with_ctrl_c(closed: list[str]):
    """Yields a, b, c, d; Ctrl-C arrives while c is being produced."""
    try:
        yield "a"
        yield "b"
        os.kill(os.getpid(), signal.SIGINT)
        yield "c"
        yield "d"
    finally:
        closed.append("closed")


@pytest.fixture
def ctrl_c_raises():
    """SIGINT raising KeyboardInterrupt in this process, whatever the test runner inherited."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_print_stream_stops_after_the_piece_in_hand_and_closes_the_stream(ctrl_c_raises):
    out, closed = io.StringIO(), []
    printed = print_stream(pieces_with_ctrl_c(closed), head="> ", interruptible=True, out=out)
    assert (printed.text, printed.stopped, out.getvalue(), closed) == ("abc", True, "> abc\n", ["closed"])
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Ctrl-C is itself again
    out, closed = io.StringIO(), []
    with pytest.raises(KeyboardInterrupt):  # not interruptible (quill sample --stream): Ctrl-C ends it
        print_stream(pieces_with_ctrl_c(closed), out=out)
    assert out.getvalue() == "ab\n" and closed == ["closed"]


def test_print_stream_shows_nothing_when_the_first_piece_fails():
    def bad():
        raise QuillError("character 'é' is not in the vocabulary")
        yield "never"

    out, said = io.StringIO(), []
    with pytest.raises(QuillError):
        print_stream(bad(), head="prompt", before=lambda: said.append(1), out=out)
    assert out.getvalue() == "" and said == []


def test_the_prompt_loop_from_a_pipe(monkeypatch, capsys):
    """Commands, unknown commands, errors that do not end the loop, /exit."""
    lines = io.StringIO("hello\n\n/reset\n/nope\nbad\n/exit\nnever read\n")
    monkeypatch.setattr(sys, "stdin", lines)
    got, resets = [], []

    def respond(line: str) -> None:
        if line == "bad":
            raise QuillError("a bad line")
        got.append(line)

    prompt_loop(respond, commands={"/reset": resets.append}, usage="/reset, /exit")
    err = capsys.readouterr().err
    assert got == ["hello"] and resets == [""] and lines.readline() == "never read\n"
    assert "quill: error: unknown command /nope: /reset, /exit" in err and "quill: error: a bad line" in err
    monkeypatch.setattr(sys, "stdin", io.StringIO("/nope is a prompt here\n"))  # no commands: all is input
    prompt_loop(got.append)
    assert got[-1] == "/nope is a prompt here"
