"""Generation speed: quillgpt's KV-cached decoding vs HF transformers and vs nanoGPT's loop.

Same random weights shape for all (6 layers, 6 heads, 384 wide, block 256, 65-token vocabulary:
10.7M parameters), batch 1, fp32, greedy decoding so every contender does the same work:

- within the context: a 16-token prompt + 200 new tokens, vs `GPT2LMHeadModel.generate`
  (its own KV cache) with the same shapes;
- crossing block_size: a 1-token prompt + 500 new tokens, vs the loop of nanoGPT's
  `GPT.generate` (recompute the context cropped to block_size at every step, no cache).

Time to first token (TTFT) = the same call with max_new_tokens=1 (prefill + one sample).
Every figure is the median of --repeats runs after one warm-up run.

    flock /tmp/quill-bench.lock .venv/bin/python benchmarks/generate.py
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

# benchmarks/tokenizers.py would shadow the `tokenizers` package that transformers imports
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository: benchmarks.machine

import torch  # noqa: E402

from benchmarks.machine import cpu_name  # noqa: E402
from quillgpt.config import ModelConfig  # noqa: E402
from quillgpt.generate import generate, generate_ids  # noqa: E402
from quillgpt.model import GPT  # noqa: E402
from quillgpt.tokenizers.char import CharTokenizer  # noqa: E402

SHAPE = dict(vocab_size=65, block_size=256, n_layer=6, n_head=6, n_embd=384)


def machine() -> str:
    cpu = cpu_name()
    return f"{cpu}; torch {torch.__version__}, {torch.get_num_threads()} threads; {platform.platform()}"


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


@torch.no_grad()
def nanogpt_generate(model: GPT, idx: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """nanoGPT's `GPT.generate` loop (greedy): crop to block_size, recompute, append."""
    block_size = model.config.block_size
    for _ in range(max_new_tokens):
        idx_cond = idx if idx.size(1) <= block_size else idx[:, -block_size:]
        logits, _ = model(idx_cond)
        idx_next = logits[:, -1, :].argmax(dim=-1, keepdim=True)
        idx = torch.cat((idx, idx_next), dim=1)
    return idx


def hf_model(cfg: ModelConfig):
    from transformers import GPT2Config, GPT2LMHeadModel

    hf_cfg = GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd,
                        n_layer=cfg.n_layer, n_head=cfg.n_head, resid_pdrop=0.0, embd_pdrop=0.0,
                        attn_pdrop=0.0, bos_token_id=0, eos_token_id=None, pad_token_id=0)
    return GPT2LMHeadModel(hf_cfg).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of the fast contenders")
    parser.add_argument("--slow-repeats", type=int, default=3, help="timed runs of the no-cache loops")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    cfg = ModelConfig(**SHAPE, dropout=0.0, bias=True)
    model = GPT(cfg).eval()
    hf = hf_model(cfg)
    g = torch.Generator().manual_seed(0)
    prompt16 = torch.randint(0, cfg.vocab_size, (1, 16), generator=g)
    prompt1 = prompt16[:, :1]
    tok = CharTokenizer([chr(ord("!") + i) for i in range(cfg.vocab_size)])
    text_prompt = tok.decode(prompt1[0].tolist())

    def hf_gen(idx: torch.Tensor, n: int):
        return lambda: hf.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=n,
                                   min_new_tokens=n, do_sample=False, pad_token_id=0)

    def ours(idx: torch.Tensor, n: int, **kw):
        return lambda: generate_ids(model, idx, n, temperature=0, **kw)

    # (name, baseline, new tokens, repeats, call for n tokens)
    n_in, n_cross = 200, 500
    base_in, base_cross = "HF GPT2LMHeadModel.generate (KV cache)", "nanoGPT generate loop (no cache, crop)"
    contenders: list[tuple[str, str | None, int, int, Callable]] = [
        (base_in, None, n_in, args.repeats, lambda n: hf_gen(prompt16, n)),
        ("quillgpt generate_ids (KV cache)", base_in, n_in, args.repeats, lambda n: ours(prompt16, n)),
        (base_cross, None, n_cross, args.slow_repeats,
         lambda n: lambda: nanogpt_generate(model, prompt1, n)),
        ("quillgpt generate_ids, overflow=shift (default)", base_cross, n_cross, args.repeats,
         lambda n: ours(prompt1, n)),
        ("quillgpt generate() text API, shift, T=0.8 top-k 200", base_cross, n_cross, args.repeats,
         lambda n: lambda: generate(model, tok, text_prompt, n, temperature=0.8, top_k=200, seed=0)),
        ("quillgpt generate_ids, overflow=slide (exact window)", base_cross, n_cross, args.slow_repeats,
         lambda n: ours(prompt1, n, overflow="slide")),
    ]
    print(f"model: {model.num_params() / 1e6:.1f}M parameters (nanoGPT count), {SHAPE}; "
          "fp32, batch 1, greedy", flush=True)
    # rounds: every contender once per round, so a change in machine load hits all of them alike
    times: dict[str, list[float]] = {c[0]: [] for c in contenders}
    ttfts: dict[str, list[float]] = {c[0]: [] for c in contenders}
    for *_, make in contenders:  # warm-up
        timed(make(20))
    for r in range(max(args.repeats, args.slow_repeats)):
        for name, _, n, repeats, make in contenders:
            if r < repeats:
                times[name].append(timed(make(n)))
                ttfts[name].append(timed(make(1)))
        print(f"  round {r + 1} done", flush=True)
    rows = [(name, baseline, n, statistics.median(times[name]), statistics.median(ttfts[name]))
            for name, baseline, n, _, _ in contenders]

    by_name = {r[0]: r for r in rows}
    print()
    print(f"machine: {machine()}")
    print(f"medians of {args.repeats} runs ({args.slow_repeats} for the no-cache loops), after one warm-up, "
          "in interleaved rounds")
    print()
    print("| contender | new tokens | median s | tokens/s | TTFT ms | speed vs baseline |")
    print("| --- | ---: | ---: | ---: | ---: | --- |")
    for name, baseline, n, t, ttft in rows:
        ratio = "baseline"
        if baseline:
            b = by_name[baseline]
            ratio = f"**{(n / t) / (b[2] / b[3]):.2f}x** {baseline.split(' (')[0]}"
        print(f"| {name} | {n} | {t:.3f} | {n / t:,.1f} | {ttft * 1e3:.1f} | {ratio} |")


if __name__ == "__main__":
    main()
