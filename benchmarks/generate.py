"""Generation speed: float32 / bfloat16 / int8 weights against HF transformers, the machine's
memory-bandwidth limit and nanoGPT's no-cache loop.

1. Read bandwidth: the sum of a 1 GiB float32 tensor (median of 5; benchmarks/bandwidth.py), in
   the same run.
2. GPT-2-small shape (124M parameters: 12 layers, 12 heads, 768 wide, block 1024, vocabulary
   50257; random weights, the same in HF and in quillgpt through the import-hf conversion),
   greedy, a 16-token prompt and 128 new tokens: HF `GPT2LMHeadModel.generate` (fp32, its KV
   cache) and quillgpt's `generate_ids` (the decode engine) in float32, bfloat16 and int8
   (`set_inference_dtype`).
   Batch 1: tokens/s, time to first token (TTFT: the same call with 1 new token) and the share
   of the bandwidth limit (bandwidth / bytes of weights one decode step reads). Batch 8 (eight
   16-token prompts, the server's batching): tokens/s of all rows together.
3. The 10.7M model (6 layers, 6 heads, 384 wide, block 256, 65-token vocabulary), where
   per-operation overhead dominates: 16 + 200 tokens vs HF, and 1 + 500 tokens (crossing
   block_size) vs nanoGPT's `generate` loop (no cache, context cropped and recomputed).

Contenders run in interleaved rounds (a change in machine load hits all alike); every figure
is the median of --repeats rounds after one warm-up; ratios compare figures of the same run.

    flock /tmp/quill-bench.lock .venv/bin/python benchmarks/generate.py --threads 2
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

# benchmarks/tokenizers.py would shadow the `tokenizers` package that transformers imports
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository: benchmarks.machine

import torch  # noqa: E402

from benchmarks.bandwidth import read_bandwidth  # noqa: E402
from benchmarks.machine import cpu_name  # noqa: E402
from quillgpt.config import ModelConfig  # noqa: E402
from quillgpt.generate import generate_ids  # noqa: E402
from quillgpt.hf import state_dict_from_hf  # noqa: E402
from quillgpt.inference import Int8Embedding, set_inference_dtype  # noqa: E402
from quillgpt.model import GPT  # noqa: E402
from quillgpt.optim import native_bfloat16  # noqa: E402

GPT2_SMALL = dict(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768)
SMALL = dict(vocab_size=65, block_size=256, n_layer=6, n_head=6, n_embd=384)


def machine() -> str:
    bf16 = "native bf16" if native_bfloat16(torch.device("cpu")) else "no native bf16"
    return (f"{cpu_name()} ({bf16}); torch {torch.__version__}, {torch.get_num_threads()} threads; "
            f"{platform.platform()}")


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def decode_bytes(model: torch.nn.Module) -> int:
    """Bytes of weights one decode step reads: every floating-point or int8 parameter and buffer
    once, except the embedding tables, of which a step reads one row (a tied LM head reads its
    table, or its packed copy, as the head)."""
    embeddings = (torch.nn.Embedding, Int8Embedding)
    seen, total = set(), 0
    for module in model.modules():
        if isinstance(module, embeddings):
            continue
        for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
            if id(t) in seen or t.dtype == torch.bool:  # HF's causal-mask buffers are not weights
                continue
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def hf_model(cfg: ModelConfig):
    from transformers import GPT2Config, GPT2LMHeadModel

    hf_cfg = GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd,
                        n_layer=cfg.n_layer, n_head=cfg.n_head, resid_pdrop=0.0, embd_pdrop=0.0,
                        attn_pdrop=0.0, bos_token_id=0, eos_token_id=None, pad_token_id=0)
    return GPT2LMHeadModel(hf_cfg).eval()


def quill_from_hf(hf, cfg: ModelConfig, dtype: str) -> GPT:
    """The HF model's weights in our GPT (as `quill import-hf` converts them), in `dtype`."""
    model = GPT(cfg).eval()
    model.load_state_dict(state_dict_from_hf(hf.state_dict(), cfg), strict=False)
    set_inference_dtype(model, dtype)
    return model


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


def hf_generate(hf, idx: torch.Tensor) -> Callable[[int], Callable[[], object]]:
    return lambda n: lambda: hf.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=n,
                                         min_new_tokens=n, do_sample=False, pad_token_id=0)


def quill_generate(model: GPT, idx: torch.Tensor, **kw) -> Callable[[int], Callable[[], object]]:
    return lambda n: lambda: generate_ids(model, idx, n, temperature=0, **kw)


@dataclass
class Contender:
    name: str
    make: Callable[[int], Callable[[], object]]  # new tokens -> a call generating them
    new_tokens: int
    rows: int = 1
    ttft: bool = True
    times: list[float] = field(default_factory=list)
    ttfts: list[float] = field(default_factory=list)

    def tokens_per_s(self) -> float:
        return self.rows * self.new_tokens / statistics.median(self.times)

    def ttft_ms(self) -> float:
        return 1e3 * statistics.median(self.ttfts) if self.ttfts else float("nan")


def run_rounds(contenders: list[Contender], repeats: int, label: str) -> None:
    for c in contenders:  # warm-up
        c.make(4)()
    for r in range(repeats):
        for c in contenders:
            c.times.append(timed(c.make(c.new_tokens)))
            if c.ttft:
                c.ttfts.append(timed(c.make(1)))
        print(f"  {label}: round {r + 1} of {repeats} done", flush=True)


def gpt2_section(repeats: int, bandwidth: float) -> None:
    cfg = ModelConfig(**GPT2_SMALL)
    torch.manual_seed(0)
    hf = hf_model(cfg)
    models = {dtype: quill_from_hf(hf, cfg, dtype) for dtype in ("float32", "bfloat16", "int8")}
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, cfg.vocab_size, (1, 16), generator=g)
    prompts8 = torch.randint(0, cfg.vocab_size, (8, 16), generator=g)
    with torch.no_grad():
        same = torch.equal(hf_generate(hf, prompt)(32)(), quill_generate(models["float32"], prompt)(32)())
    single = [Contender("HF generate, float32", hf_generate(hf, prompt), 128)]
    single += [Contender(f"quillgpt, {d}", quill_generate(m, prompt), 128) for d, m in models.items()]
    batch = [Contender("HF generate, float32", hf_generate(hf, prompts8), 128, rows=8, ttft=False)]
    batch += [Contender(f"quillgpt, {d}", quill_generate(m, prompts8), 128, rows=8, ttft=False)
              for d, m in models.items()]
    run_rounds(single + batch, repeats, "GPT-2 small")
    bytes_per_token = {"HF generate, float32": decode_bytes(hf)}
    bytes_per_token.update({f"quillgpt, {d}": decode_bytes(m) for d, m in models.items()})
    base = single[0].tokens_per_s()
    print(f"\nGPT-2-small shape ({sum(p.numel() for p in hf.parameters()) / 1e6:.0f}M parameters, random "
          f"weights), greedy, prompt 16, 128 new tokens; HF and quillgpt float32 give the same tokens: {same}")
    print(f"read bandwidth {bandwidth / 1e9:.1f} GB/s (sum of a 1 GB tensor)\n")
    print("| batch 1 | weights read per token | bandwidth limit | tokens/s | share of the limit | TTFT ms "
          "| vs HF float32 |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for c in single:
        limit = bandwidth / bytes_per_token[c.name]
        tps = c.tokens_per_s()
        print(f"| {c.name} | {bytes_per_token[c.name] / 1e6:.0f} MB | {limit:.0f} tok/s | {tps:.1f} | "
              f"{tps / limit:.0%} | {c.ttft_ms():.0f} | **{tps / base:.2f}x** |")
    base8 = batch[0].tokens_per_s()
    print("\n| batch 8 | tokens/s (all rows) | vs HF float32 batch 8 | vs the same weights at batch 1 |")
    print("| --- | ---: | ---: | ---: |")
    for c, one in zip(batch, single):
        print(f"| {c.name} | {c.tokens_per_s():.1f} | {c.tokens_per_s() / base8:.2f}x | "
              f"{c.tokens_per_s() / one.tokens_per_s():.2f}x |")


def small_section(repeats: int, slow_repeats: int) -> None:
    cfg = ModelConfig(**SMALL)
    torch.manual_seed(0)
    hf = hf_model(cfg)
    models = {dtype: quill_from_hf(hf, cfg, dtype) for dtype in ("float32", "bfloat16", "int8")}
    g = torch.Generator().manual_seed(0)
    prompt16 = torch.randint(0, cfg.vocab_size, (1, 16), generator=g)
    prompt1 = prompt16[:, :1]
    fp32 = models["float32"]
    within = [Contender("HF generate (KV cache), float32", hf_generate(hf, prompt16), 200)]
    within += [Contender(f"quillgpt generate_ids, {d}", quill_generate(m, prompt16), 200) for d, m in models.items()]
    nocache = Contender("nanoGPT generate loop (no cache, crop), float32",
                        lambda n: lambda: nanogpt_generate(fp32, prompt1, n), 500, ttft=False)
    crossing = [Contender(f"quillgpt generate_ids, overflow=shift, {d}", quill_generate(m, prompt1), 500,
                          ttft=False) for d, m in models.items()]
    run_rounds(within + crossing, repeats, "10.7M model")
    run_rounds([nocache], slow_repeats, "10.7M model, no-cache loop")
    print(f"\n10.7M model ({fp32.num_params() / 1e6:.1f}M parameters, {SMALL}), greedy, batch 1\n")
    print("| contender | new tokens | tokens/s | TTFT ms | vs baseline |")
    print("| --- | ---: | ---: | ---: | --- |")
    for group, base, base_name in ((within, within[0], "HF"), ([nocache, *crossing], nocache, "no-cache loop")):
        for c in group:
            ratio = "baseline" if c is base else f"**{c.tokens_per_s() / base.tokens_per_s():.2f}x** {base_name}"
            print(f"| {c.name} | {c.new_tokens} | {c.tokens_per_s():,.1f} | {c.ttft_ms():.1f} | {ratio} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds of the fast contenders")
    parser.add_argument("--slow-repeats", type=int, default=3, help="timed rounds of the no-cache loop")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--only", choices=["gpt2", "small"], default=None, help="run one section")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"machine: {machine()}", flush=True)
    bandwidth = read_bandwidth()
    if args.only in (None, "gpt2"):
        gpt2_section(args.repeats, bandwidth)
    if args.only in (None, "small"):
        small_section(args.repeats, args.slow_repeats)
    print(f"\nmachine: {machine()}; read bandwidth {read_bandwidth() / 1e9:.1f} GB/s at the end")


if __name__ == "__main__":
    main()
