"""Byte-level BPE, written from scratch: GPT-2's scheme, a fast trainer, and two encoders.

How text becomes tokens (GPT-2, and every tokenizer trained here):

1. special tokens such as `<|endoftext|>` are cut out first and map to their own ids;
2. the rest is cut into chunks by a pre-tokenisation regex (GPT-2's by default: words with
   their leading space, numbers, punctuation runs, whitespace);
3. each chunk is UTF-8 encoded, and its bytes are merged pairwise: repeatedly, the adjacent
   pair whose concatenation has the lowest rank (= token id) is merged, leftmost first, until
   no adjacent pair forms a token. This is exactly what tiktoken does, so when tiktoken is
   installed `encode` goes through a `tiktoken.Encoding` built from our ranks (the fast path);
   `encode_python` is the readable reference and gives the same ids.

Training (`ByteBPETokenizer.train`) learns merges incrementally: it counts adjacent pairs once
over the *distinct* chunks (weighted by how often each occurs), keeps an index from each pair to
the chunks that contain it and a max-heap of counts, and after each merge touches only the
chunks that contained the merged pair. Ties are broken deterministically: among pairs with the
same count, the one with the smallest (left id, right id) wins, i.e. the lexicographically
smallest by ids, where the 256 byte tokens have the ids of their byte values.
"""

from __future__ import annotations

import base64
import heapq
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import regex

from ..errors import QuillError, shown
from .base import (
    MAX_VOCAB_SIZE,
    SpecialMatcher,
    Tokenizer,
    appended_specials,
    check_special_tokens,
    check_vocabulary_size,
    register,
)

# GPT-2's pre-tokenisation: contractions, words with one leading space, numbers, punctuation
# runs, whitespace (the last space of a run goes with the next word).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# The same cut, but words do not take their leading space (gpt-rs: space_prefix = false).
WORDS_PATTERN = r"""'(?:[sdmt]|ll|ve|re)|\p{L}+|\p{N}+|[^\s\p{L}\p{N}]+|\s+"""
# One chunk per line: merges may cross word boundaries (gpt-rs: merges_within_words = false).
LINES_PATTERN = r"""\n|[^\n]+"""
# Patterns whose chunks never cross a point just after "\n" that is followed by a non-space:
# texts may be cut there and encoded in parallel with the same result.
SPLITTABLE_PATTERNS = {GPT2_PATTERN, WORDS_PATTERN, LINES_PATTERN}
# The patterns a tokenizer file may name (by their text), with what they are.
KNOWN_PATTERNS = {GPT2_PATTERN: "GPT-2's", WORDS_PATTERN: "words without their space",
                  LINES_PATTERN: "lines"}

ENDOFTEXT = "<|endoftext|>"
PARALLEL_MIN_CHARS = 1 << 20  # texts longer than this are encoded on all idle cores


def pre_tokenize_pattern(within_words: bool = True, space_prefix: bool = True) -> str:
    """The pre-tokenisation regex for the gpt-rs options (defaults: GPT-2's)."""
    if not within_words:
        return LINES_PATTERN
    return GPT2_PATTERN if space_prefix else WORDS_PATTERN


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map (used in vocab.json / merges.txt and our JSON).

    Printable Latin-1 bytes map to themselves; the other 68 (controls, space, ...) map to
    U+0100 onwards, in byte order. So a space is written "Ġ" and a newline "Ċ".
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    n = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + n)
            n += 1
    return mapping


def token_to_printable(token: bytes) -> str:
    table = bytes_to_unicode()
    return "".join(table[b] for b in token)


def printable_to_token(text: str) -> bytes:
    inverse = _unicode_to_bytes()
    try:
        return bytes(inverse[c] for c in text)
    except KeyError as e:
        raise ValueError(f"token {shown(text)} has a character {shown(e.args[0])} outside GPT-2's byte "
                         f"alphabet") from None


@lru_cache(maxsize=1)
def _unicode_to_bytes() -> dict[str, int]:
    return {c: b for b, c in bytes_to_unicode().items()}


def check_encodable(text: str) -> None:
    """Text must be valid Unicode that UTF-8 can hold: no lone surrogates."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise QuillError(
            f"text has a lone surrogate U+{ord(text[e.start]):04X} at position {e.start}; "
            f"it is not valid Unicode and cannot be encoded"
        ) from None


def bpe_merge(ranks: dict[bytes, int], piece: bytes) -> list[int]:
    """Token ids of one chunk: merge the lowest-ranked adjacent pair (leftmost first) until none."""
    parts = [piece[i : i + 1] for i in range(len(piece))]
    while len(parts) > 1:
        best_rank, best_i = None, -1
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and (best_rank is None or rank < best_rank):
                best_rank, best_i = rank, i
        if best_i < 0:
            break
        parts[best_i : best_i + 2] = [parts[best_i] + parts[best_i + 1]]
    return [ranks[p] for p in parts]


def idle_cores() -> int:
    """Cores not busy with other work (cores minus the 1-minute load average), at least 1.

    Threads only pay off on idle cores: on a loaded machine they make encoding slower.
    """
    n = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # not on every platform
        return n
    return max(1, min(n, int(n - load + 0.5)))


def split_for_parallel(text: str, n_parts: int) -> list[str]:
    """`text` cut into about `n_parts` pieces, each cut just after a "\\n" between two non-spaces.

    Such a newline is a pre-token of its own, so no token crosses the cut. (After a blank line it
    would not be: "\\n\\n" is one pre-token.)
    """
    if n_parts <= 1:
        return [text]
    pieces, start, step = [], 0, max(1, len(text) // n_parts)
    while start < len(text):
        cut = start + step
        while cut < len(text) and not (
            text[cut - 1] == "\n" and not text[cut].isspace() and cut >= 2 and not text[cut - 2].isspace()
        ):
            cut = text.find("\n", cut)
            if cut == -1:
                cut = len(text)
                break
            cut += 1
        pieces.append(text[start:cut])
        start = cut
    return pieces


@register
class ByteBPETokenizer(Tokenizer):
    """A byte-level BPE tokenizer: mergeable tokens (bytes -> id = rank), specials, a pattern."""

    kind = "bpe"

    def __init__(self, ranks: dict[bytes, int], special_tokens: dict[str, int] | None = None,
                 pattern: str = GPT2_PATTERN, name: str = "bpe"):
        self.ranks = dict(ranks)
        self.specials = dict(special_tokens or {})
        self.pattern = pattern
        self.name = name
        self.decoder: dict[int, bytes] = {i: t for t, i in self.ranks.items()}
        for text, i in self.specials.items():
            self.decoder[i] = text.encode("utf-8")
        self._check()
        self._regex = regex.compile(pattern)
        self._special_matcher = SpecialMatcher(self.specials) if self.specials else None
        self._cache: dict[str, list[int]] = {}
        self._tiktoken: Any = None

    def _check(self) -> None:
        n_ids = len(self.ranks) + len(self.specials)
        check_vocabulary_size(n_ids, "the vocabulary")
        check_special_tokens(self.specials, n_ids)
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in self.ranks.values()):
            raise ValueError("token ids must be integers")
        if len(self.decoder) != n_ids:
            raise ValueError("two tokens share an id")
        if set(self.decoder) != set(range(n_ids)):
            raise ValueError(f"token ids are not 0..{n_ids - 1}")
        missing = [b for b in range(256) if bytes([b]) not in self.ranks]
        if missing:
            raise ValueError(f"{len(missing)} of the 256 byte tokens are missing (e.g. byte {missing[0]})")

    def __getstate__(self) -> dict[str, Any]:
        """For worker processes: leave out the chunk cache and the tiktoken encoder (rebuilt)."""
        return {**self.__dict__, "_cache": {}, "_tiktoken": None}

    # --- the interface ----------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return len(self.decoder)

    @property
    def special_tokens(self) -> dict[str, int]:
        return dict(self.specials)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (special tokens in it are recognised); tiktoken when installed."""
        check_encodable(text)
        enc = self.tiktoken_encoding()
        if enc is None:
            return self._encode_python(text)
        if len(text) >= PARALLEL_MIN_CHARS and self.pattern in SPLITTABLE_PATTERNS:
            n = idle_cores()
            if n > 1:
                pieces = split_for_parallel(text, 4 * n)
                ids: list[int] = []
                for part in enc.encode_batch(pieces, num_threads=n, allowed_special="all"):
                    ids.extend(part)
                return ids
        return enc.encode(text, allowed_special="all")

    def encode_ordinary(self, text: str) -> list[int]:
        """Token ids of `text` with special-token strings in it read as plain text."""
        check_encodable(text)
        enc = self.tiktoken_encoding()
        return self._encode_ordinary(text) if enc is None else enc.encode_ordinary(text)

    def with_special_tokens(self, names: Sequence[str]) -> ByteBPETokenizer:
        specials = appended_specials(self.specials, names, self.vocab_size)
        return ByteBPETokenizer(self.ranks, specials, self.pattern, self.name)

    def encode_python(self, text: str) -> list[int]:
        """The pure-Python reference encoder; gives the same ids as `encode`."""
        check_encodable(text)
        return self._encode_python(text)

    def _encode_python(self, text: str) -> list[int]:
        if self._special_matcher is None:
            return self._encode_ordinary(text)
        ids: list[int] = []
        for i, part in enumerate(self._special_matcher.split(text)):
            if i % 2:  # the captured special tokens sit at odd positions
                ids.append(self.specials[part])
            elif part:
                ids.extend(self._encode_ordinary(part))
        return ids

    def _encode_ordinary(self, text: str) -> list[int]:
        ids: list[int] = []
        cache, ranks = self._cache, self.ranks
        if len(cache) > 200_000:
            cache.clear()
        for chunk in self._regex.findall(text):
            chunk_ids = cache.get(chunk)
            if chunk_ids is None:
                chunk_ids = bpe_merge(ranks, chunk.encode("utf-8"))
                cache[chunk] = chunk_ids
            ids.extend(chunk_ids)
        return ids

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        try:
            return b"".join(self.decoder[i] for i in ids)
        except KeyError as e:
            raise QuillError(f"token id {e} is outside the vocabulary of {self.vocab_size}") from None

    def decode(self, ids: list[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def token_strings(self, ids: list[int]) -> list[str]:
        """Each token as text; a token that is only part of a UTF-8 character shows as <0xNN...>."""
        out = []
        for i in ids:
            b = self.decode_bytes([i])
            try:
                out.append(b.decode("utf-8"))
            except UnicodeDecodeError:
                out.append("<" + " ".join(f"0x{x:02X}" for x in b) + ">")
        return out

    def tiktoken_encoding(self) -> Any:
        """A `tiktoken.Encoding` with our ranks, specials and pattern; None without tiktoken."""
        if self._tiktoken is None:
            try:
                import tiktoken
            except ImportError:
                return None
            self._tiktoken = tiktoken.Encoding(
                name=f"quill-{self.name}", pat_str=self.pattern, mergeable_ranks=self.ranks,
                special_tokens=self.specials, explicit_n_vocab=self.vocab_size,
            )
        return self._tiktoken

    # --- save / load ------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Tokens by id in GPT-2's printable byte alphabet ("Ġthe"); specials by text."""
        by_id = {i: t for t, i in self.ranks.items()}
        tokens = [token_to_printable(by_id[i]) if i in by_id else None for i in range(self.vocab_size)]
        return {"kind": self.kind, "name": self.name, "pattern": self.pattern,
                "special_tokens": self.specials, "tokens": tokens}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ByteBPETokenizer:
        specials = data["special_tokens"]
        tokens = data["tokens"]
        if not isinstance(tokens, list):
            raise ValueError("'tokens' must be a list")
        check_vocabulary_size(len(tokens), "'tokens'")
        special_ids = set(check_special_tokens(specials, len(tokens)).values())
        ranks = {}
        for i, t in enumerate(tokens):
            if i in special_ids:
                continue
            if not isinstance(t, str):
                raise ValueError(f"token {i} is not a string")
            ranks[printable_to_token(t)] = i
        if len(ranks) + len(specials) != len(tokens):
            raise ValueError("duplicate tokens or special ids outside the token list")
        pattern = data["pattern"]
        if pattern not in KNOWN_PATTERNS:
            # a regex from a file could take exponential time on some texts: only ours are run
            raise ValueError(f"pre-tokenisation pattern {shown(pattern)} is not one of quill's "
                             f"({', '.join(KNOWN_PATTERNS.values())})")
        return cls(ranks, specials, pattern, str(data.get("name", "bpe"))[:100])

    # --- training ---------------------------------------------------------------------------

    @classmethod
    def train(cls, text: str, vocab_size: int, special_tokens: Iterable[str] = (ENDOFTEXT,),
              within_words: bool = True, space_prefix: bool = True, no_merge: str = "",
              progress: bool = False) -> ByteBPETokenizer:
        """Learn merges on `text` until the vocabulary (with specials) has `vocab_size` tokens.

        within_words / space_prefix pick the pre-tokenisation (both true: GPT-2's regex);
        characters in `no_merge` (e.g. "\\n\\"") never merge with anything. Stops early when no
        pair occurs twice. See the module docstring for the algorithm and tie-breaking.
        """
        specials = list(dict.fromkeys(special_tokens))
        try:
            check_special_tokens({t: i for i, t in enumerate(specials)}, len(specials))
        except ValueError as e:
            raise QuillError(str(e)) from None
        check_vocab_size(vocab_size, 256 + len(specials))
        check_encodable(text)
        pattern = pre_tokenize_pattern(within_words, space_prefix)
        chunk_counts = count_chunks(text, pattern, specials, no_merge)
        new_tokens = learn_merges(chunk_counts, vocab_size - 256 - len(specials), progress)
        tokens = [bytes([i]) for i in range(256)] + new_tokens
        ranks = {t: i for i, t in enumerate(tokens)}
        n = len(ranks)
        return cls(ranks, {s: n + k for k, s in enumerate(specials)}, pattern, "bpe")


def check_vocab_size(vocab_size: int, minimum: int) -> None:
    if vocab_size < minimum:
        raise QuillError(f"vocab size {vocab_size} is below the base alphabet: byte-level BPE needs "
                         f"at least {minimum} (256 bytes + special tokens)")
    if vocab_size > MAX_VOCAB_SIZE:
        raise QuillError(f"vocab size {vocab_size} is absurdly large (at most {MAX_VOCAB_SIZE:,})")


def count_chunks(text: str, pattern: str, specials: list[str], no_merge: str = "") -> Counter[bytes]:
    """How often each distinct pre-tokenised chunk occurs, as UTF-8 bytes.

    Special tokens are cut out first (never part of a chunk); characters in `no_merge` are
    cut out as chunks of their own.
    """
    parts = [text]
    if specials:
        parts = regex.split("|".join(regex.escape(s) for s in specials), text)
    chunk_re = regex.compile(pattern)
    counts: Counter[str] = Counter()
    for part in parts:
        counts.update(chunk_re.findall(part))
    if no_merge:
        isolate = regex.compile("([" + regex.escape(no_merge) + "])")
        split_counts: Counter[str] = Counter()
        for chunk, n in counts.items():
            for piece in isolate.split(chunk):
                if piece:
                    split_counts[piece] += n
        counts = split_counts
    return Counter({c.encode("utf-8"): n for c, n in counts.items()})


def learn_merges(chunk_counts: Counter[bytes], n_merges: int,
                 progress: bool = False) -> list[bytes]:
    """The bytes of up to `n_merges` new tokens, in the order learnt (their ids: 256 up).

    A pair whose bytes already form a token (e.g. "a"+"bc" after "ab"+"c" made "abc") is
    merged into that token and adds none.
    """
    words = [list(c) for c in chunk_counts]  # each distinct chunk as a list of token ids
    freqs = list(chunk_counts.values())
    pair_counts: dict[tuple[int, int], int] = {}
    where: dict[tuple[int, int], set[int]] = {}  # pair -> indices of the words that contain it
    for w, (word, freq) in enumerate(zip(words, freqs)):
        for pair in zip(word, word[1:]):
            pair_counts[pair] = pair_counts.get(pair, 0) + freq
            where.setdefault(pair, set()).add(w)
    # max-heap of (-count, left, right): pops the highest count, then the smallest pair
    heap = [(-n, a, b) for (a, b), n in pair_counts.items()]
    heapq.heapify(heap)
    token_bytes = [bytes([i]) for i in range(256)]
    token_ids = {t: i for i, t in enumerate(token_bytes)}
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n_merges, desc="merges", unit="merge", leave=False)
    while len(token_bytes) - 256 < n_merges and heap:
        neg, a, b = heapq.heappop(heap)
        pair = (a, b)
        count = pair_counts.get(pair, 0)
        if count != -neg:  # stale entry: the count went down since it was pushed
            if count > 0:
                heapq.heappush(heap, (-count, a, b))
            continue
        if count < 2:
            break
        merged_bytes = token_bytes[a] + token_bytes[b]
        new_id = token_ids.get(merged_bytes, len(token_bytes))
        if new_id == len(token_bytes):
            token_bytes.append(merged_bytes)
            token_ids[merged_bytes] = new_id
            if bar is not None:
                bar.update()
        changed: set[tuple[int, int]] = set()
        for w in where.pop(pair):
            word, freq = words[w], freqs[w]
            if len(word) < 2:
                continue
            merged = merge_pair(word, a, b, new_id)
            if len(merged) == len(word):
                continue
            for p in zip(word, word[1:]):
                pair_counts[p] -= freq
            for p in zip(merged, merged[1:]):
                pair_counts[p] = pair_counts.get(p, 0) + freq
                if new_id in p:
                    changed.add(p)
                    where.setdefault(p, set()).add(w)
            words[w] = merged
        pair_counts.pop(pair, None)
        for p in changed:  # only pairs with the new token can have grown: push them
            heapq.heappush(heap, (-pair_counts[p], p[0], p[1]))
    if bar is not None:
        bar.close()
    return token_bytes[256:]


def merge_pair(word: list[int], a: int, b: int, new_id: int) -> list[int]:
    """`word` with every (a, b), left to right, replaced by `new_id`."""
    out, i, n = [], 0, len(word)
    while i < n:
        if i < n - 1 and word[i] == a and word[i + 1] == b:
            out.append(new_id)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out


def load_tiktoken_ranks(path: str | Path) -> dict[bytes, int]:
    """A `.tiktoken` ranks file: one "base64-token rank" per line."""
    path = Path(path)
    try:
        lines = path.read_bytes().splitlines()
    except FileNotFoundError:
        raise QuillError(f"ranks file not found: {path}") from None
    except OSError as e:
        raise QuillError(f"cannot read ranks file {path}: {e.strerror}") from None
    ranks = {}
    for n, line in enumerate(lines):
        if not line:
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError:
            raise QuillError(f"{path}: line {n + 1} is not 'base64-token rank'") from None
    return ranks


def merges_from_ranks(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The merge list (left, right) that rebuilds `ranks`, in rank order (as merges.txt has it).

    Each multi-byte token is split by running BPE on its bytes with only the lower ranks.
    """
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) < 2:
            continue
        parts = [token[i : i + 1] for i in range(len(token))]
        while len(parts) > 2:
            best_rank, best_i = None, -1
            for i in range(len(parts) - 1):
                r = ranks.get(parts[i] + parts[i + 1])
                if r is not None and r < rank and (best_rank is None or r < best_rank):
                    best_rank, best_i = r, i
            if best_i < 0:
                break
            parts[best_i : best_i + 2] = [parts[best_i] + parts[best_i + 1]]
        if len(parts) != 2 or ranks.get(parts[0], rank) >= rank or ranks.get(parts[1], rank) >= rank:
            raise ValueError(f"token {token!r} (id {rank}) cannot be built from two lower-ranked tokens")
        merges.append((parts[0], parts[1]))
    return merges
