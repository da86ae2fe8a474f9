"""The GPT, read top to bottom: attention -> MLP -> Block -> GPT.

By default it is GPT-2's architecture: token and learned position embeddings, `n_layer`
pre-LayerNorm blocks of causal multi-head self-attention and a 4x GELU MLP, each added back to
the residual stream, a final LayerNorm and an LM head that shares its weights with the token
embedding. ModelConfig's speedrun options (rope, qk_norm, norm, activation, tie_embeddings,
zero_init, logit_softcap; docs/speedrun.md) swap single pieces for the modern ones.

Shapes in comments: B batch, T time (tokens), C channels (n_embd), nh heads, hs head size.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch.nn import functional as F

from .config import ModelConfig


def rope_tables(positions: torch.Tensor, head_size: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotary angles pos * base^(-2i/hs), i < hs/2: (..., T, hs/2) for positions (..., T)."""
    inv_freq = base ** (-torch.arange(0, head_size, 2, device=positions.device, dtype=torch.float32) / head_size)
    angles = positions.float()[..., None] * inv_freq  # (..., T, hs/2)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each pair (x_i, x_{i+hs/2}) of x (..., hs) by its angle (RoFormer, Su et al. 2021);
    cos and sin (..., hs/2) broadcast against x's leading dimensions.

    A query at position m and a key at position n then meet as q R(m)^T R(n) k = q R(n - m) k:
    attention scores depend only on the relative position n - m.
    """
    x1, x2 = x.float().chunk(2, dim=-1)  # (..., hs/2) each
    out = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.type_as(x)


def make_norm(cfg: ModelConfig) -> nn.Module:
    """LayerNorm (GPT-2) or RMSNorm (no mean subtraction, no bias: cheaper; Zhang & Sennrich 2019)."""
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(cfg.n_embd)
    return nn.LayerNorm(cfg.n_embd, bias=cfg.bias)


class KVCache:
    """Preallocated keys and values of every layer, for decoding one token at a time.

    Slots 0..pos-1 hold the keys/values of the tokens seen so far (B, nh, block_size, hs per
    layer). Rows of a batch may be left-padded to a common length: `pad[b]` slots at the start
    of row b are padding, masked out of attention, and row b's positions count from its first
    real token. The buffers never grow or move, so the decode step has fixed shapes, and a
    decode step allocates nothing here: its position ids and attention mask are views into
    tables built once.
    """

    def __init__(self, cfg: ModelConfig, batch_size: int, device: torch.device | str,
                 dtype: torch.dtype = torch.float32, pad: torch.Tensor | None = None):
        hs = cfg.n_embd // cfg.n_head
        shape = (cfg.n_layer, batch_size, cfg.n_head, cfg.block_size, hs)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.k_layers, self.v_layers = self.k.unbind(0), self.v.unbind(0)  # views, one per layer
        self.capacity = cfg.block_size
        self.pos = 0  # slots filled
        self.pad = pad if pad is not None and bool(pad.any()) else None  # (B,) or None
        self.mask: torch.Tensor | None = None  # attention mask of the forward in progress
        self.slots = torch.arange(cfg.block_size, device=device)  # (capacity,)
        if self.pad is not None:
            # per row: the position id of every slot, and which slots hold real tokens
            self.row_positions = (self.slots[None, :] - self.pad[:, None]).clamp(min=0)  # (B, capacity)
            self.real = (self.slots[None, :] >= self.pad[:, None])[:, None, None, :]  # (B, 1, 1, capacity)

    def start(self, T: int) -> torch.Tensor:
        """Begin a forward of T new tokens: set its attention mask; their position ids, (T,) or
        (B, T) when rows are padded. ValueError past the capacity (block_size)."""
        if self.pos + T > self.capacity:
            raise ValueError(f"sequence of {self.pos + T} tokens is longer than block_size {self.capacity}")
        self.mask = self.attn_mask(T)
        if self.pad is None:
            return self.slots[self.pos : self.pos + T]
        return self.row_positions[:, self.pos : self.pos + T]

    def advance(self, T: int) -> None:
        """The forward is done: its T tokens are in the cache."""
        self.pos += T

    def attn_mask(self, T: int) -> torch.Tensor | None:
        """Which of slots 0..pos+T-1 each of the next T queries may see; None = plain causal."""
        end = self.pos + T
        if self.pad is None and (T == 1 or self.pos == 0):
            return None  # decode sees every filled slot; a fresh prefill is plainly causal
        if T == 1:
            return self.real[..., :end]  # decode: a real token sees every real slot so far
        q = self.slots[self.pos : end, None]  # (T, 1)
        k = self.slots[None, :end]  # (1, Tk)
        mask = k <= q  # (T, Tk) causal
        if self.pad is not None:
            # padding is never seen, except by itself (a row with nothing to see gives NaN)
            mask = mask & (self.real[..., :end] | (k == q))  # (B, 1, T, Tk)
        return mask

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this layer's new keys/values (B, nh, T, hs); return all filled slots."""
        T, end = k.size(2), self.pos + k.size(2)
        k_all, v_all = self.k_layers[layer], self.v_layers[layer]  # (B, nh, block_size, hs)
        k_all.narrow(2, self.pos, T).copy_(k)
        v_all.narrow(2, self.pos, T).copy_(v)
        return k_all.narrow(2, 0, end), v_all.narrow(2, 0, end)


class SlotCache:
    """Keys and values of up to `slots` sequences that each have their own length: the cache
    of the decode engine (quillgpt.engine), where rows join and leave a running batch.

    Each sequence lives in one slot (n_layer, slots, nh, block_size, hs), allocated once; the
    engine keeps its running rows in slots 0..n-1 and says how many tokens each holds. A forward
    takes a view: `prefill(slots, length)` for new tokens of rows that all hold `length` tokens
    (any number of tokens per row: a prompt, or a chunk of one), `decode(lengths)` for one new
    token in each of slots 0..n-1, each at its own length (attention masks the slots past it).
    """

    def __init__(self, cfg: ModelConfig, slots: int, device: torch.device | str,
                 dtype: torch.dtype = torch.float32):
        self.capacity = cfg.block_size
        self.shape = (cfg.n_layer, slots, cfg.n_head, cfg.block_size, cfg.n_embd // cfg.n_head)
        self.k = torch.zeros(self.shape, device=device, dtype=dtype)
        self.v = torch.zeros(self.shape, device=device, dtype=dtype)
        self.index = torch.arange(cfg.block_size, device=device)  # (capacity,): slot positions

    @staticmethod
    def bytes_per_slot(cfg: ModelConfig, dtype: torch.dtype) -> int:
        """Memory of one sequence's keys and values at full length."""
        return 2 * cfg.n_layer * cfg.block_size * cfg.n_embd * torch.empty((), dtype=dtype).element_size()

    @property
    def slots(self) -> int:
        return self.shape[1]

    def grow(self, slots: int) -> None:
        """Room for `slots` sequences; those held so far keep their place."""
        if slots <= self.slots:
            return
        shape = (self.shape[0], slots, *self.shape[2:])
        k = torch.zeros(shape, device=self.k.device, dtype=self.k.dtype)
        v = torch.zeros(shape, device=self.v.device, dtype=self.v.dtype)
        k[:, : self.slots].copy_(self.k)
        v[:, : self.slots].copy_(self.v)
        self.k, self.v, self.shape = k, v, shape

    def copy(self, src: int, dst: int, length: int) -> None:
        """Slot `dst` holds the first `length` tokens of slot `src` (a shared prompt, a move)."""
        self.k[:, dst, :, :length].copy_(self.k[:, src, :, :length])
        self.v[:, dst, :, :length].copy_(self.v[:, src, :, :length])

    def prefill(self, slots: list[int], length: int) -> PrefillView:
        return PrefillView(self, slots, length)

    def decode(self, lengths: list[int]) -> DecodeView:
        return DecodeView(self, lengths)

    def step(self, lengths: list[int], chunks: list[tuple[int, int]]) -> StepView:
        return StepView(self, lengths, chunks)


class PrefillView:
    """T new tokens for each of `slots`, which all hold `length` tokens (see SlotCache).

    Fresh rows (`length` 0) may sit in any slots; rows that continue must be in consecutive
    slots."""

    def __init__(self, cache: SlotCache, slots: list[int], length: int):
        self.cache, self.length, self.mask = cache, length, None
        self.first = slots[0] if slots == list(range(slots[0], slots[0] + len(slots))) else None
        if self.first is None and length:
            raise ValueError("rows that continue a prefill must be in consecutive slots")
        self.rows = torch.tensor(slots, device=cache.index.device) if self.first is None else None

    def start(self, T: int) -> torch.Tensor:
        L = self.length
        if L + T > self.cache.capacity:
            raise ValueError(f"sequence of {L + T} tokens is longer than block_size {self.cache.capacity}")
        if L:  # query i (at position L + i) sees the slots up to its own
            self.mask = self.cache.index[None, : L + T] <= self.cache.index[L : L + T, None]
        return self.cache.index[L : L + T]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        kc, vc = self.cache.k[layer], self.cache.v[layer]
        L, B, T = self.length, k.size(0), k.size(2)
        if self.first is None:
            kc[self.rows, :, :T] = k
            vc[self.rows, :, :T] = v
            return k, v
        rows = slice(self.first, self.first + B)
        kc[rows, :, L : L + T].copy_(k)
        vc[rows, :, L : L + T].copy_(v)
        if not L:
            return k, v  # a fresh prompt attends to its own keys alone
        return kc[rows, :, : L + T], vc[rows, :, : L + T]

    def advance(self, T: int) -> None:
        pass  # the engine counts each row's tokens


class DecodeView:
    """One new token in each of slots 0..n-1, slot b holding `lengths[b]` tokens (see SlotCache)."""

    def __init__(self, cache: SlotCache, lengths: list[int]):
        self.cache, self.n, self.mask = cache, len(lengths), None
        self.end = max(lengths) + 1  # keys that some row sees
        self.uniform = lengths[0] if min(lengths) == self.end - 1 else None  # one length for all
        if self.uniform is None:
            device = cache.index.device
            self.lengths = torch.tensor(lengths, device=device)
            self.rows = torch.arange(self.n, device=device)

    def start(self, T: int) -> torch.Tensor:
        if T != 1 or self.end > self.cache.capacity:
            raise ValueError(f"a decode step takes 1 token per row within block_size {self.cache.capacity}")
        if self.uniform is not None:
            return self.cache.index[self.uniform : self.end]  # (1,): every row at one position
        self.mask = (self.cache.index[None, : self.end] <= self.lengths[:, None])[:, None, None, :]
        return self.lengths[:, None]  # (n, 1)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        kc, vc = self.cache.k[layer], self.cache.v[layer]
        if self.uniform is not None:
            kc[: self.n, :, self.uniform : self.end].copy_(k)
            vc[: self.n, :, self.uniform : self.end].copy_(v)
        else:  # row b's key and value at its own position
            kc[self.rows, :, self.lengths] = k[:, :, 0]
            vc[self.rows, :, self.lengths] = v[:, :, 0]
        return kc[: self.n, :, : self.end], vc[: self.n, :, : self.end]

    def advance(self, T: int) -> None:
        pass  # the engine counts each row's tokens


class StepView:
    """One forward of a decode step and prefill chunks together (see SlotCache): one new token in
    each of slots 0..n-1 (slot b holding `lengths[b]` tokens), then for each `(slot, T)` of
    `chunks` the next T tokens of that slot, packed side by side into one sequence (1, n + ΣT).

    The weights are read once for all of them; only attention is done per part (the decode
    tokens together, each chunk with its own slot's keys). A slot with a chunk may also be among
    the n (a filler token): its chunk is written after, over the filler. The forward's outputs
    are the decode tokens' and each chunk's last (`outputs`)."""

    def __init__(self, cache: SlotCache, lengths: list[int], chunks: list[tuple[int, int]]):
        self.cache, self.n, self.mask = cache, len(lengths), None
        self.decoding = DecodeView(cache, lengths)
        self.chunks = [(slot, lengths[slot], T) for slot, T in chunks]
        device = cache.index.device
        outputs, offset = list(range(self.n)), self.n
        for _slot, L, T in self.chunks:
            if L + T > cache.capacity:
                raise ValueError(f"sequence of {L + T} tokens is longer than block_size {cache.capacity}")
            offset += T
            outputs.append(offset - 1)
        self.outputs = torch.tensor(outputs, device=device)
        self.masks = [None if L == 0 else cache.index[None, : L + T] <= cache.index[L : L + T, None]
                      for _slot, L, T in self.chunks]

    def start(self, T: int) -> torch.Tensor:
        positions = self.decoding.start(1)  # (n, 1) or (1,)
        parts = [positions.view(-1).expand(self.n)] + [self.cache.index[L : L + t] for _, L, t in self.chunks]
        if T != sum(p.numel() for p in parts):
            raise ValueError("a step view's forward takes its decode tokens and chunks, packed")
        return torch.cat(parts)[None]  # (1, n + ΣT)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Attention of the packed queries (1, nh, N, hs), each part with its own keys; the
        new keys and values go into the cache first."""
        n = self.n
        per_row = [t[0, :, :n].transpose(0, 1)[:, :, None] for t in (q, k, v)]  # (n, nh, 1, hs)
        kd, vd = self.decoding.update(layer, per_row[1], per_row[2])
        kc, vc = self.cache.k[layer], self.cache.v[layer]
        offset = n
        for slot, L, T in self.chunks:
            kc[slot, :, L : L + T].copy_(k[0, :, offset : offset + T])
            vc[slot, :, L : L + T].copy_(v[0, :, offset : offset + T])
            offset += T
        out = [F.scaled_dot_product_attention(per_row[0], kd, vd, attn_mask=self.decoding.mask)
               .squeeze(2).transpose(0, 1)[None]]  # (1, nh, n, hs)
        offset = n
        for (slot, L, T), mask in zip(self.chunks, self.masks):
            out.append(F.scaled_dot_product_attention(
                q[:, :, offset : offset + T], kc[slot : slot + 1, :, : L + T], vc[slot : slot + 1, :, : L + T],
                attn_mask=mask, is_causal=mask is None and T > 1))
            offset += T
        return torch.cat(out, dim=2)

    def advance(self, T: int) -> None:
        pass  # the engine counts each row's tokens


class CausalSelfAttention(nn.Module):
    """Every position attends to itself and the positions before it, in `n_head` heads."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        assert cfg.n_embd % cfg.n_head == 0
        self.n_head = cfg.n_head
        self.n_embd = cfg.n_embd
        self.attn_dropout = cfg.dropout_at("attn_dropout")  # on the attention weights (inside SDPA)
        self.qk_norm = cfg.qk_norm
        # query, key and value for all heads in one matrix multiply
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        # output projection back into the residual stream
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.attn_out_dropout = nn.Dropout(cfg.dropout_at("attn_out_dropout"))

    def qkv(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys and values (B, nh, T, hs) of x (B, T, C), QK-normed and rotated if set.

        `rope` is (cos, sin) of shape (T, 1, 1, hs/2), or (B, T, 1, 1, hs/2) for padded rows."""
        B, T, C = x.size()
        hs = C // self.n_head
        qkv = self.c_attn(x).view(B, T, 3, self.n_head, hs)
        qk, v = qkv[:, :, :2], qkv[:, :, 2]  # (B, T, 2, nh, hs), (B, T, nh, hs)
        if self.qk_norm:
            # QK-norm (Dehghani et al. 2023): queries and keys normalised per head to zero mean and
            # unit RMS bound the attention logits by sqrt(hs), so softmax does not saturate at
            # high learning rates. (layer_norm without affine weights; on CPUs it is faster than rms_norm.)
            qk = F.layer_norm(qk, (hs,))
        if rope is not None:
            qk = apply_rope(qk, *rope)  # queries and keys rotated together
        q, k = qk.unbind(2)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, nh, T, hs) each

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = self.qkv(x, rope)
        if cache is None:
            # softmax(q k^T / sqrt(hs)) v with a causal mask; flash attention where available
            y = F.scaled_dot_product_attention(
                q, k, v, dropout_p=self.attn_dropout if self.training else 0.0, is_causal=True
            )  # (B, nh, T, hs)
        elif hasattr(cache, "attend"):  # a packed decode step (SlotCache.step)
            y = cache.attend(layer, q, k, v)
        else:
            # decoding: the queries of the T new tokens see the cached keys too
            k, v = cache.update(layer, k, v)  # (B, nh, pos + T, hs)
            causal = cache.mask is None and T > 1
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=cache.mask, is_causal=causal)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # heads side by side again
        return self.attn_out_dropout(self.c_proj(y))


class ReLU2(nn.Module):
    """ReLU squared (So et al. 2021, "Primer"): as good as GELU or better, and cheaper."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x).square()


class MLP(nn.Module):
    """Position-wise feed-forward network: widen 4x, GELU (or ReLU squared), project back."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        # GPT-2's GELU (tanh approximation); the attribute keeps its name for every activation
        self.gelu = ReLU2() if cfg.activation == "relu2" else nn.GELU(approximate="tanh")
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.mlp_dropout = nn.Dropout(cfg.dropout_at("mlp_dropout"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp_dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x)).

    `resid_dropout` (0 unless set) drops elements of the residual stream itself after each add."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln_1 = make_norm(cfg)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = make_norm(cfg)
        self.mlp = MLP(cfg)
        self.resid_dropout = nn.Dropout(cfg.resid_dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        x = self.resid_dropout(x + self.attn(self.ln_1(x), cache, layer, rope))
        x = self.resid_dropout(x + self.mlp(self.ln_2(x)))
        return x


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        assert cfg.vocab_size > 0, "vocab_size must be set (from the tokenizer)"
        self.config = cfg
        modules = dict(wte=nn.Embedding(cfg.vocab_size, cfg.n_embd))  # token embedding
        if not cfg.rope:  # with RoPE, positions enter through the rotation of queries and keys
            modules["wpe"] = nn.Embedding(cfg.block_size, cfg.n_embd)  # position embedding
        modules.update(
            embd_dropout=nn.Dropout(cfg.dropout_at("embd_dropout")),
            h=nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)]),
            ln_f=make_norm(cfg),
        )
        self.transformer = nn.ModuleDict(modules)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight  # weight tying, as GPT-2
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight") or (name == "lm_head.weight" and not cfg.tie_embeddings):
                if cfg.zero_init:
                    # modded-nanogpt: every block starts as the identity and the first steps
                    # grow the output projections from nothing
                    nn.init.zeros_(p)
                elif name.endswith("c_proj.weight"):
                    # GPT-2: residual output projections scaled down by 1/sqrt(2 * n_layer),
                    # since each block adds two of them to the residual stream
                    nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; by default without the position embedding, as nanoGPT counts.

        The token embedding is counted once: it is also the LM head's weight.
        """
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and "wpe" in self.transformer:
            n -= self.transformer.wpe.weight.numel()
        return n

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: KVCache | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits for every position (B, T, vocab); the mean cross-entropy if targets are given.

        With a `cache`, `idx` holds the next tokens after the cached ones (the whole prompt to
        prefill, then one token per step); they are appended to the cache, and only the last
        position's logits are computed (B, 1, vocab).
        """
        x = self.hidden_states(idx, cache)  # (B, T, C)
        if getattr(cache, "outputs", None) is not None:  # a packed step: each row's last token
            x = x[0, cache.outputs][:, None]
        elif cache is not None:
            x = x[:, -1:, :]  # only the next token's logits are needed
        logits = self.head(x)  # (B, T, vocab)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def hidden_states(self, idx: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """The last layer's output at every position, after the final norm (B, T, C): what the
        LM head reads. Scoring uses it to run the head only at the positions it scores."""
        B, T = idx.size()
        cfg = self.config
        if cache is None:
            if T > cfg.block_size:
                raise ValueError(f"sequence of {T} tokens is longer than block_size {cfg.block_size}")
            pos = torch.arange(T, dtype=torch.long, device=idx.device)  # (T,)
        else:
            pos = cache.start(T)  # (T,) or (B, T); sets the cache's attention mask
        x = self.transformer.wte(idx)  # (B, T, C)
        rope = None
        if cfg.rope:
            cos, sin = rope_tables(pos, cfg.n_embd // cfg.n_head, cfg.rope_base)  # (T, hs/2) or (B, T, hs/2)
            rope = (cos[..., None, None, :], sin[..., None, None, :])  # broadcast over q/k and heads
        else:
            x = x + self.transformer.wpe(pos)
        x = self.transformer.embd_dropout(x)
        for i, block in enumerate(self.transformer.h):
            x = block(x, cache, i, rope)
        if cache is not None:
            cache.advance(T)
        return self.transformer.ln_f(x)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (..., vocab) of hidden states (..., C): the LM head, then the soft cap if set."""
        logits = self.lm_head(x)
        if self.config.logit_softcap:
            # Gemma 2 / modded-nanogpt: squash the logits smoothly into (-cap, cap)
            cap = self.config.logit_softcap
            logits = cap * torch.tanh(logits.float() / cap)
        return logits


def count_params(model: nn.Module) -> int:
    """Parameters as nanoGPT prints them: shared tensors once, position embeddings excluded."""
    if hasattr(model, "num_params"):
        return model.num_params()
    return sum(p.numel() for p in model.parameters())
