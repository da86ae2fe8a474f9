"""Hugging Face GPT-2 interop: import a checkpoint as a run, export a run as a checkpoint.

Our GPT and Hugging Face's `GPT2LMHeadModel` are the same network with the same parameter
names; the differences are all in the files:

- HF stores the four projection weights (`attn.c_attn`, `attn.c_proj`, `mlp.c_fc`,
  `mlp.c_proj`) as `Conv1D` weights of shape (in, out); our `nn.Linear` is (out, in), so those
  four are transposed on the way in and out.
- HF names carry a `transformer.` prefix (or none, in the hub's original `gpt2` files), may
  include causal-mask buffers (`attn.bias`, `attn.masked_bias`) and leave out the tied LM head.
- The settings live in `config.json` (`n_positions`, `n_embd`, ...) instead of `config.yaml`,
  and the tokenizer in `vocab.json` + `merges.txt` instead of `tokenizer.json`.

    from quillgpt.hf import import_hf, export_hf
    import_hf("gpt2", "runs/gpt2")             # hub id (online) or a local HF directory
    export_hf("runs/gpt2", "exported/gpt2")    # loads with GPT2LMHeadModel.from_pretrained
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file as st_load_file
from safetensors.torch import save as st_save

from . import checkpoint as ckpt
from .config import DROPOUT_SITES, FINETUNE_LR, Config, ModelConfig, TrainConfig
from .download import cache_dir
from .errors import QuillError, shown
from .fileio import atomic_write_bytes, atomic_write_text, check_apart, read_regular
from .model import GPT
from .tokenizers import Tokenizer

HUB_MODELS = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "distilgpt2")
# weights stored as Conv1D (in, out) by HF: transposed to nn.Linear's (out, in)
CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# causal-mask buffers that older HF checkpoints carry; not parameters, so dropped
MASK_BUFFER = re.compile(r"^h\.\d+\.attn\.(bias|masked_bias)$")
GELU_TANH = ("gelu_new", "gelu_pytorch_tanh")
LAYER_NORM_EPS = 1e-5  # torch.nn.LayerNorm's default, which our model uses
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json")
# an imported run starts with ModelConfig's dropout defaults (none), ready for fine-tuning
USER_DROPOUT_DEFAULTS = {name: getattr(ModelConfig(), name) for name in ("dropout", *DROPOUT_SITES)}


# --- configuration ----------------------------------------------------------------------------

def config_from_hf(hf: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """Our ModelConfig for an HF GPT-2 `config.json`; refuses what our GPT cannot represent."""
    model_type = hf.get("model_type")
    if model_type != "gpt2":
        raise QuillError(f"{source}: model_type is {shown(model_type)}; only GPT-2 checkpoints (gpt2) import")
    try:
        return _config_from_hf(hf, source)
    except QuillError as e:  # ModelConfig's own checks (sizes, dropout): say which file
        raise QuillError(f"{source}: {e}" if source not in str(e) else str(e)) from None
    except KeyError as e:
        raise QuillError(f"{source} has no {shown(e.args[0])}") from None
    except (TypeError, ValueError, OverflowError) as e:
        raise QuillError(f"{source}: a value is not a number of the right kind ({shown(str(e), 120)})") from None


def _config_from_hf(hf: dict[str, Any], source: str) -> ModelConfig:
    for key in ("n_embd", "n_layer", "n_head", "vocab_size", "n_positions"):
        if not isinstance(hf.get(key, 0), int) or isinstance(hf.get(key), bool):
            raise QuillError(f"{source}: {key} must be an integer, got {shown(hf.get(key))}")
    n_embd, n_layer, n_head = int(hf["n_embd"]), int(hf["n_layer"]), int(hf["n_head"])
    vocab_size, n_positions = int(hf["vocab_size"]), int(hf["n_positions"])
    problems = []
    n_inner = hf.get("n_inner")
    if n_inner is not None and int(n_inner) != 4 * n_embd:
        problems.append(f"n_inner {n_inner} (ours is 4 x n_embd = {4 * n_embd})")
    act = hf.get("activation_function", "gelu_new")
    if act not in GELU_TANH:
        problems.append(f"activation_function {shown(act)} (ours is the tanh GELU, gelu_new)")
    eps = float(hf.get("layer_norm_epsilon", LAYER_NORM_EPS))
    if not math.isclose(eps, LAYER_NORM_EPS, rel_tol=1e-6):
        problems.append(f"layer_norm_epsilon {eps} (ours is {LAYER_NORM_EPS})")
    if not hf.get("scale_attn_weights", True):
        problems.append("scale_attn_weights false")
    if hf.get("scale_attn_by_inverse_layer_idx", False):
        problems.append("scale_attn_by_inverse_layer_idx true")
    if hf.get("add_cross_attention", False):
        problems.append("add_cross_attention true")
    if not hf.get("tie_word_embeddings", True):
        problems.append("tie_word_embeddings false (ours ties the LM head to the token embedding)")
    if problems:
        raise QuillError(f"{source}: unsupported GPT-2 variant: {'; '.join(problems)}")
    # GPT-2's dropout: resid_pdrop on both branch outputs, embd_pdrop, attn_pdrop (HF's default 0.1)
    cfg = ModelConfig(kind="gpt", vocab_size=vocab_size, block_size=n_positions, n_layer=n_layer,
                      n_head=n_head, n_embd=n_embd, dropout=float(hf.get("resid_pdrop", 0.1)),
                      embd_dropout=float(hf.get("embd_pdrop", 0.1)),
                      attn_dropout=float(hf.get("attn_pdrop", 0.1)), bias=True)
    cfg.validate()
    return cfg


def check_exportable(cfg: ModelConfig) -> None:
    """Refuse, with the reason, a model that the HF GPT-2 layout cannot hold."""
    if cfg.kind != "gpt":
        raise QuillError(f"model kind {cfg.kind!r} cannot be written as HF GPT-2; only kind gpt can")
    options = [o for o in cfg.non_gpt2_options() if o != "bias false"]  # no bias = a zero bias
    if options:
        raise QuillError(f"a model with {', '.join(options)} cannot be written as HF GPT-2 "
                         f"(GPT-2 has none of the speedrun options)")


def dropout_to_hf(cfg: ModelConfig) -> tuple[dict[str, float], list[str]]:
    """GPT-2's three dropout fields for our five sites, and what they cannot express.

    HF's GPT-2 drops the embeddings (`embd_pdrop`), the attention weights (`attn_pdrop`) and
    both branch outputs with one rate (`resid_pdrop`); it has no dropout on the residual stream
    itself. When `attn_out_dropout` and `mlp_dropout` differ, `resid_pdrop` takes the larger.
    """
    attn_out, mlp = cfg.dropout_at("attn_out_dropout"), cfg.dropout_at("mlp_dropout")
    fields = {"resid_pdrop": max(attn_out, mlp), "embd_pdrop": cfg.dropout_at("embd_dropout"),
              "attn_pdrop": cfg.dropout_at("attn_dropout")}
    lost = []
    if attn_out != mlp:
        lost.append(f"attn_out_dropout {attn_out:g} and mlp_dropout {mlp:g} differ (GPT-2 has one rate for "
                    f"both, resid_pdrop, written as the larger, {max(attn_out, mlp):g})")
    if cfg.resid_dropout:
        lost.append(f"resid_dropout {cfg.resid_dropout:g} (GPT-2 has no dropout on the residual stream)")
    return fields, lost


def config_to_hf(cfg: ModelConfig, eot_id: int | None = None) -> dict[str, Any]:
    """The HF GPT-2 `config.json` for our ModelConfig.

    Dropout is not part of the weights; its fields are the rates transformers applies if the
    export is trained further (`dropout_to_hf`). A layout GPT-2 cannot express is also written
    out exactly under `quill_dropout` (transformers keeps unknown keys as config attributes).
    """
    check_exportable(cfg)
    dropout, lost = dropout_to_hf(cfg)
    extra = {"quill_dropout": {site: cfg.dropout_at(site) for site in DROPOUT_SITES}} if lost else {}
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.block_size,
        "n_ctx": cfg.block_size,
        "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_inner": None,
        "activation_function": "gelu_new",
        **dropout,
        "layer_norm_epsilon": LAYER_NORM_EPS,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": True,
        "use_cache": True,
        "bos_token_id": eot_id,
        "eos_token_id": eot_id,
        "torch_dtype": "float32",
        **extra,
    }


# --- weights ----------------------------------------------------------------------------------

def _listing(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" ... ({len(names)} in all)" if len(names) > limit else "")


def state_dict_from_hf(tensors: dict[str, torch.Tensor], cfg: ModelConfig,
                       source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """HF GPT-2 tensors -> our GPT's state dict (float32, Linear layout, tied head included).

    Every tensor the model needs must be there with the right shape, and nothing else may be;
    otherwise the error lists the missing and unexpected names.
    """
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        expected = {k: tuple(v.shape) for k, v in GPT(cfg).state_dict().items()}
    out: dict[str, torch.Tensor] = {}
    unexpected = []
    lm_head = None
    for name, t in tensors.items():
        key = name.removeprefix("transformer.")
        if MASK_BUFFER.match(key):
            continue
        if key == "lm_head.weight":
            lm_head = t
            continue
        ours = "transformer." + key
        if ours not in expected:
            unexpected.append(name)
            continue
        t = t.detach().to("cpu", torch.float32)
        if key.endswith(CONV1D_SUFFIXES):
            t = t.t()
        out[ours] = t.contiguous()
    missing = [k for k in expected if k not in out and k != "lm_head.weight"]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys: {_listing(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_listing(unexpected)}")
        raise QuillError(f"{source} does not match a GPT-2 of its config.json: {'; '.join(parts)}")
    for name, t in out.items():
        if tuple(t.shape) != expected[name]:
            raise QuillError(f"{source}: {name} has shape {tuple(t.shape)}, config.json implies "
                             f"{expected[name]}")
    wte = out["transformer.wte.weight"]
    if lm_head is not None and not torch.equal(lm_head.to("cpu", torch.float32), wte):
        raise QuillError(f"{source}: lm_head.weight differs from transformer.wte.weight; an untied "
                         f"LM head is not supported")
    out["lm_head.weight"] = wte
    return out


def state_dict_to_hf(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Our GPT's tensors under HF GPT-2 names (Conv1D layout, tied head left out), float32."""
    check_exportable(model.config)
    sd = model.state_dict()
    if sd["lm_head.weight"].data_ptr() != sd["transformer.wte.weight"].data_ptr() and not torch.equal(
        sd["lm_head.weight"], sd["transformer.wte.weight"]
    ):
        raise QuillError("an untied LM head cannot be written as HF GPT-2 (GPT-2 ties it to wte)")
    out = {}
    for name, t in sd.items():
        if name == "lm_head.weight":
            continue
        t = t.detach().to("cpu", torch.float32)
        if name.endswith(CONV1D_SUFFIXES):
            t = t.t()
        out[name] = t.contiguous()
    # a Linear or LayerNorm without bias (bias: false) is GPT-2's with a zero bias
    with torch.device("meta"):
        gpt2 = GPT(ModelConfig(**{**vars(model.config), "bias": True})).state_dict()
    for name, t in gpt2.items():
        if name not in out and name != "lm_head.weight":
            out[name] = torch.zeros(t.shape, dtype=torch.float32)
    return out


def read_hf_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """The tensors of an HF checkpoint directory: model.safetensors (possibly sharded with an
    index) or, failing that, pytorch_model.bin read with `weights_only=True` (no code runs)."""
    single = directory / "model.safetensors"
    index = directory / "model.safetensors.index.json"
    if single.is_file():
        files = [single]
    elif index.is_file():
        files = [directory / f for f in index_files(index, directory)]
    else:
        files = []
    if files:
        tensors: dict[str, torch.Tensor] = {}
        for f in files:
            try:
                tensors.update(st_load_file(f))
            except FileNotFoundError:
                raise QuillError(f"weights file not found: {f}") from None
            except (SafetensorError, OSError, ValueError, RuntimeError) as e:
                raise QuillError(f"{f} is corrupt or not a safetensors file ({e})") from None
        return tensors
    pt = directory / "pytorch_model.bin"
    if pt.is_file():
        try:
            tensors = torch.load(pt, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - unpickling errors come in many types
            lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(e).splitlines()]
            reason = next((line for line in lines if "Unsupported global" in line), lines[0] if lines else "")
            raise QuillError(f"cannot read {pt} as plain tensors (loaded with weights_only=True, which "
                             f"runs no code): {reason or type(e).__name__}") from None
        if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
            raise QuillError(f"{pt} does not hold a dictionary of tensors")
        return tensors
    raise QuillError(f"{directory} has no model.safetensors or pytorch_model.bin")


def index_files(index: Path, directory: Path) -> list[str]:
    """The shard files a `model.safetensors.index.json` names: plain names of files inside
    `directory` only (a `../` or absolute path in a stranger's index would read anything)."""
    data = read_json(index)
    weight_map = data.get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
        raise QuillError(f"{index} is not a safetensors index (no weight_map of tensor names to files)")
    root = directory.resolve()
    names = sorted(set(weight_map.values()))
    for name in names:
        target = (directory / name).resolve()
        if Path(name).is_absolute() or ".." in Path(name).parts or not target.is_relative_to(root):
            raise QuillError(f"{index} names {shown(name)}, outside {directory}; only files inside the "
                             f"checkpoint directory are read")
    return names


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(read_regular(path, 100 << 20).decode("utf-8"))
    except FileNotFoundError:
        raise QuillError(f"{path} not found") from None
    except RecursionError:
        raise QuillError(f"cannot read {path}: it is nested too deeply") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise QuillError(f"cannot read {path}: {e}") from None
    if not isinstance(data, dict):
        raise QuillError(f"{path} is not a JSON object")
    return data


# --- where a checkpoint comes from: a local directory or the hub ------------------------------

def looks_like_hub_id(src: str) -> bool:
    """`gpt2`, `openai-community/gpt2`: a name, or owner/name, with no path punctuation."""
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?", src)) and ".." not in src


def download_from_hub(repo_id: str) -> Path:
    """The hub files of `repo_id` that an import needs (from the local HF cache when there)."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise QuillError(
            f"importing {repo_id!r} from the Hugging Face hub needs huggingface_hub "
            f"(pip install 'quillgpt[hf]'), or pass a local directory"
        ) from None
    common = ["config.json", "generation_config.json", *TOKENIZER_FILES]
    try:
        path = Path(snapshot_download(repo_id, allow_patterns=common + [
            "model.safetensors", "model.safetensors.index.json", "model-*.safetensors"]))
        if not (path / "model.safetensors").is_file() and not (path / "model.safetensors.index.json").is_file():
            path = Path(snapshot_download(repo_id, allow_patterns=common + ["pytorch_model.bin"]))
    except Exception as e:  # noqa: BLE001 - offline, unknown repo, gated, HTTP errors, ...
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise QuillError(
            f"cannot get {repo_id!r} from the Hugging Face hub ({type(e).__name__}: {reason}); "
            f"offline? on a machine with network run `hf download {repo_id} "
            f"--local-dir {repo_id.split('/')[-1]}` and pass that local directory instead"
        ) from None
    return path


def resolve_source(src: str | Path) -> Path:
    """A local HF checkpoint directory for `src`: the directory itself, or a hub download."""
    path = Path(src)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise QuillError(f"{path} is not a Hugging Face checkpoint directory (no config.json)")
        return path
    if path.exists():
        raise QuillError(f"{path} is a file; pass a Hugging Face checkpoint directory or a hub id")
    if looks_like_hub_id(str(src)):
        return download_from_hub(str(src))
    raise QuillError(f"{src} not found: pass a Hugging Face checkpoint directory or a hub id "
                     f"({', '.join(HUB_MODELS)})")


# --- tokenizer --------------------------------------------------------------------------------

def tokenizer_from_hf_dir(directory: Path, name: str = "hf", tokenizer: str | None = None) -> Tokenizer:
    """The checkpoint's tokenizer: `tokenizer` when given (gpt2, or a tokenizer file), else its
    tokenizer.json (what transformers' save_pretrained writes), else vocab.json + merges.txt.
    None of them is an error: a 50,257-token model need not use GPT-2's vocabulary, so the
    user says so with `--tokenizer gpt2`."""
    from .tokenizers import named_tokenizer
    from .tokenizers.hf_files import from_tokenizer_json, from_vocab_merges

    if tokenizer is not None:
        found = named_tokenizer(tokenizer)
        if found is None:
            raise QuillError(f"--tokenizer {shown(tokenizer)}: use gpt2 or a tokenizer .json file")
        return found
    if (directory / "tokenizer.json").is_file():
        return from_tokenizer_json(directory / "tokenizer.json", name=name)
    vocab, merges = directory / "vocab.json", directory / "merges.txt"
    if vocab.is_file() and merges.is_file():
        return from_vocab_merges(vocab, merges, name=name)
    raise QuillError(f"{directory} has no tokenizer (tokenizer.json, or vocab.json and merges.txt); if the "
                     f"model uses GPT-2's, say so: quill import-hf {directory} OUT --tokenizer gpt2")


def bpe_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The merges.txt list for `ranks`, or a clear error where a token is no merge of two others."""
    from .tokenizers.bpe import merges_from_ranks

    try:
        return merges_from_ranks(ranks)
    except ValueError as e:
        raise QuillError(f"{e}; the tokenizer cannot be written as merges.txt") from None


def tokenizer_to_hf_files(tokenizer: Tokenizer, model_max_length: int) -> dict[str, str]:
    """vocab.json, merges.txt, tokenizer.json, tokenizer_config.json and special_tokens_map.json
    for a byte-level BPE tokenizer, so that `AutoTokenizer.from_pretrained` encodes as we do."""
    from .tokenizers.bpe import GPT2_PATTERN, ByteBPETokenizer, token_to_printable

    if not isinstance(tokenizer, ByteBPETokenizer):
        raise QuillError(f"export-hf needs a byte-level BPE tokenizer (such as gpt2 or a trained bpe); "
                         f"this run's tokenizer is {tokenizer.kind!r}")
    vocab = {token_to_printable(t): i for t, i in tokenizer.ranks.items()}
    vocab.update(tokenizer.special_tokens)
    vocab = dict(sorted(vocab.items(), key=lambda kv: kv[1]))
    merges = [f"{token_to_printable(a)} {token_to_printable(b)}" for a, b in bpe_merges(tokenizer.ranks)]
    if tokenizer.pattern == GPT2_PATTERN:  # HF's ByteLevel pre-tokenizer splits with GPT-2's regex
        pre_tokenizer: dict[str, Any] = {"type": "ByteLevel", "add_prefix_space": False,
                                         "trim_offsets": True, "use_regex": True}
    else:  # another pattern: split with it first, then map bytes without the built-in regex
        pre_tokenizer = {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": tokenizer.pattern}, "behavior": "Isolated",
             "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
        ]}
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    tokenizer_json = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": True}
            for s, i in sorted(tokenizer.special_tokens.items(), key=lambda kv: kv[1])
        ],
        "normalizer": None,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": {**byte_level, "trim_offsets": False},
        "decoder": byte_level,
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": False, "vocab": vocab, "merges": merges},
    }
    eot = next((s for s, i in tokenizer.special_tokens.items() if i == tokenizer.eot_id), None)
    specials: dict[str, Any] = {"bos_token": eot, "eos_token": eot, "unk_token": eot} if eot else {}
    others = [s for s in tokenizer.special_tokens if s != eot]  # the chat template's tokens, ...
    if others:
        specials["additional_special_tokens"] = others
    config = {
        "tokenizer_class": "GPT2Tokenizer" if tokenizer.pattern == GPT2_PATTERN else "PreTrainedTokenizerFast",
        "model_max_length": model_max_length,
        "add_prefix_space": False,
        "add_bos_token": False,
        "clean_up_tokenization_spaces": False,
        "errors": "replace",
        **specials,
        **chat_template_fields(tokenizer),
    }
    return {
        "vocab.json": json.dumps(vocab, ensure_ascii=False) + "\n",
        "merges.txt": "#version: 0.2\n" + "\n".join(merges) + "\n",
        "tokenizer.json": json.dumps(tokenizer_json, ensure_ascii=False) + "\n",
        "tokenizer_config.json": json.dumps(config, indent=2) + "\n",
        "special_tokens_map.json": json.dumps(specials, indent=2) + "\n",
    }


def chat_template_fields(tokenizer: Tokenizer) -> dict[str, Any]:
    """tokenizer_config.json's chat fields for a chat model (`chat.jinja_template`, which gives
    `chat.render`'s ids), else none."""
    from .chat import has_chat_template, has_tool_template, jinja_template

    if not has_chat_template(tokenizer):
        return {}
    return {"chat_template": jinja_template(tools=has_tool_template(tokenizer))}


def chat_generation_config(tokenizer: Tokenizer) -> dict[str, Any]:
    """generation_config.json for a chat model: generation ends where `quill chat` ends a reply."""
    from .chat import end_ids, has_chat_template

    if not has_chat_template(tokenizer):
        return {}
    return {"eos_token_id": sorted(end_ids(tokenizer)),
            "pad_token_id": tokenizer.special_tokens["<|end|>"]}


# --- import -----------------------------------------------------------------------------------

@dataclass
class HFModel:
    """A GPT-2 checkpoint loaded into our GPT, with its tokenizer."""

    source: Path
    config: ModelConfig
    model: GPT
    tokenizer: Tokenizer


def load_hf(src: str | Path, with_tokenizer: bool = True, tokenizer: str | None = None) -> HFModel:
    """Load an HF GPT-2 checkpoint (directory or hub id) as our GPT in eval mode; `tokenizer`
    (gpt2 or a tokenizer file) replaces the checkpoint's own (see `tokenizer_from_hf_dir`)."""
    directory = resolve_source(src)
    cfg = config_from_hf(read_json(directory / "config.json"), str(directory / "config.json"))
    state = state_dict_from_hf(read_hf_tensors(directory), cfg, str(directory))
    with torch.device("meta"):  # skip the random initialisation: every weight is loaded next
        model = GPT(cfg)
    model = model.to_empty(device="cpu")
    model.lm_head.weight = model.transformer.wte.weight  # to_empty gives each module its own tensor
    model.load_state_dict(state)
    model.eval()
    name = Path(str(src)).name or "hf"
    tok = tokenizer_from_hf_dir(directory, name, tokenizer) if with_tokenizer else None
    if tok is not None and tok.vocab_size != cfg.vocab_size:
        raise QuillError(f"{directory}: the tokenizer has {tok.vocab_size} tokens but the model's "
                         f"vocab_size is {cfg.vocab_size}")
    return HFModel(directory, cfg, model, tok)  # type: ignore[arg-type]


def check_out_dir(out: Path, overwrite: bool, what: str) -> None:
    if out.exists() and not out.is_dir():
        raise QuillError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise QuillError(f"{out} is not empty; pass --overwrite to replace the {what} in it")


def check_chat_template(directory: Path, warn: Callable[[str], None] | None) -> None:
    """A chat_template in tokenizer_config.json that is not quillgpt's gets a warning: quill
    renders conversations with its own (`chat.jinja_template` gives the same ids), whatever the file says."""
    from .chat import jinja_template

    path = directory / "tokenizer_config.json"
    template = read_json(path).get("chat_template") if path.is_file() else None
    if template is not None and template not in (jinja_template(), jinja_template(tools=True)) and warn is not None:
        warn(f"{path}: its chat_template is not quillgpt's; quill chat and /v1/chat/completions render "
             f"conversations with quillgpt's template (docs/chat.md), so fine-tune with quill sft first")


def import_hf(src: str | Path, out: str | Path, overwrite: bool = False, tokenizer: str | None = None,
              warn: Callable[[str], None] | None = None) -> Path:
    """Write an HF GPT-2 checkpoint as an ordinary run directory (config, tokenizer, weights);
    `tokenizer` (gpt2 or a tokenizer file) for a checkpoint without tokenizer files.
    A checkpoint exported from a chat run keeps its chat tokens (and so its template);
    `warn` hears of a chat_template other than quillgpt's."""
    out = Path(out)
    check_apart(out, [src] + ([tokenizer] if tokenizer else []), what="OUT")
    check_out_dir(out, overwrite, "run")
    hf = load_hf(src, tokenizer=tokenizer)
    check_chat_template(hf.source, warn)
    cfg = Config(model=hf.config, train=TrainConfig(tokenizer=str(out / ckpt.TOKENIZER_FILE),
                                                     learning_rate=FINETUNE_LR, min_lr=FINETUNE_LR / 10))
    cfg.model = ModelConfig(**{**vars(cfg.model), **USER_DROPOUT_DEFAULTS})
    out.mkdir(parents=True, exist_ok=True)
    ckpt.save_config(cfg, out)
    hf.tokenizer.save(out / ckpt.TOKENIZER_FILE)
    ckpt.save_weights(hf.model, out / ckpt.MODEL_FILE, {"source": f"huggingface:{src}"})
    return out


# --- export -----------------------------------------------------------------------------------

def export_hf(run: str | Path | ckpt.Run, out: str | Path, overwrite: bool = False,
              warn: Callable[[str], None] | None = None) -> Path:
    """Write a run as an HF GPT-2 directory: config.json, generation_config.json,
    model.safetensors and the tokenizer files (vocab.json, merges.txt, tokenizer_config.json).

    `warn` is told about a dropout layout that config.json's GPT-2 fields cannot express."""
    out = Path(out)
    if not isinstance(run, ckpt.Run):
        run_dir = Path(run)
        check_apart(out, [run_dir], what="OUT")
        if ckpt.is_run_dir(run_dir):
            check_exportable(ckpt.read_run_config(run_dir).model)
        run = ckpt.load_run(run_dir)
    check_out_dir(out, overwrite, "export")
    check_exportable(run.config.model)
    files = tokenizer_to_hf_files(run.tokenizer, run.config.model.block_size)  # refuses non-BPE
    tensors = state_dict_to_hf(run.model)
    for what in dropout_to_hf(run.config.model)[1]:
        if warn is not None:
            warn(f"config.json cannot express {what}; the exact rates are under quill_dropout")
    eot = run.tokenizer.eot_id
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "model.safetensors", st_save(tensors, metadata={"format": "pt"}))
    atomic_write_text(out / "config.json", json.dumps(config_to_hf(run.config.model, eot), indent=2) + "\n")
    generation = {"bos_token_id": eot, "eos_token_id": eot} if eot is not None else {}
    generation.update(chat_generation_config(run.tokenizer))
    atomic_write_text(out / "generation_config.json", json.dumps(generation, indent=2) + "\n")
    for name, text in files.items():
        atomic_write_text(out / name, text)
    return out


# --- fine-tuning ------------------------------------------------------------------------------

def resolve_init_run(spec: str) -> Path:
    """A run directory for `--init-from`: a run as is, or an HF directory / hub id imported
    once into the cache (`$QUILL_CACHE/hf/<name>`)."""
    path = Path(spec)
    if ckpt.is_run_dir(path):
        return path
    if path.is_dir() and not (path / "config.json").is_file():
        raise QuillError(f"--init-from {spec}: not a run directory (no config.yaml and tokenizer.json) "
                         f"nor a Hugging Face checkpoint (no config.json)")
    if path.is_dir():  # keyed by where the directory is and the state of its files
        stamp = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in path.iterdir() if f.is_file())
        digest = hashlib.sha256(repr((str(path.resolve()), stamp)).encode()).hexdigest()[:12]
        name = f"{path.resolve().name}-{digest}"
    else:
        name = re.sub(r"[^\w.-]+", "--", spec).strip("-")
    cached = cache_dir() / "hf" / name
    if ckpt.is_run_dir(cached) and (cached / ckpt.MODEL_FILE).is_file():
        return cached
    tmp = cached.with_name(cached.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    import_hf(spec, tmp)
    if cached.exists():
        shutil.rmtree(cached)
    tmp.rename(cached)
    return cached


def init_from(spec: str, cfg: Config, warn: Callable[[str], None] | None = None
              ) -> tuple[Tokenizer, dict[str, torch.Tensor]]:
    """Pretrained weights to start training from, for `quill train --init-from SPEC`.

    SPEC is a run directory, an HF GPT-2 directory or a hub id. Adjusts `cfg` in place: the
    model takes the source's architecture (kind, vocabulary, layers, heads, width, bias) with
    `block_size` cropped to at most the source's, `cfg.train.tokenizer` points at the source's
    tokenizer (so `prepare_training_data(cfg)` encodes with it), and the learning rate drops
    to 3e-5 (min_lr 3e-6) unless a value was given (`Config.is_default`: an explicit 1e-3, the
    training default, stays 1e-3). `warn` hears, in one line, of the keys given a value that
    fine-tuning cannot use (a width, a tokenizer other than the source's). Returns the tokenizer
    and a state dict for `build_model(cfg.model)`.
    """
    run_dir = resolve_init_run(spec)
    run = ckpt.load_run(run_dir)
    src = run.config.model
    unused = [f"{k} {getattr(cfg.model, k)} (the source's: {getattr(src, k)})" for k in vars(src)
              if k in cfg.given and k not in ("block_size", "dropout", *DROPOUT_SITES)
              and getattr(cfg.model, k) not in (getattr(src, k), 0 if k == "vocab_size" else None)]
    if "tokenizer" in cfg.given and cfg.train.tokenizer != str(run_dir / ckpt.TOKENIZER_FILE):
        unused.append(f"tokenizer {cfg.train.tokenizer} (the source's is kept)")
    if unused and warn is not None:
        warn(f"fine-tuning keeps {spec}'s architecture and tokenizer; not used: {', '.join(unused)}")
    if cfg.model.block_size > src.block_size:
        cfg.model.block_size = src.block_size
    block_size = cfg.model.block_size
    user_dropout = {name: getattr(cfg.model, name) for name in ("dropout", *DROPOUT_SITES)}
    cfg.model = ModelConfig(**{**vars(src), "block_size": block_size, **user_dropout})
    cfg.train.tokenizer = str(run_dir / ckpt.TOKENIZER_FILE)
    if cfg.is_default("learning_rate"):
        cfg.train.learning_rate = FINETUNE_LR
        if cfg.is_default("min_lr"):
            cfg.train.min_lr = FINETUNE_LR / 10
    state = run.model.state_dict()
    if "transformer.wpe.weight" in state:  # crop the position embedding to the new context
        state["transformer.wpe.weight"] = state["transformer.wpe.weight"][:block_size].clone()
    return run.tokenizer, state


def grow_vocabulary(state: dict[str, torch.Tensor], vocab_size: int,
                    log: Callable[[str], None] | None = None) -> dict[str, torch.Tensor]:
    """`state` with the token embedding (and an untied LM head) grown to `vocab_size` rows, for
    fine-tuning with a tokenizer that gained tokens (the chat template's special tokens). Each
    new row starts as the mean of the existing rows: a token the model has no opinion about yet,
    neither favoured nor ruled out by the head. A smaller vocabulary is an error."""
    wte = state.get("transformer.wte.weight")
    if wte is None or wte.size(0) == vocab_size:
        return state
    old = wte.size(0)
    if vocab_size < old:
        raise QuillError(f"the tokenizer has {vocab_size} tokens, fewer than the {old} rows of the "
                         f"model's embedding it fine-tunes")
    grown = dict(state)
    for name in ("transformer.wte.weight", "lm_head.weight"):
        if name in state and state[name].size(0) == old:
            t = state[name]
            grown[name] = torch.cat([t, t.mean(dim=0, keepdim=True).expand(vocab_size - old, -1)])
    if log is not None:
        log(f"vocabulary grows from {old} to {vocab_size} tokens; the new embedding rows start at the "
            f"mean of the others")
    return grown
