"""GGUF export: a run as one file that llama.cpp runs (and Ollama, LM Studio, node-llama-cpp,
llama-cpp-python, which are built on it). Written with the `gguf` package (llama.cpp's own
Python writer); docs/export.md has the whole mapping and the measurements.

    from quillgpt.gguf_export import export_gguf
    export_gguf("runs/shakespeare-char-cpu", "out/shakespeare.gguf")            # float32
    export_gguf("runs/mine", "out/mine-q8.gguf", dtype="q8_0")                 # f16, bf16 too

What maps to what:

- The model: GPT-2's architecture is llama.cpp's `gpt2` (learned positions, pre-LayerNorm
  blocks, fused QKV, tanh GELU, tied or untied head). A model without biases gets zero biases
  (the same function); `rope: true` (and nothing else of the speedrun options) is GPT-NeoX's
  layout with sequential residuals, llama.cpp's `gptneox` (rotary pairs i, i + hs/2, as ours).
  Every other option has no llama.cpp architecture that computes it: refused, named.
- The tokenizer: byte-level BPE (GPT-2's and trained ones with GPT-2's pre-tokenisation) is
  GGUF's `gpt2` BPE with the `gpt-2` pre-tokenizer, merges rebuilt from the ranks. Characters
  are tokens of their UTF-8 bytes with merges only inside one character (UTF-8 never lets a
  merge cross two), or, for a run without any special token, a greedy longest-match (`rwkv`)
  vocabulary, whose longest match is always one character: llama.cpp's BPE takes token 11 as
  its end-of-text token when a file names none, which would cut every reply at one character.
  The syllable tokenizer is refused (no llama.cpp pre-tokenizer cuts its chunks).
- Chat runs carry their template (`chat.jinja_template`, which llama.cpp's Jinja engine runs) and
  `<|end|>` as the end-of-generation token (a run with tools: `<|end_calls|>` as llama.cpp's
  end-of-message token).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import checkpoint as ckpt
from .config import Config, ModelConfig
from .errors import QuillError
from .fileio import check_apart, current_umask, disk_full, fsync_dir, temp_prefix
from .model import GPT
from .tokenizers import ByteBPETokenizer, CharTokenizer, SyllableTokenizer, Tokenizer, load_tokenizer

DTYPES = ("f32", "f16", "bf16", "q8_0")
LAYER_NORM_EPS = 1e-5  # torch.nn.LayerNorm's default, which the model uses
NEOX_OPTIONS = {"rope"}  # options beyond GPT-2 that llama.cpp's gptneox computes exactly
INERT_MERGE = "\u0120\u0120 \u0120"  # two spaces + a space, in GPT-2's byte alphabet ("ĠĠ Ġ")
# token types of GGUF's tokenizer.ggml.token_type
NORMAL, CONTROL = 1, 3


# --- which runs --------------------------------------------------------------------------------

def gguf_architecture(cfg: ModelConfig) -> str:
    """llama.cpp's architecture that computes exactly this model: gpt2 or gptneox; QuillError
    naming what no llama.cpp architecture computes."""
    if cfg.kind != "gpt":
        raise QuillError(f"model kind {cfg.kind!r} (a ladder rung) has no llama.cpp architecture; only kind "
                         f"gpt exports to GGUF")
    # biases off = zero biases, an untied head = llama.cpp's output tensor: both exact
    options = [o for o in cfg.non_gpt2_options() if o not in ("bias false", "tie_embeddings false")]
    lacking = [o for o in options if o not in NEOX_OPTIONS]
    if lacking:
        raise QuillError(f"{', '.join(lacking)}: llama.cpp has no architecture that computes a model with "
                         f"{'this option' if len(lacking) == 1 else 'these options'} (GGUF export maps GPT-2's "
                         f"architecture, and rope alone, onto llama.cpp's gpt2 and gptneox)")
    return "gptneox" if cfg.rope else "gpt2"


# --- the tokenizer -----------------------------------------------------------------------------

@dataclass
class GGUFVocab:
    """A tokenizer as GGUF's tokenizer.ggml.* keys."""

    model: str                      # tokenizer.ggml.model: gpt2 (BPE) or rwkv (greedy longest match)
    tokens: list[str]
    types: list[int]
    merges: list[str] = field(default_factory=list)
    pre: str | None = None          # the BPE pre-tokenizer
    bos: int | None = None
    eos: int | None = None
    what: str = ""                  # how the tokenizer maps, in words


def gguf_vocab(tokenizer: Tokenizer) -> GGUFVocab:
    """The GGUF vocabulary that tokenizes text to exactly `tokenizer`'s ids, or QuillError."""
    if isinstance(tokenizer, ByteBPETokenizer):
        return bpe_vocab(tokenizer)
    if isinstance(tokenizer, CharTokenizer):
        return char_bpe_vocab(tokenizer) if tokenizer.specials else char_rwkv_vocab(tokenizer)
    if isinstance(tokenizer, SyllableTokenizer):
        raise QuillError("the syllable tokenizer has no GGUF form: llama.cpp has no pre-tokenizer that cuts text "
                         "into its chunks, nor a catch-all token for chunks outside the vocabulary; train with "
                         "--tokenizer bpe or char to export")
    raise QuillError(f"the {tokenizer.kind} tokenizer has no GGUF form")


def end_token(tokenizer: Tokenizer) -> int | None:
    """The token that ends generation in llama.cpp: a chat run's <|end|>, else <|endoftext|>."""
    from .chat import END_TOKEN, has_chat_template

    if has_chat_template(tokenizer):
        return tokenizer.special_tokens[END_TOKEN]
    return tokenizer.eot_id


def specials_by_id(tokenizer: Tokenizer) -> dict[int, str]:
    return {i: s for s, i in tokenizer.special_tokens.items()}


def bpe_vocab(tokenizer: ByteBPETokenizer) -> GGUFVocab:
    from .tokenizers.bpe import GPT2_PATTERN, KNOWN_PATTERNS, merges_from_ranks, token_to_printable

    if tokenizer.pattern != GPT2_PATTERN:
        raise QuillError(f"this BPE tokenizer pre-tokenizes by {KNOWN_PATTERNS.get(tokenizer.pattern, 'a pattern')} "
                         f"(not GPT-2's pattern); llama.cpp has no pre-tokenizer that cuts text that way")
    eos = end_token(tokenizer)
    if eos is None:
        raise QuillError("this BPE tokenizer has no <|endoftext|>; llama.cpp would take token 11 as the end of "
                         "text and stop generating there")
    specials = specials_by_id(tokenizer)
    tokens = [specials[i] if i in specials else token_to_printable(tokenizer.decoder[i])
              for i in range(tokenizer.vocab_size)]
    types = [CONTROL if i in specials else NORMAL for i in range(tokenizer.vocab_size)]
    try:
        pairs = merges_from_ranks(tokenizer.ranks)
    except ValueError as e:
        raise QuillError(f"{e}; GGUF's BPE needs every token to be a merge of two others") from None
    merges = [f"{token_to_printable(a)} {token_to_printable(b)}" for a, b in pairs]
    bos = tokenizer.eot_id if tokenizer.eot_id is not None else eos
    return GGUFVocab("gpt2", tokens, types, merges, "gpt-2", bos, eos,
                     f"byte-level BPE ({len(merges):,} merges, GPT-2's pre-tokenizer)")


def char_bpe_vocab(tokenizer: CharTokenizer) -> GGUFVocab:
    """Characters as byte-level BPE tokens: each character's UTF-8 bytes, merged only within it."""
    from .tokenizers.bpe import token_to_printable

    tokens, merges = [], {}
    for c in tokenizer.chars:
        data = encodable(c).encode("utf-8")
        tokens.append(token_to_printable(data))
        for k in range(2, len(data) + 1):  # (b1, b2), (b1b2, b3), ...: a multi-byte character merges whole
            merges[f"{token_to_printable(data[:k - 1])} {token_to_printable(data[k - 1:k])}"] = None
    specials = specials_by_id(tokenizer)
    tokens += [specials[i] for i in range(len(tokenizer.chars), tokenizer.vocab_size)]
    types = [NORMAL] * len(tokenizer.chars) + [CONTROL] * len(specials)
    eos = end_token(tokenizer)
    if eos is None:  # specials, but neither <|end|> nor <|endoftext|>: take the first special
        eos = min(specials)
    # GGUF's BPE needs at least one merge; single-byte characters have none: then one that never
    # applies (its left side is two bytes, a symbol that no merge makes)
    return GGUFVocab("gpt2", tokens, types, list(merges) or [INERT_MERGE], "gpt-2", eos, eos,
                     "characters as byte-level BPE tokens, merged only within a character")


def rwkv_escape(text: str) -> str:
    """A token's text as llama.cpp's rwkv vocabulary writes it (backslash escapes)."""
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")


def char_rwkv_vocab(tokenizer: CharTokenizer) -> GGUFVocab:
    """Characters as a greedy longest-match vocabulary: every token is one character, and UTF-8
    lets no character's bytes begin another's, so the longest match is the next character."""
    if "\n" not in tokenizer.stoi:
        raise QuillError("this character vocabulary has no newline, which llama.cpp's character (rwkv) "
                         "vocabulary requires; train on text with line breaks to export")
    tokens = [rwkv_escape(encodable(c)) for c in tokenizer.chars]
    return GGUFVocab("rwkv", tokens, [NORMAL] * len(tokens),
                     what="characters, matched greedily (llama.cpp's rwkv vocabulary)")


def encodable(c: str) -> str:
    try:
        c.encode("utf-8")
    except UnicodeEncodeError:
        raise QuillError(f"the vocabulary holds U+{ord(c):04X}, a lone surrogate that UTF-8 cannot hold") from None
    return c


# --- the weights -------------------------------------------------------------------------------

LAYER_NAMES = {  # our name inside block i -> GGUF's blk.i.*
    "ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output",
    "ln_2": "ffn_norm", "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down",
}
TOP_NAMES = {"transformer.wte": "token_embd", "transformer.wpe": "position_embd",
             "transformer.ln_f": "output_norm", "lm_head": "output"}


def gguf_name(name: str) -> str:
    """GGUF's name for one of our tensors: transformer.h.3.mlp.c_fc.weight -> blk.3.ffn_up.weight."""
    module, _, kind = name.rpartition(".")
    if module.startswith("transformer.h."):
        _, _, index, rest = module.split(".", 3)
        return f"blk.{index}.{LAYER_NAMES[rest]}.{kind}"
    return f"{TOP_NAMES[module]}.{kind}"


def model_tensors(model: torch.nn.Module, arch: str) -> Iterator[tuple[str, torch.Tensor]]:
    """(GGUF name, float32 tensor) of every tensor llama.cpp's `arch` reads: zero biases where the
    model has none; the LM head as `output` when it is not the token embedding (gptneox always)."""
    cfg: ModelConfig = model.config
    state = model.state_dict()
    tied = state["lm_head.weight"].data_ptr() == state["transformer.wte.weight"].data_ptr()
    for name, shape in shapes_with_biases(cfg).items():
        if name == "lm_head.weight" and tied and arch == "gpt2":
            continue  # gpt2 reads the token embedding when there is no output tensor
        t = state.get(name)
        t = torch.zeros(shape) if t is None else t.detach().to("cpu", torch.float32)
        yield gguf_name(name), t.contiguous()


def shapes_with_biases(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of the model with biases, by name, and its shape (nothing allocated)."""
    with torch.device("meta"):
        model = GPT(ModelConfig(**{**vars(cfg), "bias": True}))
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def gguf_tensor(name: str, t: torch.Tensor, dtype: str, warn: Callable[[str], None] | None
                ) -> tuple[np.ndarray, object]:
    """The tensor's data in `dtype` and its GGML type. Vectors and the position embedding stay
    float32 (as llama.cpp's own converter keeps them); q8_0 needs rows of a multiple of 32
    values, else the matrix goes as f16 (with a warning)."""
    import gguf

    Q = gguf.GGMLQuantizationType
    data = t.numpy()
    if dtype == "f32" or t.dim() < 2 or name.startswith("position_embd"):
        return data, Q.F32
    if dtype == "q8_0" and data.shape[-1] % 32:
        if warn is not None:
            warn(f"{name}: rows of {data.shape[-1]} values are not a multiple of 32 (q8_0's block); written as f16")
        dtype = "f16"
    if dtype == "f16":
        return data.astype(np.float16), Q.F16
    qtype = Q.BF16 if dtype == "bf16" else Q.Q8_0
    return gguf.quants.quantize(data, qtype), qtype


# --- the file ----------------------------------------------------------------------------------

@dataclass
class GGUFExport:
    """What was written."""

    path: Path
    architecture: str
    dtype: str
    vocab: str
    chat_template: bool
    tensors: int
    bytes: int


def write_metadata(writer: object, run: ckpt.Run, arch: str, dtype: str, vocab: GGUFVocab, weights: str) -> bool:
    """The header's keys; True when the chat template went in."""
    import gguf

    from .chat import CALLS_END_TOKEN, has_chat_template, has_tool_template, jinja_template

    cfg = run.config.model
    w: gguf.GGUFWriter = writer  # type: ignore[assignment]
    w.add_name(run.path.resolve().name)
    w.add_description(f"quillgpt run {run.path.resolve().name} ({weights})")
    w.add_string("quill.config", run.config.to_yaml())
    w.add_context_length(cfg.block_size)
    w.add_embedding_length(cfg.n_embd)
    w.add_feed_forward_length(4 * cfg.n_embd)
    w.add_block_count(cfg.n_layer)
    w.add_head_count(cfg.n_head)
    w.add_head_count_kv(cfg.n_head)
    w.add_layer_norm_eps(LAYER_NORM_EPS)
    if arch == "gptneox":
        w.add_rope_dimension_count(cfg.n_embd // cfg.n_head)
        w.add_rope_freq_base(cfg.rope_base)
        w.add_parallel_residual(False)
    file_types = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                  "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
    w.add_file_type(file_types[dtype])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_tokenizer_model(vocab.model)
    if vocab.pre is not None:
        w.add_tokenizer_pre(vocab.pre)
    w.add_token_list(vocab.tokens)
    w.add_token_types(vocab.types)
    if vocab.merges:
        w.add_token_merges(vocab.merges)
    if vocab.bos is not None:
        w.add_bos_token_id(vocab.bos)
    if vocab.eos is not None:
        w.add_eos_token_id(vocab.eos)
    w.add_add_bos_token(False)  # quill adds nothing to a prompt
    w.add_add_eos_token(False)
    chat = has_chat_template(run.tokenizer)
    if chat:
        tools = has_tool_template(run.tokenizer)
        w.add_chat_template(jinja_template(tools=tools))
        if tools:  # llama.cpp's end of message: an assistant message of tool calls ends there
            w.add_eom_token_id(run.tokenizer.special_tokens[CALLS_END_TOKEN])
    return chat


def check_run_dir(run_dir: Path) -> None:
    """Refuse what cannot be exported before any weight is read: the config and tokenizer are
    checked as load_run checks them (a stranger's run), then the architecture and tokenizer."""
    if ckpt.is_run_dir(run_dir):
        cfg: Config = ckpt.read_run_config(run_dir)
        gguf_architecture(cfg.model)
        gguf_vocab(load_tokenizer(ckpt.run_file(run_dir, ckpt.TOKENIZER_FILE)))


def export_gguf(run: str | Path | ckpt.Run, out: str | Path, dtype: str = "f32", best: bool = False,
                overwrite: bool = False, warn: Callable[[str], None] | None = None) -> GGUFExport:
    """Write a run as one GGUF file (module docstring); `best` takes best.safetensors.

    Nothing is written when the run cannot be expressed exactly, and an existing `out` needs
    `overwrite`. The file appears whole or not at all (written beside `out`, then renamed)."""
    if dtype not in DTYPES:
        raise QuillError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    gguf_package()
    out = Path(out)
    weights = ckpt.BEST_FILE if best else ckpt.MODEL_FILE
    if out.is_dir():
        raise QuillError(f"{out} is a directory; OUT is the .gguf file to write")
    if out.exists() and not overwrite:
        raise QuillError(f"{out} exists; pass --overwrite to replace it")
    if not isinstance(run, ckpt.Run):
        check_apart(out, [run], what="OUT")
        check_run_dir(Path(run))
        run = ckpt.load_run(run, weights=weights)
    arch = gguf_architecture(run.config.model)
    vocab = gguf_vocab(run.tokenizer)
    return write_gguf(run, out, arch, dtype, vocab, weights, warn)


def gguf_package():
    """The `gguf` package (llama.cpp's writer), or QuillError saying how to install it."""
    try:
        import gguf
    except ImportError:
        raise QuillError("GGUF export needs the gguf package: pip install 'quillgpt[gguf]'") from None
    return gguf


def write_gguf(run: ckpt.Run, out: Path, arch: str, dtype: str, vocab: GGUFVocab, weights: str,
               warn: Callable[[str], None] | None) -> GGUFExport:
    gguf = gguf_package()

    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=temp_prefix(out), suffix=".tmp")
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp, arch)
        chat = write_metadata(writer, run, arch, dtype, vocab, weights)
        n = 0
        for name, t in model_tensors(run.model, arch):
            data, qtype = gguf_tensor(name, t, dtype, warn)
            writer.add_tensor(name, data, raw_dtype=qtype)
            n += 1
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.chmod(tmp, 0o666 & ~current_umask())
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and (full := disk_full(e, out)) is not None:
            raise full from None
        raise
    fsync_dir(out.parent)
    return GGUFExport(out, arch, dtype, vocab.what, chat, n, out.stat().st_size)
