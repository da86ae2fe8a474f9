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
import sys
from pathlib import Path

import pexpect
import pytest

from quillgpt.chat import Message, replies
from quillgpt.checkpoint import load_run
from quillgpt.config import load_config
from quillgpt.generate import generate
from quillgpt.sft import sft_trainer
from quillgpt.terminal import preview
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


def spawn(*args: str) -> pexpect.spawn:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", TERM="dumb")
    child = pexpect.spawn(sys.executable, ["-m", "quillgpt", *args], env=env, encoding="utf-8",
                          timeout=120, dimensions=(24, 200))
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
