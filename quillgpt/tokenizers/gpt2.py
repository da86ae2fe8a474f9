"""GPT-2's own vocabulary: 50,257 tokens (50,000 merges + 256 bytes + <|endoftext|>).

The ranks come from `gpt2.tiktoken` in the cache directory (`$QUILL_CACHE`, default
~/.cache/quillgpt), downloaded once from OpenAI's canonical URL (tiktoken's `r50k_base`) and
checked against its sha256. Encoding with them is identical to GPT-2's (and tiktoken's).

    from quillgpt.tokenizers.gpt2 import gpt2_tokenizer
    tok = gpt2_tokenizer()
    tok.encode("Hello world")  # [15496, 995]
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

from ..download import cache_dir, fetch_cached
from ..errors import QuillError
from .bpe import ENDOFTEXT, GPT2_PATTERN, ByteBPETokenizer, load_tiktoken_ranks

GPT2_RANKS_URL = "https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken"
GPT2_RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
GPT2_RANKS_NAME = "gpt2.tiktoken"
GPT2_VOCAB_SIZE = 50257


def gpt2_ranks_path() -> Path:
    """`gpt2.tiktoken` in the cache directory, downloaded (sha256-checked) when absent."""
    path = cache_dir() / GPT2_RANKS_NAME
    hint = (f"copy GPT-2's ranks (OpenAI's r50k_base.tiktoken, sha256 {GPT2_RANKS_SHA256[:12]}...) "
            f"to {path}; $QUILL_CACHE sets the directory")
    return fetch_cached(GPT2_RANKS_NAME, GPT2_RANKS_URL, GPT2_RANKS_SHA256, hint)


@lru_cache(maxsize=4)
def _ranks(path: str, mtime_ns: int) -> dict[bytes, int]:
    data = Path(path).read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != GPT2_RANKS_SHA256:
        raise QuillError(f"{path} has sha256 {digest}, expected {GPT2_RANKS_SHA256} (GPT-2's "
                         f"r50k_base ranks); delete it to download it again")
    return load_tiktoken_ranks(path)


def gpt2_tokenizer(path: str | Path | None = None) -> ByteBPETokenizer:
    """GPT-2's tokenizer, from `path` or the cached `gpt2.tiktoken` (downloaded once)."""
    path = Path(path) if path is not None else gpt2_ranks_path()
    try:
        mtime = path.stat().st_mtime_ns
    except FileNotFoundError:
        raise QuillError(f"ranks file not found: {path}") from None
    ranks = _ranks(str(path), mtime)
    return ByteBPETokenizer(ranks, {ENDOFTEXT: len(ranks)}, GPT2_PATTERN, name="gpt2")
