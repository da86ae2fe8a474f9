"""Rewards for `quill rl`: how good a reply is, as a number, from the task it answers.

    reward = parse_reward("number")                  # exact | number | regex:PATTERN | python:FILE:FUNCTION
    reward.check(task_fields, where="line 3")        # before training: the task has what the reward needs
    reward.score(prompt_messages, "It is 95.", task_fields, where="line 3")   # 1.0

- `exact`: 1 when the reply, stripped, equals the task's `answer` (stripped), else 0.
- `number`: 1 when the last number in the reply equals `answer` numerically (`95`, `95.0` and
  `-3` are numbers; `1,000` is read as 1000), else 0.
- `regex:PATTERN`: 1 when the stripped reply matches PATTERN as a whole (`re.fullmatch`), else 0.
- `python:FILE:FUNCTION`: the user's own code, `FUNCTION(prompt_messages, reply, **fields)`, where
  `prompt_messages` is the task's messages (dicts with role and content) and `fields` every other
  field of the task's line (`answer` among them). It must return a finite number (a bool counts
  as 0 or 1). A reply passes (pass@1, pass@k) when its reward is at least 1.

Code runs only when the user names it on the command line: a run directory never brings its own
reward (see `quill rl --resume`). An error in it, a NaN or a non-number is a QuillError naming
the task's place, never a silent 0.
"""

from __future__ import annotations

import importlib.util
import math
import numbers
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import QuillError, shown

PASS = 1.0  # a reply whose reward reaches this passes (pass@1, pass@k)
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
BUILT_IN = ("exact", "number")


def last_number(text: str) -> float | None:
    """The last number written in `text` ("1,000" is 1000), or None."""
    found = NUMBER.findall(text)
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


def as_number(value: Any) -> float | None:
    """A task's `answer` as a number (a number, or a string holding one), or None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip().replace(",", ""))
        except ValueError:
            return None
    return None


@dataclass
class Reward:
    """A parsed reward spec (module docstring): `check` a task before training, `score` a reply."""

    spec: str
    kind: str  # exact | number | regex | python
    pattern: re.Pattern | None = None
    function: Callable[..., Any] | None = field(default=None, repr=False)

    @property
    def needs_answer(self) -> bool:
        return self.kind in BUILT_IN

    def check(self, fields: Mapping[str, Any], where: str) -> None:
        """QuillError (naming `where`) when the task lacks what this reward compares with."""
        if not self.needs_answer:
            return
        if "answer" not in fields:
            raise QuillError(f"{where}: no \"answer\" field, which the {self.kind} reward compares the reply with")
        answer = fields["answer"]
        if self.kind == "number" and as_number(answer) is None:
            raise QuillError(f"{where}: the answer {shown(answer)} is not a number (the number reward "
                             f"compares numbers; use --reward exact for text)")
        if self.kind == "exact" and (isinstance(answer, bool) or not isinstance(answer, (str, int, float))):
            raise QuillError(f"{where}: the answer must be a string or a number, got {shown(answer)}")

    def score(self, messages: Sequence[Mapping[str, str]], reply: str, fields: Mapping[str, Any],
              where: str) -> float:
        """The reward of `reply` to the task at `where` (a finite float), or QuillError."""
        if self.kind == "exact":
            return float(reply.strip() == str(fields["answer"]).strip())
        if self.kind == "number":
            got = last_number(reply)
            return float(got is not None and got == as_number(fields["answer"]))
        if self.kind == "regex":
            assert self.pattern is not None
            return float(self.pattern.fullmatch(reply.strip()) is not None)
        return self._call(messages, reply, fields, where)

    def _call(self, messages: Sequence[Mapping[str, str]], reply: str, fields: Mapping[str, Any],
              where: str) -> float:
        assert self.function is not None
        try:
            value = self.function([dict(m) for m in messages], reply, **fields)
        except Exception as e:  # noqa: BLE001 - the user's code: any error is reported, with its place
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise QuillError(f"reward {self.spec} raised {type(e).__name__}{': ' + shown(first, 200) if first else ''} "
                             f"on {where} (reply {shown(reply)})") from None
        if isinstance(value, bool):
            return float(value)
        if not isinstance(value, numbers.Real):
            raise QuillError(f"reward {self.spec} returned {shown(value)} on {where}: a reward must be a number")
        value = float(value)
        if not math.isfinite(value):
            raise QuillError(f"reward {self.spec} returned {value} on {where}: a reward must be a finite number")
        return value


def load_function(file: str, name: str, spec: str) -> Callable[..., Any]:
    """FUNCTION from the Python file FILE (the user's own code, run because they named it)."""
    path = Path(file)
    if not path.is_file():
        raise QuillError(f"--reward {spec}: no such file {shown(file)}")
    module_name = f"quill_reward_{abs(hash(str(path.resolve())))}"
    try:
        module_spec = importlib.util.spec_from_file_location(module_name, path)
        if module_spec is None or module_spec.loader is None:
            raise QuillError(f"--reward {spec}: {shown(file)} is not a Python file")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_name] = module  # dataclasses and pickling look their module up here
        module_spec.loader.exec_module(module)
    except QuillError:
        raise
    except Exception as e:  # noqa: BLE001 - the user's file: syntax errors, failing imports, ...
        sys.modules.pop(module_name, None)
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise QuillError(f"--reward {spec}: loading {shown(file)} failed: {type(e).__name__}"
                         f"{': ' + shown(first, 200) if first else ''}") from None
    function = getattr(module, name, None)
    if not callable(function):
        raise QuillError(f"--reward {spec}: {shown(file)} has no function {shown(name)}")
    return function


def parse_reward(spec: str) -> Reward:
    """A Reward from its spec: exact | number | regex:PATTERN | python:FILE:FUNCTION."""
    if not isinstance(spec, str) or not spec:
        raise QuillError("the reward must be exact, number, regex:PATTERN or python:FILE:FUNCTION")
    if spec in BUILT_IN:
        return Reward(spec, spec)
    kind, sep, rest = spec.partition(":")
    if kind == "regex" and sep:
        try:
            return Reward(spec, "regex", pattern=re.compile(rest))
        except re.error as e:
            raise QuillError(f"--reward {shown(spec)}: not a regular expression ({e})") from None
    if kind == "python" and sep:
        file, colon, name = rest.rpartition(":")
        if not colon or not file or not name.isidentifier():
            raise QuillError(f"--reward {shown(spec)}: write python:FILE:FUNCTION, e.g. python:rewards.py:score")
        return Reward(spec, "python", function=load_function(file, name, spec))
    raise QuillError(f"unknown reward {shown(spec)}: exact, number, regex:PATTERN or python:FILE:FUNCTION")
