"""The data pipeline: readers, token files, the cache, memmap batches, sampler state, bad inputs."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import quillgpt.prepare as prep
from quillgpt.cli import main
from quillgpt.config import load_config
from quillgpt.data import BatchSampler, prepare_training_data
from quillgpt.errors import QuillError
from quillgpt.prepare import ReadOptions, load_prepared, prepare

DOCS = [
    "First Citizen:\nBefore we proceed any further, hear me speak.\n",
    "All:\nSpeak, speak.",
    "First Citizen:\nYou are all resolved rather to die than to famish?\n",
]


def tokens(out: str | Path) -> tuple[list[int], list[int], dict]:
    _, train, val, meta = load_prepared(out)
    return train.tolist(), val.tolist(), meta


def write_corpus(tmp_path: Path, docs: list[str]) -> dict[str, Path]:
    """The same documents as a directory of files, a .jsonl and a .parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = tmp_path / "dir"
    d.mkdir()
    for i, doc in enumerate(docs):
        (d / f"{i:03d}.txt").write_text(doc, encoding="utf-8")
    (d / ".hidden").write_text("never read")
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"id": i, "text": doc}) + "\n" for i, doc in enumerate(docs)))
    parquet = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"id": list(range(len(docs))), "body": docs}), parquet)
    return {"dir": d, "jsonl": jsonl, "parquet": parquet}


# --- readers ----------------------------------------------------------------------------------

def test_one_text_gives_the_same_tokens_from_every_reader(tmp_path, shakespeare):
    text = shakespeare.read_text(encoding="utf-8")[:200_000]
    plain = tmp_path / "plain.txt"
    plain.write_text(text, encoding="utf-8")
    gz = tmp_path / "plain.txt.gz"
    gz.write_bytes(gzip.compress(text.encode()))
    sources = write_corpus(tmp_path, [text])
    expected = None
    for name, src in [("txt", plain), ("gz", gz), *sources.items()]:
        train, val, meta = tokens(prepare(str(src), "char", out=tmp_path / f"out-{name}").path)
        assert meta["documents"] == 1 and meta["split"] == "tail", name
        if expected is None:
            expected = (train, val)
            assert len(val) == int(len(text) * 0.1) and len(train) + len(val) == len(text)
        assert (train, val) == expected, name


def test_documents_give_the_same_tokens_from_a_directory_a_jsonl_and_a_parquet(tmp_path):
    sources = write_corpus(tmp_path, DOCS)
    results = {name: tokens(prepare(str(src), "char", out=tmp_path / f"out-{name}").path)
               for name, src in sources.items()}
    assert results["dir"][:2] == results["jsonl"][:2] == results["parquet"][:2]
    _, _, meta = results["jsonl"]
    assert meta["documents"] == 3 and meta["separator"] == "\n"
    tok, train, val, _ = load_prepared(tmp_path / "out-dir")
    # char has no end-of-text token: a newline goes between documents that lack one
    assert tok.decode(train.tolist() + val.tolist()) == DOCS[0] + DOCS[1] + "\n" + DOCS[2]


def test_gpt2_ends_every_document_with_endoftext_and_splits_many_by_document(tmp_path, gpt2_cache):
    docs = [f"Document number {i}: {'word ' * (i % 7)}end." for i in range(200)]
    src = write_corpus(tmp_path, docs)["jsonl"]
    tok, train, val, meta = load_prepared(prepare(str(src), "gpt2", out=tmp_path / "out").path)
    assert meta["split"] == "documents" and meta["documents"] == 200
    eot = tok.eot_id
    assert eot == 50256 and meta["dtype"] == "uint16"

    def split_docs(ids: list[int]) -> list[str]:
        text = tok.decode(ids)
        assert text.endswith("<|endoftext|>")
        return text.split("<|endoftext|>")[:-1]

    val_docs = split_docs(val.tolist())
    assert val_docs == [docs[i] for i in range(9, 200, 10)]  # every 10th document, whole
    assert split_docs(train.tolist()) == [d for i, d in enumerate(docs) if i % 10 != 9]


def test_parquet_column_and_jsonl_field_options(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"n": [1, 2], "a": ["first column", "x"], "b": ["other text", "y"]}),
                   tmp_path / "t.parquet")
    _, _, meta = tokens(prepare(str(tmp_path / "t.parquet"), "char", out=tmp_path / "o1").path)
    tok, _, _, _ = load_prepared(tmp_path / "o1")
    assert set(tok.chars) == set("first column\nx")  # the first string column
    prepare(str(tmp_path / "t.parquet"), "char", out=tmp_path / "o2", opts=ReadOptions(column="b"))
    assert set(load_prepared(tmp_path / "o2")[0].chars) == set("other text\ny")
    (tmp_path / "t.jsonl").write_text('{"body": "abc"}\n\n{"body": "abd"}\n')
    prepare(str(tmp_path / "t.jsonl"), "char", out=tmp_path / "o3", opts=ReadOptions(text_field="body"))
    assert load_prepared(tmp_path / "o3")[0].chars == list("\nabcd")


def test_url_and_known_name(tmp_path, monkeypatch, shakespeare):
    import quillgpt.data as data

    class Response:
        def __init__(self, body: bytes):
            self.body = body

        def read(self) -> bytes:
            return self.body

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    calls = []

    def fake_urlopen(url, timeout=None):
        calls.append(url)
        return Response(b"hello from the web\n" * 50)

    monkeypatch.setattr(data.urllib.request, "urlopen", fake_urlopen)
    url = "https://example.com/corpus.txt"
    first = prepare(url, "char")
    assert prepare(url, "char").path == first.path and calls == [url]  # downloaded once
    assert load_prepared(first.path)[0].chars == sorted(set("hello from the web\n"))

    shutil.copy(shakespeare, prep.cache_dir() / prep.SHAKESPEARE_NAME)
    _, train, val, meta = load_prepared(prepare("shakespeare", "char").path)
    assert len(train) + len(val) == 1_115_394 and calls == [url]


def test_long_text_is_cut_where_gpt2_gives_the_same_tokens(tmp_path, monkeypatch, shakespeare, gpt2_cache):
    """Pieces of 4 KB and two worker processes give exactly the tokens of encoding the whole text."""
    from quillgpt.tokenizers import build_tokenizer

    monkeypatch.setattr(prep, "PIECE_BYTES", 1 << 12)
    monkeypatch.setattr(prep, "ITEM_BYTES", 1 << 14)
    text = shakespeare.read_text(encoding="utf-8")[:300_000] + "  trailing  spaces\n\n\n"
    src = tmp_path / "s.txt"
    src.write_text(text, encoding="utf-8")
    whole = build_tokenizer("gpt2", "").tiktoken_encoding().encode(text, allowed_special="all")
    for workers in (1, 2):
        train, val, meta = tokens(prepare(str(src), "gpt2", out=tmp_path / f"o{workers}", workers=workers).path)
        assert train + val == whole + [50256], workers
        assert meta["workers"] == workers


def test_max_bytes_cuts_the_input(tmp_path):
    src = write_corpus(tmp_path, ["aaaa" * 10, "bbbb" * 10, "cccc" * 10])["dir"]
    train, val, meta = tokens(prepare(str(src), "char", out=tmp_path / "o", opts=ReadOptions(max_bytes=50)).path)
    assert meta["documents"] == 2 and len(train) + len(val) == 50 + 1  # 40 a, 10 b and a newline


# --- the cache --------------------------------------------------------------------------------

def test_preparing_twice_reuses_the_cache(small_text, monkeypatch):
    first = prepare(str(small_text), "char")
    assert first.path.parent == prep.cache_dir() / "prepared"
    stamp = (first.path / "train.bin").stat().st_mtime_ns
    monkeypatch.setattr(prep, "encode_items", lambda *a, **k: pytest.fail("tokenised again"))
    second = prepare(str(small_text), "char")
    assert second.path == first.path and (first.path / "train.bin").stat().st_mtime_ns == stamp
    # other content, tokenizer options or split: another entry
    monkeypatch.undo()
    assert prepare(str(small_text), "char", val_fraction=0.2).path != first.path
    small_text.write_text(small_text.read_text() + "more\n")
    assert prepare(str(small_text), "char").path != first.path


def test_prepare_training_data_uses_a_prepared_directory(tmp_path, small_text):
    out = prepare(str(small_text), "char", out=tmp_path / "prepared").path
    cfg = load_config(None, dict(data=str(out), block_size=16))
    tokenizer, splits = prepare_training_data(cfg)
    assert isinstance(splits.train, np.memmap) and isinstance(splits.val, np.memmap)
    assert tokenizer.decode(splits.train[:6].tolist()) == "To be,"
    cfg = load_config(None, dict(data=str(out), block_size=16, tokenizer="gpt2"))
    with pytest.raises(QuillError, match="prepared with the char tokenizer.*--tokenizer char"):
        prepare_training_data(cfg)


# --- batches ----------------------------------------------------------------------------------

def test_memmap_batches_equal_in_memory_batches(tmp_path, small_text):
    _, train, _, _ = load_prepared(prepare(str(small_text), "char", out=tmp_path / "o").path)
    a = BatchSampler(train, 32, 8, seed=7)
    b = BatchSampler(np.array(train), 32, 8, seed=7)
    data = torch.from_numpy(np.array(train).astype(np.int64))
    g = torch.Generator().manual_seed(7)
    for _ in range(5):
        (xa, ya), (xb, yb) = a.next(), b.next()
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
        # the windows are the ones the core's in-memory sampler drew
        starts = torch.randint(len(data) - 32, (8,), generator=g)
        windows = data[starts[:, None] + torch.arange(33)]
        assert torch.equal(xa, windows[:, :-1]) and torch.equal(ya, windows[:, 1:])
        assert xa.dtype == torch.int64 and xa.shape == (8, 32)


def test_restoring_the_sampler_state_reproduces_the_batches(tmp_path, small_text):
    from safetensors.torch import load_file, save_file

    tokens_ = np.arange(1000, dtype=np.uint16)
    sampler = BatchSampler(tokens_, 16, 4, seed=3)
    for _ in range(3):
        sampler.next()
    save_file({"sampler": sampler.state()}, tmp_path / "state.safetensors")  # as a checkpoint would
    expected = [sampler.next() for _ in range(4)]
    resumed = BatchSampler(tokens_, 16, 4, seed=999)
    resumed.set_state(load_file(tmp_path / "state.safetensors")["sampler"])
    for x, y in expected:
        rx, ry = resumed.next()
        assert torch.equal(x, rx) and torch.equal(y, ry)


def test_ddp_ranks_draw_disjoint_slices_of_one_stream():
    tokens_ = np.arange(10_000, dtype=np.uint32)
    whole = BatchSampler(tokens_, 8, 3 * 4, seed=5)
    ranks = [BatchSampler(tokens_, 8, 4, seed=5, rank=r, world_size=3) for r in range(3)]
    for _ in range(3):
        x, _ = whole.next()
        parts = [s.next()[0] for s in ranks]
        assert torch.equal(torch.cat(parts), x)
        starts = [set(p[:, 0].tolist()) for p in parts]
        assert not (starts[0] & starts[1]) or not (starts[1] & starts[2])  # different draws
    assert all(torch.equal(s.state(), whole.state()) for s in ranks)
    with pytest.raises(QuillError, match="rank"):
        BatchSampler(tokens_, 8, 4, seed=5, rank=3, world_size=3)


# --- bad input --------------------------------------------------------------------------------

def run(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def one_line_error(code: int, err: str, *fragments: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("quill: error:"), err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def test_bad_inputs_are_one_line_errors(tmp_path, capsys):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"good text\n" * 10 + b"caf\xe9\n")
    empty_dir = tmp_path / "emptydir"
    empty_dir.mkdir()
    (empty_dir / "a.txt").write_bytes(b"")
    nofield = tmp_path / "nofield.jsonl"
    nofield.write_text('{"text": "ok"}\n{"content": "no"}\n')
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "ok"}\n{"text": \n')
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"n": [1, 2]}), tmp_path / "nums.parquet")
    pq.write_table(pa.table({"t": ["a", "b"]}), tmp_path / "t.parquet")
    cases = [
        (["--data", str(bad)], ["bad.txt is not UTF-8", "0xe9", "offset 103", "--encoding-errors replace"]),
        (["--data", str(tmp_path / "nope.txt")], ["data file not found"]),
        (["--data", str(empty_dir)], ["no text found"]),
        (["--data", str(nofield)], ["line 2 has no field 'text'", "content", "--text-field"]),
        (["--data", str(broken)], ["line 2 is not valid JSON"]),
        (["--data", str(tmp_path / "nums.parquet")], ["no string column", "n"]),
        (["--data", str(tmp_path / "t.parquet"), "--column", "x"], ["no column 'x'", "columns: t"]),
        (["--data", str(tmp_path / "t.parquet"), "--tokenizer", "nonsense"], ["unknown tokenizer"]),
    ]
    for args, fragments in cases:
        out = tmp_path / "out"
        code, _, err = run(["prepare", *args, "--out", str(out)], capsys)
        one_line_error(code, err, *fragments)
        assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))
    # --encoding-errors replace goes on
    code, stdout, err = run(["prepare", "--data", str(bad), "--out", str(tmp_path / "ok"),
                             "--encoding-errors", "replace"], capsys)
    assert code == 0, err
    assert "\ufffd" in load_prepared(tmp_path / "ok")[0].chars


def test_prepared_data_problems_are_one_line_errors(tmp_path, small_text, capsys):
    out = tmp_path / "p"
    assert main(["prepare", "--data", str(small_text), "--out", str(out), "--tokenizer", "char"]) == 0
    capsys.readouterr()
    code, _, err = run(["prepare", "--data", str(small_text), "--out", str(out)], capsys)
    one_line_error(code, err, "not empty", "--overwrite")
    tiny = ["--n-layer", "1", "--n-head", "1", "--n-embd", "8", "--max-iters", "1", "--no-save"]
    code, _, err = run(["train", "--data", str(out), "--tokenizer", "gpt2", *tiny], capsys)
    one_line_error(code, err, "prepared with the char tokenizer", "--tokenizer char")
    code, _, err = run(["train", "--data", str(out), "--block-size", "5000", *tiny], capsys)
    one_line_error(code, err, "too short", "block_size")
    with open(out / "train.bin", "r+b") as f:
        f.truncate(101)
    code, _, err = run(["train", "--data", str(out), *tiny], capsys)
    one_line_error(code, err, "truncated or corrupt")


def test_cli_prepare_then_train(tmp_path, capsys):
    sources = write_corpus(tmp_path, [f"line {i}: to be or not to be\n" * 20 for i in range(30)])
    out = tmp_path / "prepared"
    code, stdout, err = run(["prepare", "--data", str(sources["jsonl"]), "--out", str(out),
                             "--no-progress"], capsys)
    assert code == 0, err
    assert stdout.strip() == str(out) and "30 documents" in err and "MB/s" in err
    meta = json.loads((out / "meta.json").read_text())
    assert meta["train_tokens"] * 2 == (out / "train.bin").stat().st_size
    assert (out / "tokenizer.json").is_file()
    code, _, err = run(["train", "--data", str(out), "--block-size", "16", "--n-layer", "1", "--n-head", "1",
                        "--n-embd", "8", "--max-iters", "2", "--eval-iters", "1", "--batch-size", "2",
                        "--sample-tokens", "0", "--no-save", "--no-progress"], capsys)
    assert code == 0, err
    assert f"{meta['train_tokens']:,} train / {meta['val_tokens']:,} val tokens" in err


@pytest.mark.parametrize("n", [1005, 1115, 2000])
def test_tail_split_rounds_as_nanogpt(tmp_path, n):
    """One text: training gets the first int(n * 0.9) tokens, as nanoGPT's prepare.py."""
    from quillgpt.data import split_tokens

    text = "".join("abcdefghij"[(i * 7) % 10] for i in range(n))
    (tmp_path / "t.txt").write_text(text)
    train, val, _ = tokens(prepare(str(tmp_path / "t.txt"), "char", out=tmp_path / "o").path)
    assert len(train) == int(n * 0.9) and len(train) + len(val) == n
    splits = split_tokens(list(range(10)) * (n // 10) + list(range(n % 10)), 0.1, 8)
    assert len(splits.train) == int(n * 0.9) and len(splits.val) == n - int(n * 0.9)


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_a_signal_during_prepare_ends_its_workers_with_it(tmp_path, sig):
    """SIGTERM (or SIGINT) to `quill prepare` while its workers tokenize: one line, "interrupted",
    and the workers end with it (they used to be left blocked on a pipe forever); nothing is
    written. The workers here block until killed, so nothing depends on timing."""
    import contextlib
    import os
    import signal
    import subprocess
    import sys
    import time

    data = tmp_path / "data.txt"
    data.write_text("To be, or not to be, that is the question.\n" * 200, encoding="utf-8")
    marks = tmp_path / "marks"
    marks.mkdir()
    script = f"""
import os, sys, time
import quillgpt.prepare as prep

def stuck(tokenizer, item, dtype):  # a worker that never finishes, after saying it started
    open(os.path.join({str(marks)!r}, str(os.getpid())), "w").close()
    time.sleep(3600)

prep.encode_item = stuck  # the workers are forked: they run this
from quillgpt.cli import main
sys.exit(main(["prepare", "--data", {str(data)!r}, "--out", {str(tmp_path / "out")!r}, "--workers", "2",
               "--tokenizer", "char", "--no-progress"]))
"""
    proc = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "QUILL_CACHE": os.environ.get("QUILL_CACHE", str(tmp_path))})
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while not os.listdir(marks) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert os.listdir(marks), proc.stderr.read() if proc.poll() is not None else "no worker started"
        workers = [int(pid) for task in os.listdir(f"/proc/{proc.pid}/task")  # the pool's processes
                   for pid in open(f"/proc/{proc.pid}/task/{task}/children").read().split()]
        assert len(workers) == 2 and int(os.listdir(marks)[0]) in workers, workers
        proc.send_signal(getattr(signal, sig))
        _, err = proc.communicate(timeout=60)
    finally:  # a failed test leaves nothing running
        for pid in [proc.pid] * (proc.poll() is None) + workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert proc.returncode == 130 and err.strip() == "quill: interrupted", err

    def alive(pid: int) -> bool:
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().split(") ")[1][0] != "Z"  # a zombie is gone, waiting to be reaped
        except FileNotFoundError:
            return False

    deadline = time.monotonic() + 30
    while any(alive(p) for p in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(alive(p) for p in workers)
    assert not (tmp_path / "out").exists()
