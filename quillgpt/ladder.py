"""The learning ladder: five language models, each one idea bigger than the last.

    bigram -> single-head -> multi-head -> block -> gpt

Read this file top to bottom; every rung is a lesson that says what it adds over the rung
before. All rungs take a `ModelConfig`, keep it as `.config`, and map token ids (B, T) to
next-token logits (B, T, vocab) with `forward(idx, targets=None) -> (logits, loss)`, exactly like
`quillgpt.model.GPT`, the fifth rung. So `--kind bigram` (or any rung) trains, checkpoints and
samples with the same Trainer, run directories and `quill sample` as the GPT does, and
`quill ladder` trains them side by side (see `quillgpt.ladder_run`).

The rungs are written plainly, as in Karpathy's "Let's build GPT" lecture: attention heads are
separate modules and attention is spelled out as a masked softmax. The GPT computes the same
thing fused and faster; what else it adds is listed on `LADDER` at the bottom.

Shapes in comments: B batch, T time (tokens), C channels (n_embd), V vocabulary, hs head size.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.nn import functional as F

from .config import ModelConfig


def lm_loss(logits: torch.Tensor, targets: torch.Tensor | None) -> torch.Tensor | None:
    """Mean cross-entropy of the next-token predictions, or None without targets."""
    if targets is None:
        return None
    return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)


def check_length(idx: torch.Tensor, cfg: ModelConfig) -> None:
    if idx.size(1) > cfg.block_size:
        raise ValueError(f"sequence of {idx.size(1)} tokens is longer than block_size {cfg.block_size}")


# --- rung 1: bigram ---------------------------------------------------------------------------

class Bigram(nn.Module):
    """Rung 1. The next token depends only on the current one: a (V, V) table of logits.

    Row `a` of the table holds the logits of every token that may follow token `a`. No context,
    no positions, no hidden layer. Training can at best reach the counted bigram statistics of
    the data: its loss floor is the conditional entropy H(next | current) (`bigram_entropy`).
    The table starts at zero, i.e. every next token equally likely (loss ln V).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.logits_table = nn.Embedding(cfg.vocab_size, cfg.vocab_size)
        nn.init.zeros_(self.logits_table.weight)

    def num_params(self) -> int:
        return self.logits_table.weight.numel()

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        check_length(idx, self.config)
        logits = self.logits_table(idx)  # (B, T, V): one row of the table per token
        return logits, lm_loss(logits, targets)


# --- rung 2: one head of self-attention -------------------------------------------------------

class Head(nn.Module):
    """One head of causal self-attention.

    Every token emits a query ("what am I looking for"), a key ("what do I contain") and a value
    ("what I pass on"). A token's output is the average of the values of itself and the tokens
    before it, weighted by softmax(query . key / sqrt(hs)). The mask hides the future: position t
    sees positions 0..t only, so the model cannot cheat by reading the token it must predict.
    """

    def __init__(self, cfg: ModelConfig, head_size: int):
        super().__init__()
        self.key = nn.Linear(cfg.n_embd, head_size, bias=False)
        self.query = nn.Linear(cfg.n_embd, head_size, bias=False)
        self.value = nn.Linear(cfg.n_embd, head_size, bias=False)
        self.register_buffer("tril", torch.tril(torch.ones(cfg.block_size, cfg.block_size)), persistent=False)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        k = self.key(x)  # (B, T, hs)
        q = self.query(x)  # (B, T, hs)
        v = self.value(x)  # (B, T, hs)
        weights = q @ k.transpose(-2, -1) * k.size(-1) ** -0.5  # (B, T, T): affinities
        weights = weights.masked_fill(self.tril[:T, :T] == 0, float("-inf"))  # no looking ahead
        weights = self.dropout(F.softmax(weights, dim=-1))  # each row sums to 1
        return weights @ v  # (B, T, hs)


class SingleHead(nn.Module):
    """Rung 2. Tokens talk to the tokens before them, through one attention head.

    Adds over the bigram: (1) a token embedding (V -> C) instead of a whole table row, (2) a
    position embedding, so the model knows where in the context each token stands (attention
    itself is order-blind), (3) one head of causal self-attention of size C, which mixes in
    information from every earlier token of the context, and (4) an LM head (C -> V) that turns
    the result into logits. The prediction now depends on up to `block_size` tokens, not one.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.position_embedding = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.body = self.make_body(cfg)  # embeddings (B, T, C) -> features (B, T, C)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size)

    def make_body(self, cfg: ModelConfig) -> nn.Module:
        """The part each later rung replaces; here one head of attention as wide as C."""
        return Head(cfg, cfg.n_embd)

    def num_params(self) -> int:
        """Parameters without the position embedding, as nanoGPT counts the GPT."""
        return sum(p.numel() for p in self.parameters()) - self.position_embedding.weight.numel()

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        check_length(idx, self.config)
        pos = torch.arange(idx.size(1), device=idx.device)  # (T,)
        x = self.token_embedding(idx) + self.position_embedding(pos)  # (B, T, C)
        x = self.body(x)  # (B, T, C): what each token gathered from its past
        logits = self.lm_head(x)  # (B, T, V)
        return logits, lm_loss(logits, targets)


# --- rung 3: several heads --------------------------------------------------------------------

class MultiHeadAttention(nn.Module):
    """`n_head` heads of size C / n_head side by side, concatenated, then projected (C -> C)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        head_size = cfg.n_embd // cfg.n_head
        self.heads = nn.ModuleList([Head(cfg, head_size) for _ in range(cfg.n_head)])
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.cat([head(x) for head in self.heads], dim=-1)  # (B, T, n_head * hs) = (B, T, C)
        return self.dropout(self.proj(x))


class MultiHead(SingleHead):
    """Rung 3. Several smaller heads instead of one big one, plus an output projection.

    Adds over the single head: `n_head` independent heads of size C / n_head (together as wide
    as the single head), so each token can look for several things at once -- one head may track
    the previous letter, another the start of the word, another the speaker's name. Their outputs
    are concatenated and mixed by a learned projection (C -> C).
    """

    def make_body(self, cfg: ModelConfig) -> nn.Module:
        return MultiHeadAttention(cfg)


# --- rung 4: transformer blocks ---------------------------------------------------------------

class FeedForward(nn.Module):
    """Per-token computation: widen to 4C, ReLU, project back to C."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias),
            nn.ReLU(),
            nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias),
            nn.Dropout(cfg.dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class TransformerBlock(nn.Module):
    """Communication (attention) then computation (feed-forward), each added to a residual stream."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attention = MultiHeadAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.ln1(x))  # tokens gather from each other
        x = x + self.feed_forward(self.ln2(x))  # each token thinks about what it gathered
        return x


class Blocks(SingleHead):
    """Rung 4. Attention and a feed-forward network, with residuals and LayerNorm, stacked.

    Adds over multi-head attention: (1) a feed-forward network after the attention, so each token
    can compute on what it gathered (attention only averages), (2) residual connections, x + f(x),
    which give gradients a straight path from the loss back to the embeddings, (3) LayerNorm
    before each part and at the end, which keeps activations at a steady scale, and (4) `n_layer`
    such blocks stacked -- (2) and (3) are what make stacking trainable.
    """

    def make_body(self, cfg: ModelConfig) -> nn.Module:
        blocks = [TransformerBlock(cfg) for _ in range(cfg.n_layer)]
        return nn.Sequential(*blocks, nn.LayerNorm(cfg.n_embd, bias=cfg.bias))  # a final LayerNorm


# --- the ladder -------------------------------------------------------------------------------

# Rung 5, `gpt`, is `quillgpt.model.GPT`: the same stack of blocks as rung 4, plus what GPT-2
# adds: all heads' query/key/value in one matrix multiply and fused (flash) attention, GELU
# instead of ReLU, dropout on embeddings and residual branches, the LM head sharing its weights
# with the token embedding, and GPT-2's initialisation (normal, std 0.02, with the residual
# projections scaled down by 1/sqrt(2 * n_layer)).
LADDER: dict[str, type[nn.Module]] = {
    "bigram": Bigram,
    "single-head": SingleHead,
    "multi-head": MultiHead,
    "block": Blocks,
}

RUNGS = [*LADDER, "gpt"]  # in order, the GPT last


def bigram_entropy(tokens: torch.Tensor | list[int], vocab_size: int) -> float:
    """H(next | current) in nats, from counting the bigrams of `tokens`.

    The lowest mean cross-entropy any bigram model can reach on these tokens: the best table
    holds log p(b | a) = log count(a, b) / count(a, .).
    """
    tokens = torch.as_tensor(tokens, dtype=torch.long)
    pairs = tokens[:-1] * vocab_size + tokens[1:]
    counts = torch.bincount(pairs, minlength=vocab_size * vocab_size).view(vocab_size, vocab_size).double()
    row_totals = counts.sum(dim=1, keepdim=True)
    p_next = counts / row_totals.clamp(min=1)  # p(b | a)
    log_p = torch.where(counts > 0, p_next.log(), torch.zeros_like(p_next))
    return float(-(counts * log_p).sum() / counts.sum())
