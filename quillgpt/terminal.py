"""The terminal side of `quill chat` and `quill sample --interactive`: one prompt loop, one
streaming printer, and the chat prompt built from them.

    prompt_loop(respond)                        # read lines until Ctrl-D or /exit; respond to each
    print_stream(pieces, head=prompt)           # text pieces as they come, then a newline
    ChatTerminal(session).run()                 # quill chat: a `chat.ChatSession` at the prompt

At a terminal (stdin and stdout both a TTY) a line is read with readline: the arrow keys move
and edit, Up/Down and Ctrl-R walk the lines typed before. From a pipe a line is read as it comes
and the prompt goes to stderr, so stdout carries only the model's text.

Ctrl-C at the prompt clears the line. Ctrl-C while a reply streams (`interruptible=True`)
stops it after the piece being produced, so what the terminal shows is what was produced, and
the loop returns to the prompt; a second Ctrl-C stops at once. Ctrl-D or /exit leaves. A
QuillError from one input (a character outside the vocabulary, a prompt longer than the
context) is one line on stderr and the loop goes on.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import signal
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from .errors import QuillError

EXIT = "/exit"
# What arrow and function keys send when nothing edits the line (a terminal without readline)
ESCAPE_SEQUENCE = re.compile(r"\x1b(\[[0-?]*[ -/]*[@-~]|O.|.)?")


def eprint(*args: Any) -> None:
    print(*args, file=sys.stderr, flush=True)


# --- reading a line -----------------------------------------------------------------------------

def line_editing() -> bool:
    """Turn on readline's editing and history for `input()` when stdin and stdout are a
    terminal; False where they are not (a pipe, a file) or where there is no readline."""
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        return False
    try:
        import readline  # noqa: F401  (importing it is what gives input() line editing)
    except ImportError:  # Windows: the console edits lines itself
        return False
    return True


def read_line(prompt: str, editing: bool) -> str | None:
    """One line typed by the user (without its newline), or None at the end of input (Ctrl-D)."""
    if editing:
        try:
            return input(prompt)
        except EOFError:
            return None
    sys.stderr.write(prompt)
    sys.stderr.flush()
    line = sys.stdin.readline()
    if not line:
        return None
    line = line.rstrip("\n")
    if sys.stdin.isatty():  # keys a terminal sent that nothing interpreted
        line = ESCAPE_SEQUENCE.sub("", line)
    return line


# --- printing a stream ----------------------------------------------------------------------------

@dataclass
class Printed:
    """What `print_stream` showed, and whether Ctrl-C cut it short."""

    text: str
    stopped: bool = False


class _StopFlag:
    """While a reply streams, Ctrl-C sets this flag instead of raising; a second one raises."""

    def __init__(self) -> None:
        self.raised = False

    def __call__(self, signum: int, frame: Any) -> None:
        if self.raised:
            raise KeyboardInterrupt
        self.raised = True


@contextmanager
def _sigint(handler: Any) -> Iterator[None]:
    """SIGINT goes to `handler` inside the block (signals reach the main thread only: elsewhere
    nothing changes)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:  # (None: a handler not set from Python; Python's own is the one to restore)
        signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)


@contextmanager
def _deferred_interrupt() -> Iterator[_StopFlag]:
    flag = _StopFlag()
    with _sigint(flag):
        yield flag


def print_stream(pieces: Iterable[Any], head: str = "", before: Callable[[], None] | None = None,
                 interruptible: bool = False, out: Any = None, show: Callable[[Any], str] | None = None) -> Printed:
    """Print `head`, then each piece as it comes, then a newline; returns what was printed.

    The first piece is asked for before anything is printed, so input the model cannot take
    fails with nothing shown; `before()` runs then (a notice about the input). With
    `interruptible`, Ctrl-C stops the stream after the current piece (the generator is closed)
    and `stopped` is set; without it, Ctrl-C raises KeyboardInterrupt as usual. `show` turns a
    piece into the text printed (default: the piece itself)."""
    out = out or sys.stdout
    show = show or str
    it = iter(pieces)
    shown: list[str] = []
    with _deferred_interrupt() if interruptible else _no_flag() as flag:
        try:
            first = next(it, "")
            if before is not None:
                before()
            out.write(head)
            for piece in itertools.chain([first], it):
                text = show(piece)
                out.write(text)  # the piece in hand is shown (a reply keeps it), then the flag looked at
                out.flush()
                shown.append(text)
                if flag.raised:
                    break
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()  # a generator that was cut short finishes now (a reply joins its history)
            if shown:
                out.write("\n")
                out.flush()
    return Printed("".join(shown), stopped=flag.raised)


@contextmanager
def _no_flag() -> Iterator[_StopFlag]:
    yield _StopFlag()


# --- the prompt loop ------------------------------------------------------------------------------

def prompt_loop(respond: Callable[[str], Any], commands: Mapping[str, Callable[[str], Any]] | None = None,
                usage: str = "", prompt: str = "> ") -> None:
    """Read lines until Ctrl-D or /exit and pass each non-empty one to `respond`.

    `commands` maps "/name" to a function of the rest of the line; with commands, a line that
    starts with "/" and names none is answered with `usage`. Without them every line but /exit
    is input."""
    editing = line_editing()
    # at a terminal Ctrl-C is a key: it raises even where SIGINT came ignored (a start in the
    # background of a shell without job control, nohup)
    with _sigint(signal.default_int_handler) if editing else contextlib.nullcontext():
        _read_and_respond(respond, commands, usage, prompt, editing)


def _read_and_respond(respond: Callable[[str], Any], commands: Mapping[str, Callable[[str], Any]] | None,
                      usage: str, prompt: str, editing: bool) -> None:
    while True:
        try:
            line = read_line(prompt, editing)
        except KeyboardInterrupt:  # Ctrl-C at the prompt: a fresh line
            eprint()
            continue
        if line is None:
            eprint()
            return
        if not line.strip():
            continue
        name, _, rest = line.strip().partition(" ")
        if name == EXIT:
            return
        try:
            if commands is not None and name.startswith("/"):
                if name not in commands:
                    raise QuillError(f"unknown command {name}: {usage}")
                commands[name](rest.strip())
            else:
                respond(line)
        except QuillError as e:  # input the model cannot take should not end the session
            eprint(f"quill: error: {e}")
        except KeyboardInterrupt:  # a second Ctrl-C during a reply
            eprint("(stopped)")


# --- quill chat -------------------------------------------------------------------------------------

CHAT_USAGE = ("/system TEXT sets the system prompt (/system alone clears it), /reset starts over, "
              "/exit or Ctrl-D quits, Ctrl-C stops a reply")


def preview(text: str, limit: int = 32) -> str:
    """A short quoted view of a message for a notice."""
    return repr(text[:limit] + ("..." if len(text) > limit else ""))


DIM, RESET = "\x1b[2m", "\x1b[0m"
TOOL_LABELS = {"call": "tool call", "result": "tool result"}


def tool_line(part: Any, color: bool = False) -> str:
    """A tool call or result (a `chat.ReplyPart`: `kind`, `text`) as the terminal shows it: one
    marked line, dimmed at a colour terminal: `[tool call] calculator {"expression": "4821*37"}`."""
    line = f"[{TOOL_LABELS.get(part.kind, part.kind)}] {part.text.strip()}"
    return f"{DIM}{line}{RESET}" if color else line


def wants_color(out: Any) -> bool:
    isatty = getattr(out, "isatty", None)
    return bool(isatty and isatty()) and "NO_COLOR" not in os.environ


class ChatTerminal:
    """`quill chat`'s prompt: messages go to a `chat.ChatSession` (anything with `send(text)`
    yielding text pieces and tool parts, `dropped_messages`, `reset()`, `system` and
    `model.config.block_size`) and the replies stream back, tool calls and results on marked
    lines of their own. When the conversation first outgrows the model's context, one notice
    says which messages left it; later turns drop their oldest quietly (after /reset the notice
    is due again)."""

    def __init__(self, session: Any, out: Any = None):
        self.session = session
        self.out = out
        self.told_overflow = False
        self.line_start = True

    def show(self, piece: Any) -> str:
        """A reply's piece as printed: text as it is, a tool part on a marked line of its own."""
        if isinstance(piece, str):
            self.line_start = piece.endswith("\n") if piece else self.line_start
            return piece
        text = ("" if self.line_start else "\n") + tool_line(piece, wants_color(self.out or sys.stdout)) + "\n"
        self.line_start = True
        return text

    def reply(self, text: str, interruptible: bool = True) -> Printed:
        self.line_start = True
        printed = print_stream(self.session.send(text), before=self._say_dropped,
                               interruptible=interruptible, out=self.out, show=self.show)
        if printed.stopped:
            eprint("(reply stopped; the conversation keeps what was shown)")
        return printed

    def _say_dropped(self) -> None:
        dropped = self.session.dropped_messages
        if not dropped or self.told_overflow:
            return
        self.told_overflow = True
        listing = ", ".join(f"{m.role} {preview(m.content or '')}" for m in dropped)
        eprint(f"(the conversation outgrew the model's context of {self.session.model.config.block_size} "
               f"tokens, so its oldest messages were dropped: {listing}; from now on the oldest turns "
               f"leave without a notice)")

    def reset(self, rest: str = "") -> None:
        self.session.reset()
        self.told_overflow = False
        eprint("(conversation cleared)")

    def set_system(self, rest: str) -> None:
        self.session.system = rest or None
        eprint(f"(system prompt {'set' if self.session.system else 'cleared'})")

    def run(self) -> None:
        prompt_loop(self.reply, commands={"/reset": self.reset, "/system": self.set_system}, usage=CHAT_USAGE)
