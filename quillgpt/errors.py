"""The one exception type for mistakes a user can make, and how a message echoes their input.

Anything raised as `QuillError` reaches the command line as a single line on stderr and exit
status 2 (see `quillgpt.cli`). Library users catch it like any other exception.

A message that quotes what the user (or a stranger's file) gave goes through `shown`: a short,
one-line repr that never expands a huge or deeply nested value (a YAML "billion laughs" document
is a few hundred bytes that stand for gigabytes of text).
"""

import reprlib

MAX_SHOWN = 80  # characters of a value quoted in an error message

_repr = reprlib.Repr()
_repr.maxlevel, _repr.maxdict, _repr.maxlist, _repr.maxtuple, _repr.maxset = 2, 4, 4, 4, 4
_repr.maxstring, _repr.maxother, _repr.maxlong = MAX_SHOWN, MAX_SHOWN, MAX_SHOWN


class QuillError(Exception):
    """A problem with the user's input: a bad path, config, file, prompt or checkpoint."""


def shown(value: object, limit: int = MAX_SHOWN) -> str:
    """`repr(value)` on one line and at most about `limit` characters, however big `value` is."""
    try:
        text = _repr.repr(value)
    except Exception:  # noqa: BLE001 - a value whose repr fails still gets a name
        text = f"<{type(value).__name__}>"
    text = text.replace("\n", "\\n").replace("\r", "\\r")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def lone_surrogate(value: object) -> str | None:
    """Where `value` (a string, or the lists and dicts of strings JSON gives) holds a lone
    surrogate ("\\ud800" in JSON: not valid Unicode, and UTF-8 cannot hold it): "U+D800 at
    position 3"; None when it holds none."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError as e:
                return f"U+{ord(v[e.start]):04X} at position {e.start}"
        elif isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, (list, tuple)):
            stack.extend(v)
    return None
