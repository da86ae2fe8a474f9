"""Tokenizers: GPT-2 exactness, byte-level BPE training, syllables, save/load, bad input."""

from __future__ import annotations

import json

import pytest
from conftest import data_file
from hypothesis import given, settings
from hypothesis import strategies as st

from quillgpt.errors import QuillError
from quillgpt.tokenizers import (
    ByteBPETokenizer,
    CharTokenizer,
    SyllableTokenizer,
    build_tokenizer,
    load_tokenizer,
)
from quillgpt.tokenizers.bpe import ENDOFTEXT, GPT2_PATTERN, count_chunks, learn_merges
from quillgpt.tokenizers.gpt2 import GPT2_RANKS_NAME, gpt2_tokenizer
from quillgpt.tokenizers.hf_files import from_vocab_merges, save_vocab_merges
from quillgpt.tokenizers.syllable import split_syllables

EXAMPLE = "Albert Einstein war ein schweizerisch-US-amerikanischer Physiker."


@pytest.fixture(scope="module")
def shakespeare_text() -> str:
    return data_file("tinyshakespeare.txt").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def trained_bpe(shakespeare_text) -> ByteBPETokenizer:
    return ByteBPETokenizer.train(shakespeare_text[:200_000], 512)


# --- GPT-2 ------------------------------------------------------------------------------------

def test_gpt2_equals_tiktoken_on_all_of_shakespeare(gpt2_cache, shakespeare_text):
    tiktoken_load = pytest.importorskip("tiktoken.load")
    import tiktoken

    reference = tiktoken.Encoding(
        "gpt2-reference", pat_str=GPT2_PATTERN,
        mergeable_ranks=tiktoken_load.load_tiktoken_bpe(str(gpt2_cache)),
        special_tokens={ENDOFTEXT: 50256},
    )
    expected = reference.encode_ordinary(shakespeare_text)
    assert len(expected) == 338_025
    tok = gpt2_tokenizer()
    assert tok.vocab_size == 50257 and tok.eot_id == 50256
    assert tok.encode(shakespeare_text) == expected          # fast path (tiktoken, all cores)
    assert tok.encode_python(shakespeare_text) == expected   # pure-Python reference
    assert tok.decode(expected) == shakespeare_text


def test_gpt2_known_ids_and_special_tokens(gpt2_cache):
    tok = build_tokenizer("gpt2", "")
    assert tok.encode("Hello world") == [15496, 995]
    ids = tok.encode("Hello<|endoftext|> world")
    assert ids == [15496, 50256, 995]
    assert tok.encode_python("Hello<|endoftext|> world") == ids
    assert tok.decode(ids) == "Hello<|endoftext|> world"
    assert tok.token_strings(tok.encode(" 😀")) == ["<0x20 0xF0 0x9F 0x98>", "<0x80>"]


def test_gpt2_downloaded_once_with_checksum(monkeypatch, shakespeare_text):
    import io
    import urllib.request

    from quillgpt.download import cache_dir as _cache_dir
    from quillgpt.tokenizers.gpt2 import GPT2_RANKS_URL

    payload = data_file("gpt2.tiktoken").read_bytes()
    calls = []

    def fake_urlopen(url, timeout=None):
        calls.append(url)
        return io.BytesIO(payload)

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    assert gpt2_tokenizer().encode("Hello world") == [15496, 995]
    assert gpt2_tokenizer().vocab_size == 50257
    assert calls == [GPT2_RANKS_URL]
    assert (_cache_dir() / GPT2_RANKS_NAME).read_bytes() == payload


def test_gpt2_wrong_checksum_is_an_error(monkeypatch, tmp_path):
    import io
    import urllib.request

    from quillgpt.download import cache_dir as _cache_dir

    corrupt = data_file("gpt2.tiktoken").read_bytes()[:-100]
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout=None: io.BytesIO(corrupt))
    with pytest.raises(QuillError, match="sha256"):
        gpt2_tokenizer()
    assert not (_cache_dir() / GPT2_RANKS_NAME).exists()  # nothing saved
    # a corrupt file already in the cache is refused too
    (_cache_dir() / GPT2_RANKS_NAME).write_bytes(corrupt)
    with pytest.raises(QuillError, match="sha256"):
        gpt2_tokenizer()


def test_hf_vocab_and_merges_round_trip(gpt2_cache, tmp_path, shakespeare_text):
    tok = gpt2_tokenizer()
    vocab_path, merges_path = save_vocab_merges(tok, tmp_path)
    again = from_vocab_merges(vocab_path, merges_path)
    assert again.ranks == tok.ranks and again.special_tokens == {ENDOFTEXT: 50256}
    hf = pytest.importorskip("tokenizers")
    hf_tok = hf.Tokenizer(hf.models.BPE.from_file(str(vocab_path), str(merges_path)))
    hf_tok.pre_tokenizer = hf.pre_tokenizers.ByteLevel(add_prefix_space=False)
    text = shakespeare_text[:100_000]
    assert hf_tok.encode(text).ids == again.encode(text)


def test_hf_files_bad_input(tmp_path):
    (tmp_path / "vocab.json").write_text('{"a": 0', encoding="utf-8")
    (tmp_path / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    with pytest.raises(QuillError, match="corrupt"):
        from_vocab_merges(tmp_path / "vocab.json", tmp_path / "merges.txt")
    (tmp_path / "vocab.json").write_text('{"a": 0}', encoding="utf-8")
    with pytest.raises(QuillError, match="byte tokens"):
        from_vocab_merges(tmp_path / "vocab.json", tmp_path / "merges.txt")
    with pytest.raises(QuillError, match="not found"):
        from_vocab_merges(tmp_path / "nope.json", tmp_path / "merges.txt")


# --- byte-level BPE training ------------------------------------------------------------------

def test_trained_bpe_fast_and_python_agree(trained_bpe, shakespeare_text):
    assert trained_bpe.vocab_size == 512
    assert trained_bpe.special_tokens == {ENDOFTEXT: 511}
    ids = trained_bpe.encode(shakespeare_text)
    assert ids == trained_bpe.encode_python(shakespeare_text)
    assert trained_bpe.decode(ids) == shakespeare_text
    assert len(ids) < 0.6 * len(shakespeare_text.encode())  # it compresses


@settings(max_examples=150, deadline=None)
@given(text=st.text())
def test_bpe_round_trips_any_unicode(trained_bpe, text):
    ids = trained_bpe.encode(text)
    assert ids == trained_bpe.encode_python(text)
    assert trained_bpe.decode(ids) == text


def test_training_is_deterministic(shakespeare_text):
    text = shakespeare_text[:50_000]
    a = ByteBPETokenizer.train(text, 400)
    b = ByteBPETokenizer.train(text, 400)
    assert a.to_dict() == b.to_dict()


def test_tie_break_is_smallest_pair_first():
    # "ab" and "cd" both occur 3 times: (a, b) has the smaller ids, so it is merged first
    new = learn_merges(count_chunks("cd ab cd ab cd ab", r"\S+|\s", []), 2)
    assert new == [b"ab", b"cd"]


def test_incremental_merges_equal_a_full_recount(shakespeare_text):
    """The incremental trainer learns what recounting every pair at every merge learns."""
    counts = count_chunks(shakespeare_text[:20_000], GPT2_PATTERN, [])
    words = {tuple(c): n for c, n in counts.items()}
    vocab = [bytes([i]) for i in range(256)]
    for _ in range(60):
        pairs: dict[tuple[int, int], int] = {}
        for w, n in words.items():
            for p in zip(w, w[1:]):
                pairs[p] = pairs.get(p, 0) + n
        (a, b), best = min(pairs.items(), key=lambda kv: (-kv[1], kv[0]))
        new_id = len(vocab)
        vocab.append(vocab[a] + vocab[b])
        merged = {}
        for w, n in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == (a, b):
                    out.append(new_id)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            merged[tuple(out)] = merged.get(tuple(out), 0) + n
        words = merged
    assert learn_merges(counts, 60) == vocab[256:]


def test_special_tokens_never_merged_or_split():
    text = ("the cat<|endoftext|>the dog<|endoftext|>" * 50) + "<|endoftext|>"
    tok = ByteBPETokenizer.train(text, 300)
    eot = tok.eot_id
    assert eot == tok.vocab_size - 1
    assert not any(b"|" in t and len(t) > 1 and b"<|" in t for t in tok.ranks)
    ids = tok.encode("the cat<|endoftext|>x")
    assert ids.count(eot) == 1 and tok.decode(ids) == "the cat<|endoftext|>x"


def test_gpt_rs_options():
    text = 'He said "no"\nand "yes"\nand "no"\n' * 40
    across = ByteBPETokenizer.train(text, 300, within_words=False, no_merge='\n"')
    assert any(b" " in t.strip(b" ") for t in across.ranks)  # multi-word tokens
    assert not any(len(t) > 1 and (b"\n" in t or b'"' in t) for t in across.ranks)
    assert across.decode(across.encode(text)) == text
    words = ByteBPETokenizer.train(text, 300, space_prefix=False)
    assert not any(len(t) > 1 and t.startswith(b" ") and t.strip() for t in words.ranks)
    assert words.encode(text) == words.encode_python(text)


def test_bpe_save_load(tmp_path, trained_bpe):
    path = tmp_path / "tok.json"
    trained_bpe.save(path)
    loaded = load_tokenizer(path)
    assert loaded == trained_bpe
    assert json.loads(path.read_text(encoding="utf-8"))["tokens"][32] == "Ġ"


@pytest.mark.parametrize("spec", ["bpe:100", "bpe:256", "bpe:99999999999", "bpe:x", "syllable:1", "nope"])
def test_bad_tokenizer_specs(spec):
    with pytest.raises(QuillError):
        build_tokenizer(spec, "some text " * 10)


def test_lone_surrogate_is_an_error(trained_bpe):
    with pytest.raises(QuillError, match="surrogate"):
        trained_bpe.encode("ok \ud800 no")
    with pytest.raises(QuillError, match="surrogate"):
        ByteBPETokenizer.train("ok \udfff no", 300)


@pytest.mark.parametrize("content", [
    '{"kind": "bpe", "name": "bpe", "pattern": "x", "special_tokens": {}, "tokens": ["a"',
    '{"kind": "bpe", "name": "bpe", "pattern": "x", "special_tokens": {}, "tokens": ["a", "b"]}',
    '{"kind": "bpe", "pattern": "(", "special_tokens": {}, "tokens": []}',
    '{"kind": "syllable", "chunks": [1, 2]}',
    '{"kind": "unknown"}',
    '[1, 2]',
    "[" * 100_000 + "]" * 100_000,  # nested too deeply for the JSON parser
    '{"kind": "char", "chars": ["a", "a"]}',
])
def test_corrupt_tokenizer_json(tmp_path, content):
    path = tmp_path / "tok.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(QuillError):
        load_tokenizer(path)


# --- syllables --------------------------------------------------------------------------------

def test_syllable_splits_the_seed_example():
    chunks = split_syllables(EXAMPLE)
    assert chunks[:6] == ["Albert", " ", "Einst", "ein", " ", "war"]
    assert chunks == ["Albert", " ", "Einst", "ein", " ", "war", " ", "ein", " ", "schw", "eizer", "isch",
                      "-", "US", "-", "amer", "ikan", "isch", "er", " ", "Phys", "iker", "."]
    assert "".join(chunks) == EXAMPLE


def test_syllable_tokenizer_round_trip_and_catch_all(tmp_path):
    tok = SyllableTokenizer.train(EXAMPLE * 3)
    assert tok.coverage == 1.0
    assert tok.decode(tok.encode(EXAMPLE)) == EXAMPLE  # never drops the last chunk
    assert tok.token_strings(tok.encode(EXAMPLE))[:4] == ["Albert", " ", "Einst", "ein"]
    small = build_tokenizer("syllable:4", EXAMPLE)
    assert small.vocab_size == 4 and 0 < small.coverage < 1
    assert small.chunks[0] == " "  # the most frequent chunk gets id 0
    assert small.encode("Albert") == [small.vocab_size - 1]  # the catch-all
    small.save(tmp_path / "s.json")
    assert load_tokenizer(tmp_path / "s.json") == small


def test_every_tokenizer_kind_builds(gpt2_cache, small_text):
    text = small_text.read_text(encoding="utf-8")
    for spec, kind in [("char", CharTokenizer), ("syllable", SyllableTokenizer),
                       ("bpe:300", ByteBPETokenizer), ("gpt2", ByteBPETokenizer)]:
        tok = build_tokenizer(spec, text)
        assert isinstance(tok, kind)
        assert tok.decode(tok.encode(text)) == text


@settings(max_examples=100, deadline=None)
@given(text=st.text())
def test_gpt2_round_trips_any_unicode(text):
    tok = gpt2_tokenizer(data_file("gpt2.tiktoken"))
    ids = tok.encode(text)
    assert ids == tok.encode_python(text)
    assert tok.decode(ids) == text


def test_bpe_pickles_for_worker_processes(trained_bpe):
    import pickle

    trained_bpe.encode("warm the tiktoken encoder up")
    again = pickle.loads(pickle.dumps(trained_bpe))
    assert again == trained_bpe and again.encode("to be or not") == trained_bpe.encode("to be or not")


def test_parallel_split_never_changes_the_tokens(gpt2_cache):
    """Pieces cut for parallel encoding encode to exactly the whole text's tokens, blank lines too."""
    from quillgpt.tokenizers.bpe import split_for_parallel

    tok = gpt2_tokenizer()
    text = "".join(f"Line {i}.\n" + ("\n" if i % 3 == 0 else "") + ("  indented\n" if i % 5 == 0 else "")
                   for i in range(400))
    whole = tok.encode_python(text)
    for n_parts in (2, 3, 7, 50):
        pieces = split_for_parallel(text, n_parts)
        assert "".join(pieces) == text
        assert [t for piece in pieces for t in tok.encode_python(piece)] == whole


@pytest.mark.parametrize("change, message", [
    ({"special_tokens": {"": 259}}, "non-empty"),  # would match everywhere: tiktoken loops forever
    ({"special_tokens": {"<|endoftext|>": 259.0}}, "integers"),
    ({"special_tokens": {"<|endoftext|>": True}}, "integers"),
    ({"special_tokens": {"<|endoftext|>": 9999}}, "integers in 0..259"),
    ({"special_tokens": {"<|endoftext|>": 259, "<|x|>": 259}}, "share an id"),
    ({"special_tokens": {"x" * 1000: 259}}, "longer than"),
    ({"pattern": "(a+)+$"}, "pattern"),  # a regex from a file could backtrack for ever
    ({"tokens": ["a"] * (2 << 20)}, "more than any tokenizer"),
])
def test_hostile_bpe_files_are_refused_on_load(tmp_path, change, message):
    tok = ByteBPETokenizer.train("hello world hello world", 260)
    data = {**tok.to_dict(), **change}
    path = tmp_path / "tok.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(QuillError, match=message):
        load_tokenizer(path)


@given(st.lists(st.text(alphabet="<|ab>", min_size=1, max_size=5), min_size=1, max_size=8),
       st.text(alphabet="<|ab>x ", max_size=40))
@settings(max_examples=300, deadline=None)
def test_special_token_matching_is_the_longest_first_alternation(specials, text):
    """SpecialMatcher (a trie walk from each candidate position) splits text exactly as a regex
    alternation of the tokens sorted longest first does, in one pass."""
    import regex

    from quillgpt.tokenizers.base import SpecialMatcher

    alternation = regex.compile("(" + "|".join(regex.escape(s) for s in sorted(set(specials), key=len,
                                                                               reverse=True)) + ")")
    assert SpecialMatcher(specials).split(text) == alternation.split(text)


def test_special_tokens_are_bounded_in_number(tmp_path, trained_bpe, capsys):
    """A tokenizer file with more special tokens than any tokenizer has (a million made encoding
    take minutes) is refused at load in one line; 10,000 load and encode as tiktoken does."""
    from quillgpt.cli import main

    tok = trained_bpe.with_special_tokens([f"<|s{i}|>" for i in range(9_999)])
    text = "hello <|s5|> world <|s9998|><|s1|>"
    assert tok.encode_python(text) == tok.encode(text)
    ids = tok.encode_python(text)
    assert [i for i in ids if i >= trained_bpe.vocab_size] == [tok.special_tokens[t] for t in ("<|s5|>", "<|s9998|>",
                                                                                             "<|s1|>")]
    data = tok.to_dict()
    base = max(data["special_tokens"].values()) + 1
    data["special_tokens"].update({f"<|t{i}|>": base + i for i in range(5_000)})
    data["tokens"] = data["tokens"] + [f"<|t{i}|>" for i in range(5_000)]
    (tmp_path / "many.json").write_text(json.dumps(data), encoding="utf-8")
    assert main(["tokenize", "hello", "--tokenizer", str(tmp_path / "many.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("quill: error:") and "15,000 special tokens" in err and "\n" not in err
