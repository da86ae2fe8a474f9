"""The cache directory and the files downloaded into it, once, checked against a sha256.

    path = fetch_cached("gpt2.tiktoken", url, sha256)   # $QUILL_CACHE/gpt2.tiktoken
    path = download("https://example.com/corpus.txt")    # $QUILL_CACHE/downloads/<hash>-corpus.txt
    path = shakespeare_path()                            # tiny-shakespeare

The lowest layer, beside `fileio.py`: it imports only the standard library, `errors` and
`fileio` (and `urllib.request` only when something is downloaded), so the tokenizers can use it
and still start fast.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable
from pathlib import Path

from .errors import QuillError
from .fileio import atomic_write_bytes, sweep_temporaries

SHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
)
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
SHAKESPEARE_NAME = "tinyshakespeare.txt"


def cache_dir() -> Path:
    """`$QUILL_CACHE`, or ~/.cache/quillgpt."""
    return Path(os.environ.get("QUILL_CACHE") or Path.home() / ".cache" / "quillgpt")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# Cached files whose sha256 was checked in this process: (path, size, mtime_ns). A file is hashed
# once per process, and again whenever it changes on disk.
_CHECKED: set[tuple[str, int, int]] = set()


def check_cached(path: Path, sha256: str) -> Path:
    """`path` if its content has the expected sha256; else an error that says to delete it."""
    st = path.stat()
    stamp = (str(path), st.st_size, st.st_mtime_ns)
    if stamp in _CHECKED:
        return path
    digest = sha256_file(path)
    if digest != sha256:
        raise QuillError(f"the cached {path.name} at {path} is corrupt (sha256 {digest[:16]}..., expected "
                         f"{sha256[:16]}...); delete it and it is downloaded again")
    _CHECKED.add(stamp)
    return path


def fetch_cached(name: str, url: str, sha256: str | None, offline_hint: str = "") -> Path:
    """A file in the cache directory, downloaded once from `url` and checked against `sha256`
    (again on first use in each process, when it is already cached). `offline_hint` ends the
    error when the download fails: what to do instead."""
    path = cache_dir() / name
    if path.is_file():
        return check_cached(path, sha256) if sha256 is not None else path
    sweep_temporaries(path.parent)  # the cache is ours: what killed downloads left
    data = _download(name, url, path, offline_hint)
    digest = hashlib.sha256(data).hexdigest()
    if sha256 is not None and digest != sha256:
        raise QuillError(f"downloaded {name} has sha256 {digest}, expected {sha256}; not saved")
    atomic_write_bytes(path, data)
    if sha256 is not None:
        check_cached(path, sha256)  # remembered as checked
    return path


def _download(name: str, url: str, path: Path, offline_hint: str) -> bytes:
    import urllib.error
    import urllib.request  # here, not above: importing it takes longer than the tokenizers

    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.read()
    except (urllib.error.URLError, OSError) as e:
        hint = offline_hint or f"place the file at {path}"
        raise QuillError(f"cannot download {name} from {url} ({getattr(e, 'reason', e)}); offline? {hint}") from None


def shakespeare_path() -> Path:
    """tiny-shakespeare from the cache, downloaded on first use."""
    path = cache_dir() / SHAKESPEARE_NAME
    hint = (f"train on a text file of your own with --data FILE (make demo DATA=FILE), or place "
            f"tiny-shakespeare (sha256 {SHAKESPEARE_SHA256[:12]}...) at {path}")
    return fetch_cached(SHAKESPEARE_NAME, SHAKESPEARE_URL, SHAKESPEARE_SHA256, hint)


def download(url: str) -> Path:
    """A URL's content, downloaded once into the cache (no checksum known: trusted as served)."""
    key = hashlib.sha256(url.encode()).hexdigest()[:16]
    base = re.sub(r"[^A-Za-z0-9_.-]+", "_", url.rstrip("/").rsplit("/", 1)[-1].split("?")[0]) or "data"
    return fetch_cached(f"downloads/{key}-{base}", url, None,
                        "download it some other way and pass the file with --data FILE")


KNOWN_DATASETS: dict[str, Callable[[], Path]] = {"shakespeare": shakespeare_path}
