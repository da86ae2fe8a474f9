"""Sampling text from a trained model."""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.nn import functional as F

from .errors import QuillError
from .tokenizers import Tokenizer


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """One token id per row of `logits` (B, vocab): greedy at temperature 0, else sampled."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = F.softmax(logits.float(), dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)


@torch.no_grad()
def generate_ids(model: nn.Module, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Append `max_new_tokens` tokens to `idx` (B, T), cropping the context to block_size."""
    block_size = model.config.block_size
    for _ in range(max_new_tokens):
        context = idx[:, -block_size:]
        logits, _ = model(context)
        next_id = sample_next(logits[:, -1, :], temperature, top_k, generator)
        idx = torch.cat([idx, next_id], dim=1)
    return idx


def encode_prompt(tokenizer: Tokenizer, prompt: str, block_size: int) -> list[int]:
    ids = tokenizer.encode(prompt)
    if len(ids) > block_size:
        raise QuillError(
            f"prompt is {len(ids)} tokens long, longer than the model's context of {block_size}"
        )
    return ids


def generate(model: nn.Module, tokenizer: Tokenizer, prompt: str = "", max_new_tokens: int = 200,
             temperature: float = 1.0, top_k: int | None = None, seed: int | None = None) -> str:
    """Continue `prompt` and return the new text (the prompt not included)."""
    if temperature < 0:
        raise QuillError(f"temperature must be >= 0, got {temperature}")
    if max_new_tokens < 0:
        raise QuillError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    device = next(model.parameters()).device
    ids = encode_prompt(tokenizer, prompt, model.config.block_size)
    if not ids:
        # no prompt: start from a newline where the vocabulary has one, else from token 0
        try:
            ids = tokenizer.encode("\n")
        except QuillError:
            ids = []
        ids = ids[:1] or [0]
        start = 0
    else:
        start = len(ids)
    generator = torch.Generator(device=device)
    generator.manual_seed(seed if seed is not None else torch.seed())
    was_training = model.training
    model.eval()
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    out = generate_ids(model, idx, max_new_tokens, temperature, top_k, generator)
    model.train(was_training)
    return tokenizer.decode(out[0, start:].tolist())
