"""Tokenizer speed: BPE training (quill vs HF tokenizers vs a naive trainer) and encoding.

    flock /tmp/quill-bench.lock .venv/bin/python benchmarks/tokenizers.py [--repeats 5] [--data FILE]

1. Training a 4096-token byte-level BPE on tiny-shakespeare, as whole commands (process start,
   reading, training, saving): `quill tokenizer train` vs a script training HF `tokenizers`
   with the same settings. Target: quill <= 4x HF.
2. Time per merge: the incremental trainer vs a naive trainer that recounts every pair over
   the distinct chunks at every merge (minbpe's approach, already helped by chunk dedup), on
   the same first merges.
3. Encoding tiny-shakespeare with GPT-2's vocabulary: tiktoken itself vs our fast path (tiktoken
   built from our ranks) vs our pure-Python reference. Targets: fast >= 0.9x tiktoken,
   pure Python >= 1 MB/s.

Medians over --repeats runs; baselines measured in the same run. Needs tiktoken and tokenizers.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# this file is named tokenizers.py: keep its folder off the path so `import tokenizers` is HF's
sys.path = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "benchmarks"]
sys.path.insert(0, str(ROOT))

from benchmarks.machine import cpu_name  # noqa: E402
from benchmarks.script import run_main, text_file  # noqa: E402
from quillgpt.tokenizers.bpe import (  # noqa: E402
    ENDOFTEXT,
    GPT2_PATTERN,
    count_chunks,
    learn_merges,
    merge_pair,
)
from quillgpt.tokenizers.gpt2 import gpt2_tokenizer  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"

HF_SCRIPT = """
import sys
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
tok = Tokenizer(models.BPE())
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tok.decoder = decoders.ByteLevel()
trainer = trainers.BpeTrainer(vocab_size=int(sys.argv[2]), special_tokens=["<|endoftext|>"],
                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                              min_frequency=2, show_progress=False)
tok.train([sys.argv[1]], trainer)
tok.save(sys.argv[3])
"""


def machine() -> str:
    cpu = cpu_name()
    import tiktoken
    import tokenizers

    return (f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, "
            f"tiktoken {tiktoken.__version__}, tokenizers {tokenizers.__version__}")


def time_command(argv: list[str], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(argv, check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def naive_merges(chunk_counts, n_merges: int) -> list[bytes]:
    """Recount every pair over all distinct chunks at every merge (the baseline)."""
    words = [list(c) for c in chunk_counts]
    freqs = list(chunk_counts.values())
    vocab = [bytes([i]) for i in range(256)]
    for _ in range(n_merges):
        pairs: dict[tuple[int, int], int] = {}
        for word, freq in zip(words, freqs):
            for p in zip(word, word[1:]):
                pairs[p] = pairs.get(p, 0) + freq
        (a, b), _ = min(pairs.items(), key=lambda kv: (-kv[1], kv[0]))
        vocab.append(vocab[a] + vocab[b])
        words = [merge_pair(w, a, b, len(vocab) - 1) for w in words]
    return vocab[256:]


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="shakespeare",
                        help="a text file; shakespeare (default): tiny-shakespeare from quill's cache")
    parser.add_argument("--ranks", default=str(SHARED / "gpt2.tiktoken"), help="GPT-2 ranks file")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--naive-merges", type=int, default=20)
    args = parser.parse_args()
    args.data = str(text_file(args.data))
    text = Path(args.data).read_text(encoding="utf-8")
    n_bytes = len(text.encode("utf-8"))
    print(f"machine: {machine()}")
    print(f"data: {args.data} ({n_bytes:,} bytes); medians of {args.repeats} runs\n")

    # 1. whole commands
    with tempfile.TemporaryDirectory() as tmp:
        quill = [sys.executable, "-m", "quillgpt", "tokenizer", "train", "--kind", "bpe",
                 "--vocab-size", str(args.vocab_size), "--data", args.data,
                 "--out", f"{tmp}/quill.json", "--overwrite", "--no-progress"]
        hf = [sys.executable, "-c", HF_SCRIPT, args.data, str(args.vocab_size), f"{tmp}/hf.json"]
        t_hf = time_command(hf, args.repeats)
        t_quill = time_command(quill, args.repeats)
    print(f"## BPE training, vocab {args.vocab_size}, whole commands\n")
    print("| command | median s | vs HF tokenizers |")
    print("| --- | ---: | ---: |")
    print(f"| HF tokenizers (Rust) script | {t_hf:.2f} | 1.00x |")
    print(f"| quill tokenizer train | {t_quill:.2f} | {t_quill / t_hf:.2f}x (target <= 4x) |\n")

    # 2. per merge: incremental vs naive recount, on the same chunk counts
    counts = count_chunks(text, GPT2_PATTERN, [ENDOFTEXT])
    k = args.naive_merges
    assert learn_merges(counts, k) == naive_merges(counts, k), "incremental != naive"
    t_naive = median_time(lambda: naive_merges(counts, k), max(1, args.repeats // 2))
    # the incremental trainer counts all pairs once before the first merge: time that apart
    t_setup = median_time(lambda: learn_merges(counts, 0), args.repeats)
    t_inc_k = median_time(lambda: learn_merges(counts, k), args.repeats) - t_setup
    n_all = args.vocab_size - 257
    t_inc_all = median_time(lambda: learn_merges(counts, n_all), args.repeats) - t_setup
    print(f"## Time per merge ({len(counts):,} distinct chunks; the incremental trainer's one-off "
          f"initial pair count, {t_setup:.3f} s, is left out)\n")
    print("| trainer | merges | median s | ms per merge | speed-up |")
    print("| --- | ---: | ---: | ---: | ---: |")
    print(f"| naive full recount | first {k} | {t_naive:.3f} | {1000 * t_naive / k:.2f} | 1x |")
    print(f"| incremental (quill) | first {k} | {t_inc_k:.3f} | {1000 * t_inc_k / k:.2f} | "
          f"{t_naive / t_inc_k:.0f}x |")
    print(f"| incremental (quill) | all {n_all} | {t_inc_all:.3f} | {1000 * t_inc_all / n_all:.3f} | "
          f"{(t_naive / k) / (t_inc_all / n_all):.0f}x |\n")

    # 3. encoding with GPT-2's vocabulary
    import tiktoken
    import tiktoken.load

    reference = tiktoken.Encoding("gpt2-reference", pat_str=GPT2_PATTERN,
                                  mergeable_ranks=tiktoken.load.load_tiktoken_bpe(args.ranks),
                                  special_tokens={ENDOFTEXT: 50256})
    ours = gpt2_tokenizer(args.ranks)
    expected = reference.encode(text, allowed_special="all")
    assert ours.encode(text) == expected and ours.encode_python(text) == expected
    t_tik = median_time(lambda: reference.encode(text, allowed_special="all"), args.repeats)
    t_fast = median_time(lambda: ours.encode(text), args.repeats)
    # pure Python from a cold cache each run: a fresh tokenizer (ranks already parsed)
    t_py = median_time(lambda: gpt2_tokenizer(args.ranks).encode_python(text), args.repeats)
    mb = n_bytes / 1e6
    print(f"## GPT-2 encoding of the data ({len(expected):,} tokens)\n")
    print("| encoder | median s | MB/s | vs tiktoken |")
    print("| --- | ---: | ---: | ---: |")
    print(f"| tiktoken Encoding.encode | {t_tik:.3f} | {mb / t_tik:.1f} | 1.00x |")
    print(f"| quill fast path (tiktoken from our ranks) | {t_fast:.3f} | {mb / t_fast:.1f} | "
          f"{t_tik / t_fast:.2f}x (target >= 0.9x) |")
    print(f"| quill pure Python (cold cache) | {t_py:.3f} | {mb / t_py:.2f} | {t_tik / t_py:.2f}x "
          f"(target >= 1 MB/s) |")


if __name__ == "__main__":
    run_main(main)
