"""The cache: downloaded files are checked on use, and offline errors say where a file goes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import conftest
import pytest

from quillgpt import download
from quillgpt.cli import main
from quillgpt.errors import QuillError

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def offline(monkeypatch):
    def no_network(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)


def test_a_corrupt_cached_shakespeare_is_an_error_that_says_to_delete_it(shakespeare, offline):
    cached = download.cache_dir() / download.SHAKESPEARE_NAME
    cached.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(shakespeare, cached)
    assert download.shakespeare_path() == cached
    cached.write_text("Not Shakespeare at all.\n" * 40_000, encoding="utf-8")  # other text
    with pytest.raises(QuillError, match="corrupt.*delete it") as e:
        download.shakespeare_path()
    assert str(cached) in str(e.value)
    cached.unlink()
    with pytest.raises(QuillError, match="cannot download"):  # deleted, offline: fetched again
        download.shakespeare_path()


def test_a_corrupt_cache_file_stops_quill_train_in_one_line(shakespeare, tmp_path, capsys, offline):
    cached = download.cache_dir() / download.SHAKESPEARE_NAME
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_bytes(shakespeare.read_bytes()[:-1] + b"?")  # same size, one byte changed
    assert main(["train", "--out", str(tmp_path / "r"), "--max-iters", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "corrupt" in err[0] and "delete it" in err[0]
    assert not (tmp_path / "r").exists()


def test_cached_files_are_hashed_once_per_process_and_again_when_they_change(tmp_path, monkeypatch):
    path = download.cache_dir() / "f.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"abc")
    good = download.sha256_file(path)
    hashed = []
    real = download.sha256_file
    monkeypatch.setattr(download, "sha256_file", lambda p: hashed.append(p) or real(p))
    for _ in range(3):
        assert download.fetch_cached("f.txt", "https://example.invalid/f.txt", good) == path
    assert len(hashed) == 1
    path.write_bytes(b"abd")  # changed on disk (size kept): checked again, and refused
    os.utime(path, ns=(1, 1))
    with pytest.raises(QuillError, match="corrupt"):
        download.fetch_cached("f.txt", "https://example.invalid/f.txt", good)


def test_offline_shakespeare_says_how_to_train_on_a_file_of_your_own(offline):
    with pytest.raises(QuillError) as e:
        download.shakespeare_path()
    message = str(e.value)
    assert "--data FILE" in message and "make demo DATA=FILE" in message
    assert str(download.cache_dir() / "tinyshakespeare.txt") in message


def test_offline_gpt2_tokenize_says_where_to_put_the_ranks(offline, capsys):
    assert main(["tokenize", "hello", "--tokenizer", "gpt2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert str(download.cache_dir() / "gpt2.tiktoken") in err and "$QUILL_CACHE" in err
    assert "--data" not in err  # `quill tokenize` has no such flag for this


def test_make_demo_takes_data(tmp_path):
    """`make demo DATA=FILE` passes the file to quill train (make -n: print, do not run)."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    text = tmp_path / "mine.txt"
    proc = subprocess.run(["make", "-n", "demo", f"DATA={text}"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    train = [line for line in proc.stdout.splitlines() if "quill train" in line]
    assert len(train) == 1 and f"--data {text}" in train[0]


# --- where the tests find the data ----------------------------------------------------------

def test_tests_find_data_where_quill_does(tmp_path, monkeypatch, shakespeare, offline):
    """The user's cache first, then ../shared/data, else a download; a skip only offline with
    neither (and one line saying so)."""
    user, shared = tmp_path / "user-cache", tmp_path / "shared"
    user.mkdir()
    shared.mkdir()
    monkeypatch.setattr(conftest, "USER_CACHE", user)
    monkeypatch.setattr(conftest, "SHARED_DATA", shared)
    name = download.SHAKESPEARE_NAME
    assert isinstance(conftest._locate(name), str)  # nothing anywhere, offline: the skip reason
    reason = conftest._locate(name)
    assert "\n" not in reason and "no copy" in reason and str(user) in reason
    shutil.copy(shakespeare, shared / name)
    assert conftest._locate(name) == shared / name
    shutil.copy(shakespeare, user / name)
    assert conftest._locate(name) == user / name  # the user's cache comes first
    (user / name).write_text("corrupt")
    with pytest.raises(QuillError, match="delete it"):
        conftest._locate(name)


def test_tests_download_the_data_as_quill_does(tmp_path, monkeypatch, shakespeare):
    user = tmp_path / "user-cache"
    monkeypatch.setattr(conftest, "USER_CACHE", user)
    monkeypatch.setattr(conftest, "SHARED_DATA", tmp_path / "no-shared")
    payload = shakespeare.read_bytes()

    class Response:
        def read(self) -> bytes:
            return payload

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout=None: Response())
    assert conftest._locate(download.SHAKESPEARE_NAME) == user / download.SHAKESPEARE_NAME
    assert (user / download.SHAKESPEARE_NAME).read_bytes() == payload
    assert sys.modules["quillgpt.download"].cache_dir() != user  # the test's own cache untouched
