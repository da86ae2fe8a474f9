"""quillgpt against llama.cpp on the same exported model (docs/export.md).

1. Decode speed (always): a GPT-2-small-shaped run (124M parameters: 12 layers, 12 heads, 768
   wide, context 1024, GPT-2's 50,257-token vocabulary; random weights: speed does not depend on
   them) exported with `quill export-gguf` as f32, bf16 and q8_0. Batch 1, greedy, a 16-token
   prompt, 128 new tokens: tokens/s of the decode steps (prefill excluded) in llama.cpp
   (node-llama-cpp 3.21.1's prebuilt CPU build, tests/llamacpp_harness.py) and in quillgpt
   (`--dtype` float32 / bfloat16 / int8, the matching precision), each with the share of the
   memory-bandwidth limit (read bandwidth, measured in the same run by benchmarks/generate.py's
   probe, divided by the bytes of weights one decode step reads). Contenders run in interleaved
   rounds; every figure is the median of --repeats rounds after one warm-up.
2. --quality RUN --held-out FILE: the run exported in every dtype. The first token where llama.cpp's
   greedy continuation (100 tokens) leaves quill's float32 and bfloat16 ones, and perplexity on
   FILE by llama.cpp's own scoring (windows of block_size, as `quill eval --stride block_size`)
   against quillgpt's.
3. --chat RUN --test FILE: held-out exact match of the SFT skill (docs/chat.md) in llama.cpp,
   through the chat template the file carries, against quillgpt's.

    flock /tmp/quill-bench.lock .venv/bin/python benchmarks/gguf.py --threads 2
    .venv/bin/python benchmarks/gguf.py --skip-speed --quality runs/shakespeare-char-cpu --held-out held_out.txt
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "benchmarks"]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # benchmarks.*, and the llama.cpp harness

import torch  # noqa: E402
from llamacpp_harness import LlamaCpp, perplexity, window_ops  # noqa: E402

from benchmarks.generate import GPT2_SMALL, decode_bytes, machine, read_bandwidth  # noqa: E402
from quillgpt import checkpoint as ckpt  # noqa: E402
from quillgpt.config import Config, ModelConfig, TrainConfig  # noqa: E402
from quillgpt.generate import generate_ids  # noqa: E402
from quillgpt.gguf_export import export_gguf  # noqa: E402
from quillgpt.model import GPT  # noqa: E402

PAIRS = (("f32", "float32"), ("bf16", "bfloat16"), ("q8_0", "int8"))  # llama.cpp file type, quill --dtype


def gpt2_small_run(root: Path) -> Path:
    """A run directory of GPT-2-small's shape with GPT-2's tokenizer and random weights."""
    from quillgpt.tokenizers.gpt2 import gpt2_tokenizer

    cfg = ModelConfig(**GPT2_SMALL)
    torch.manual_seed(0)
    run = root / "gpt2-small"
    run.mkdir()
    ckpt.save_config(Config(model=cfg, train=TrainConfig(tokenizer="gpt2")), run)
    gpt2_tokenizer().save(run / ckpt.TOKENIZER_FILE)
    ckpt.save_weights(GPT(cfg), run / ckpt.MODEL_FILE)
    return run


def gguf_decode_bytes(path: Path) -> int:
    """Bytes of a GGUF file's tensors one decode step reads: all but the position table (one row)."""
    import gguf

    return sum(int(t.n_bytes) for t in gguf.GGUFReader(path).tensors if t.name != "position_embd.weight")


def quill_decode_seconds(model: torch.nn.Module, prompt: list[int], n: int) -> float:
    """Seconds of n greedy decode steps after the prompt (the prefill-only call subtracted)."""
    idx = torch.tensor([prompt])
    t0 = time.perf_counter()
    generate_ids(model, idx, 1, temperature=0.0)
    t1 = time.perf_counter()
    generate_ids(model, idx, n + 1, temperature=0.0)
    return (time.perf_counter() - t1) - (t1 - t0)


def speed(args: argparse.Namespace, root: Path) -> None:
    bandwidth = read_bandwidth()
    run = gpt2_small_run(root)
    files = {f: export_gguf(run, root / f"gpt2-small-{f}.gguf", dtype=f).path for f, _ in PAIRS}
    models = {d: ckpt.load_run(run, dtype=d).model for _, d in PAIRS}
    prompt = torch.randint(0, GPT2_SMALL["vocab_size"], (16,), generator=torch.Generator().manual_seed(0)).tolist()
    llama = LlamaCpp(threads=args.threads)
    times: dict[str, list[float]] = {}
    for r in range(args.repeats + 1):  # round 0 warms up
        for f, d in PAIRS:
            got = llama.run(files[f], [{"op": "decode_speed", "ids": prompt, "n": args.tokens}], context=256)[0]
            s = quill_decode_seconds(models[d], prompt, args.tokens)
            if r:
                times.setdefault(f"llama.cpp {f}", []).append(got["seconds"] / got["tokens"])
                times.setdefault(f"quillgpt {d}", []).append(s / args.tokens)
        print(f"  round {r} of {args.repeats} done (round 0: warm-up)", flush=True)
    weights = {f"llama.cpp {f}": gguf_decode_bytes(files[f]) for f, _ in PAIRS}
    weights.update({f"quillgpt {d}": decode_bytes(models[d]) for _, d in PAIRS})
    print(f"\nGPT-2-small shape, batch 1, greedy, prompt 16, {args.tokens} new tokens (decode steps only), "
          f"{args.threads} threads; read bandwidth {bandwidth / 1e9:.1f} GB/s")
    print("| runtime, weights | weights read per token | tokens/s | share of the bandwidth limit | vs llama.cpp |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for f, d in PAIRS:
        base = 1 / statistics.median(times[f"llama.cpp {f}"])
        for name in (f"llama.cpp {f}", f"quillgpt {d}"):
            rate = 1 / statistics.median(times[name])
            print(f"| {name} | {weights[name] / 1e6:.0f} MB | {rate:.1f} | {rate * weights[name] / bandwidth:.0%} "
                  f"| {rate / base:.2f}x |")


def first_divergence(a: list[int], b: list[int]) -> int | str:
    i = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
    return f"none in {min(len(a), len(b))}" if i is None else i


def quality(args: argparse.Namespace, root: Path) -> None:
    from quillgpt.evaluate import evaluate_ids

    run = ckpt.load_run(args.quality)
    block = run.config.model.block_size
    ids = run.tokenizer.encode(Path(args.held_out).read_text(encoding="utf-8"))
    prompt = run.tokenizer.encode(args.prompt)
    quill = {d: generate_ids(ckpt.load_run(args.quality, dtype=d).model, torch.tensor([prompt]), 100,
                             temperature=0.0)[0, len(prompt):].tolist() for d in ("float32", "bfloat16")}
    quill_ppl = {d: evaluate_ids(ckpt.load_run(args.quality, dtype=d).model, ids, stride=block,
                                 progress=False).perplexity for d in ("float32", "bfloat16", "int8")}
    llama = LlamaCpp(threads=args.threads)
    print(f"\n{args.quality}: greedy continuation of {args.prompt!r}, 100 tokens; perplexity on {args.held_out} "
          f"({len(ids):,} tokens, windows of {block})")
    print("| llama.cpp file | first token differing from quill float32 | from quill bfloat16 | perplexity "
          "(llama.cpp) | vs f32 |")
    print("| --- | ---: | ---: | ---: | ---: |")
    ppl = {}
    for dtype in ("f32", "f16", "bf16", "q8_0"):
        path = export_gguf(run, root / f"q-{dtype}.gguf", dtype=dtype).path
        got = llama.run(path, [{"op": "greedy", "ids": prompt, "n": 100, "window": block}, *window_ops(ids, block)],
                        context=block)
        ppl[dtype] = perplexity(got[1:])[0]
        print(f"| {dtype} | {first_divergence(got[0]['ids'], quill['float32'])} | "
              f"{first_divergence(got[0]['ids'], quill['bfloat16'])} | {ppl[dtype]:.4f} | "
              f"{ppl[dtype] / ppl['f32'] - 1:+.2%} |")
    print("quillgpt's perplexity: " + ", ".join(f"{d} {p:.4f}" for d, p in quill_ppl.items()))


def chat_skill(args: argparse.Namespace, root: Path) -> None:
    from quillgpt.chat import exact_match, last_reply
    from quillgpt.conversations import read_conversations

    run = ckpt.load_run(args.chat)
    convs = read_conversations(args.test).conversations
    path = export_gguf(run, root / "chat.gguf").path
    ops, refs = [], []
    for c in convs:
        prompt, ref = last_reply(c)
        ops.append({"op": "chat", "messages": [{"role": m.role, "content": m.content} for m in prompt],
                    "max_tokens": len(run.tokenizer.encode_ordinary(ref)) + 8})
        refs.append(ref)
    got = LlamaCpp(threads=args.threads).run(path, ops, context=run.config.model.block_size, timeout=3600)
    llama_match = sum(g["text"] == ref for g, ref in zip(got, refs)) / len(refs)
    quill_match = exact_match(run.model, run.tokenizer, convs)
    print(f"\n{args.chat} on {args.test} ({len(convs)} conversations), greedy, held-out exact match")
    print(f"| runtime | exact match |\n| --- | ---: |\n| quillgpt | {quill_match:.1%} |\n"
          f"| llama.cpp (the file's template) | {llama_match:.1%} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2, help="threads for both runtimes")
    p.add_argument("--repeats", type=int, default=3, help="rounds after the warm-up (median)")
    p.add_argument("--tokens", type=int, default=128, help="new tokens per decode")
    p.add_argument("--skip-speed", action="store_true", help="leave out the decode-speed table")
    p.add_argument("--quality", metavar="RUN", help="a run to compare per dtype (needs --held-out)")
    p.add_argument("--held-out", metavar="FILE", help="text to score for --quality")
    p.add_argument("--prompt", default="ROMEO:", help="the greedy continuation's prompt for --quality")
    p.add_argument("--chat", metavar="RUN", help="an SFT run to compare held-out exact match (needs --test)")
    p.add_argument("--test", metavar="FILE", help="held-out conversations (.jsonl) for --chat")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(machine())
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_speed:
            speed(args, Path(tmp))
        if args.quality:
            quality(args, Path(tmp))
        if args.chat:
            chat_skill(args, Path(tmp))


if __name__ == "__main__":
    main()
