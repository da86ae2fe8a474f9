"""What the scripts in benchmarks/ share with the `quill` command line: a mistake of the user's
(a missing file, a bad value) is one line on stderr and exit status 2, never a traceback; and
where a script needs a text, tiny-shakespeare from quill's cache is the default."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

SHAKESPEARE = "shakespeare"  # the --words/--data value meaning tiny-shakespeare from $QUILL_CACHE


def text_file(value: str | Path) -> Path:
    """A text file the user named, or tiny-shakespeare (downloaded once into $QUILL_CACHE, sha256
    checked) for "shakespeare"."""
    if str(value) == SHAKESPEARE:
        from quillgpt.download import shakespeare_path

        return shakespeare_path()
    path = Path(value)
    if not path.is_file():
        what = "not a file" if path.exists() else "no such file"
        raise FileNotFoundError(f"{path}: {what} (or pass {SHAKESPEARE} for tiny-shakespeare)")
    return path


def run_main(main: Callable[[], int | None]) -> None:
    """Run a script's main as `quill` runs a subcommand: its exit status, or one line and 2."""
    from quillgpt.errors import QuillError

    name = Path(sys.argv[0]).name
    try:
        code = main()
    except (QuillError, OSError, UnicodeDecodeError, ValueError) as e:
        message = e.args[0] if isinstance(e, FileNotFoundError) and e.args and not e.filename else e
        print(f"{name}: {message}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
