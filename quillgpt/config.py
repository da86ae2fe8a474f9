"""Configuration: dataclasses for the model and the training run, YAML presets, overrides.

Every key has one flat name (`n_layer`, `learning_rate`, ...), unique across the sections, so a
preset, a YAML file and `--key-name value` on the command line all address keys the same way.
A config file may be flat or split into `model:` / `train:` sections; the resolved config that
is written into a run directory is always split and lists every key.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import QuillError

CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"
PACKAGED_CONFIGS_DIR = Path(__file__).resolve().parent / "presets"


# The model's dropout sites, each a ModelConfig key (see ModelConfig.dropout_at).
DROPOUT_SITES = ("embd_dropout", "attn_dropout", "attn_out_dropout", "mlp_dropout", "resid_dropout")


@dataclass
class ModelConfig:
    kind: str = "gpt"  # gpt | bigram | single-head | multi-head | block (the learning ladder)
    vocab_size: int = 0  # set from the tokenizer when 0
    block_size: int = 256  # context length in tokens
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    dropout: float = 0.0  # the rate of every dropout site below left empty (null)
    # Dropout per site (docs/training.md); null: `dropout`.
    embd_dropout: float | None = None  # on the token + position embeddings
    attn_dropout: float | None = None  # on the attention weights
    attn_out_dropout: float | None = None  # on each attention block's output, before it is added
    mlp_dropout: float | None = None  # on each MLP's output, before it is added
    resid_dropout: float = 0.0  # on the residual stream after each add ("residual dropout")
    bias: bool = True  # biases in Linear and LayerNorm layers, as GPT-2
    # Speedrun options (docs/speedrun.md); the defaults are GPT-2's architecture.
    rope: bool = False  # rotary position embeddings instead of learned ones
    rope_base: float = 10000.0  # rotary frequencies: base^(-2i/head_size)
    qk_norm: bool = False  # normalise queries and keys per head (zero mean, unit RMS) before attention
    norm: str = "layernorm"  # layernorm | rmsnorm
    activation: str = "gelu"  # gelu (GPT-2's tanh approximation) | relu2 (ReLU squared)
    tie_embeddings: bool = True  # LM head shares the token embedding's weights
    zero_init: bool = False  # output projections (and an untied LM head) start at zero
    logit_softcap: float = 0.0  # logits = cap * tanh(logits / cap); 0 disables

    def validate(self) -> None:
        for name in ("block_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) <= 0:
                raise QuillError(f"{name} must be positive, got {getattr(self, name)}")
        if self.n_embd % self.n_head != 0:
            raise QuillError(
                f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})"
            )
        for name in ("dropout", *DROPOUT_SITES):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value < 1.0:
                raise QuillError(f"{name} must be in [0, 1), got {value}")
        if self.norm not in ("layernorm", "rmsnorm"):
            raise QuillError(f"norm must be layernorm or rmsnorm, got {self.norm!r}")
        if self.activation not in ("gelu", "relu2"):
            raise QuillError(f"activation must be gelu or relu2, got {self.activation!r}")
        if self.rope and (self.n_embd // self.n_head) % 2:
            raise QuillError(f"rope needs an even head size, got n_embd/n_head = {self.n_embd // self.n_head}")
        if self.rope_base <= 1.0 or self.logit_softcap < 0.0:
            raise QuillError("rope_base must be > 1 and logit_softcap >= 0")

    def dropout_at(self, site: str) -> float:
        """The dropout rate at `site` (one of DROPOUT_SITES): its own key, else `dropout`."""
        value = getattr(self, site)
        return self.dropout if value is None else value

    def non_gpt2_options(self) -> list[str]:
        """The options set that GPT-2's architecture (and HF's GPT2LMHeadModel) lacks."""
        found = [] if self.bias else ["bias false"]
        found += [name for name in ("rope", "qk_norm") if getattr(self, name)]
        found += [f"{name} {getattr(self, name)}" for name, gpt2 in (("norm", "layernorm"), ("activation", "gelu"))
                  if getattr(self, name) != gpt2]
        if not self.tie_embeddings:
            found.append("tie_embeddings false")
        if self.logit_softcap:
            found.append(f"logit_softcap {self.logit_softcap:g}")
        return found


@dataclass
class TrainConfig:
    data: str | None = None  # text file, directory, .jsonl, .parquet, URL or prepared dir; None: shakespeare
    out: str | None = None  # run directory; default runs/<data name>
    tokenizer: str = "char"
    init_from: str | None = None  # fine-tune from a run directory, HF GPT-2 directory or hub id
    max_megabytes: float | None = None  # use only the first N MB of the data
    val_fraction: float = 0.1  # held out for validation: whole documents, or the tail of one text
    text_field: str = "text"  # .jsonl data: the field holding the text
    column: str | None = None  # .parquet data: the text column (default: the first string column)
    encoding_errors: str = "strict"  # strict: invalid UTF-8 is an error; replace: U+FFFD instead
    batch_size: int = 64
    gradient_accumulation_steps: int = 1
    max_iters: int = 5000
    learning_rate: float = 1e-3
    min_lr: float = 1e-4
    warmup_iters: int = 100
    lr_decay_iters: int | None = None  # defaults to max_iters
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0  # 0 disables clipping
    lr_schedule: str = "cosine"  # cosine | wsd (warmup, hold, linear cooldown to min_lr)
    cooldown_frac: float = 0.4  # wsd: the share of the run after warmup spent cooling down
    optimizer: str = "adamw"  # adamw | muon (Muon for hidden matrices, AdamW for the rest)
    muon_lr: float = 0.02  # Muon's peak learning rate (follows the same schedule)
    muon_momentum: float = 0.95
    muon_weight_decay: float = 0.0
    eval_interval: int = 250
    eval_iters: int = 200
    log_interval: int = 10
    seed: int = 1337
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    dtype: str = "float32"  # float32 | bfloat16 | float16 | auto (fastest safe for the device)
    compile: bool = False
    sample_tokens: int = 200  # length of the sample printed at the end; 0 disables it
    checkpoint_interval: int = 0  # steps between train_state/ checkpoints; 0: every eval_interval
    keep_last: int = 2  # checkpoints kept in train_state/ (plus the one with the best val loss)
    time_budget: str | None = None  # e.g. 90s, 5m, 1.5h: fit the whole run, LR decay included
    fsdp: bool = False  # under torchrun: shard parameters, gradients, optimizer state
    tensorboard: bool = False  # also log to RUN/tensorboard/

    def validate(self) -> None:
        for name in ("batch_size", "gradient_accumulation_steps", "eval_interval", "eval_iters",
                     "log_interval"):
            if getattr(self, name) <= 0:
                raise QuillError(f"{name} must be positive, got {getattr(self, name)}")
        if self.max_iters < 0:
            raise QuillError(f"max_iters must be >= 0, got {self.max_iters}")
        if not 0.0 < self.val_fraction < 1.0:
            raise QuillError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.dtype not in ("float32", "bfloat16", "float16", "auto"):
            raise QuillError(f"dtype must be float32, bfloat16, float16 or auto, got {self.dtype!r}")
        if self.checkpoint_interval < 0 or self.keep_last < 1:
            raise QuillError("checkpoint_interval must be >= 0 and keep_last >= 1")
        if self.time_budget is not None:
            parse_duration(self.time_budget)
        if self.max_megabytes is not None and self.max_megabytes <= 0:
            raise QuillError(f"max_megabytes must be positive, got {self.max_megabytes}")
        if self.lr_schedule not in ("cosine", "wsd"):
            raise QuillError(f"lr_schedule must be cosine or wsd, got {self.lr_schedule!r}")
        if not 0.0 <= self.cooldown_frac <= 1.0:
            raise QuillError(f"cooldown_frac must be in [0, 1], got {self.cooldown_frac}")
        if self.optimizer not in ("adamw", "muon"):
            raise QuillError(f"optimizer must be adamw or muon, got {self.optimizer!r}")
        if self.learning_rate <= 0 or self.muon_lr <= 0 or not 0.0 <= self.muon_momentum < 1.0:
            raise QuillError("learning_rate and muon_lr must be positive, muon_momentum in [0, 1)")
        if self.encoding_errors not in ("strict", "replace"):
            raise QuillError(f"encoding_errors must be strict or replace, got {self.encoding_errors!r}")


def parse_duration(text: str) -> float:
    """Seconds in "90", "90s", "5m", "1.5h"."""
    units = {"s": 1, "m": 60, "h": 3600}
    value = str(text).strip().lower()
    scale = units.get(value[-1:], None)
    number = value[:-1] if scale else value
    try:
        seconds = float(number) * (scale or 1)
    except ValueError:
        seconds = -1
    if not seconds > 0:
        raise QuillError(f"time_budget must be a duration such as 90s, 5m or 1.5h, got {text!r}")
    return seconds


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> None:
        self.model.validate()
        self.train.validate()

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {"model": dataclasses.asdict(self.model), "train": dataclasses.asdict(self.train)}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def set(self, key: str, value: Any) -> None:
        """Set one key by its flat name (aliases allowed), converting strings to the key's type."""
        name = ALIASES.get(key.replace("-", "_"), key.replace("-", "_"))
        section = _section_of(name)
        target = getattr(self, section)
        setattr(target, name, coerce(name, value))

    def update(self, values: dict[str, Any]) -> None:
        for key, value in flatten(values).items():
            self.set(key, value)


# Names the seed projects use, accepted in YAML and on the command line.
ALIASES = {
    "steps": "max_iters",
    "n_ctxt": "block_size",
    "context_length": "block_size",
    "lr": "learning_rate",
    "d_model": "n_embd",
    "num_layers": "n_layer",
    "num_heads": "n_head",
}

MODEL_KEYS = [f.name for f in dataclasses.fields(ModelConfig)]
TRAIN_KEYS = [f.name for f in dataclasses.fields(TrainConfig)]
ALL_KEYS = MODEL_KEYS + TRAIN_KEYS
_FIELD_TYPES = {f.name: f.type for f in dataclasses.fields(ModelConfig)}
_FIELD_TYPES.update({f.name: f.type for f in dataclasses.fields(TrainConfig)})


def _section_of(name: str) -> str:
    if name in MODEL_KEYS:
        return "model"
    if name in TRAIN_KEYS:
        return "train"
    raise QuillError(unknown_key_message(name))


def unknown_key_message(name: str) -> str:
    close = difflib.get_close_matches(name, ALL_KEYS + list(ALIASES), n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return f"unknown config key {name!r}{hint}"


def key_type(name: str) -> tuple[type, bool]:
    """The base type of a key and whether it may be None."""
    hints = typing.get_type_hints(ModelConfig) | typing.get_type_hints(TrainConfig)
    tp = hints[name]
    optional = False
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = len(args) < len(typing.get_args(tp))
        tp = args[0]
    return tp, optional


def coerce(name: str, value: Any) -> Any:
    tp, optional = key_type(name)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null")):
        if optional:
            return None
        raise QuillError(f"{name} cannot be empty")
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on"):
                return True
            if isinstance(value, str) and value.lower() in ("false", "no", "0", "off"):
                return False
            raise ValueError
        if tp is int:
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            if isinstance(value, str):
                value = float(value) if any(c in value for c in ".eE") else int(value)
                if isinstance(value, float) and not value.is_integer():
                    raise ValueError
            return int(value)
        if tp is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if tp is str:
            if isinstance(value, (dict, list)):
                raise ValueError
            return str(value)
    except (TypeError, ValueError):
        pass
    raise QuillError(f"{name} must be {'a ' + tp.__name__}, got {value!r}")


def flatten(values: dict[str, Any]) -> dict[str, Any]:
    """Accept both flat configs and configs split into `model:` / `train:` sections."""
    if not isinstance(values, dict):
        raise QuillError("a config file must be a YAML mapping of keys to values")
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if key in ("model", "train") and isinstance(value, dict):
            for k, v in value.items():
                flat[str(k)] = v
        else:
            flat[str(key)] = value
    return flat


def preset_path(name: str) -> Path | None:
    for directory in (CONFIGS_DIR, PACKAGED_CONFIGS_DIR):
        path = directory / f"{name}.yaml"
        if path.is_file():
            return path
    return None


def list_presets() -> list[str]:
    names = set()
    for directory in (CONFIGS_DIR, PACKAGED_CONFIGS_DIR):
        if directory.is_dir():
            names.update(p.stem for p in directory.glob("*.yaml"))
    return sorted(names)


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise QuillError(f"config file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise QuillError(f"cannot read config file {path}: {e}") from None
    try:
        values = yaml.safe_load(text)
    except yaml.YAMLError as e:
        first = str(e).splitlines()[0] if str(e) else "syntax error"
        raise QuillError(f"{path} is not valid YAML: {first}") from None
    return values or {}


def load_config(config: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Build a config from defaults, then a preset name or YAML file, then overrides."""
    cfg = Config()
    if config is not None:
        path = Path(config)
        if not path.is_file() and not str(config).endswith((".yaml", ".yml")):
            found = preset_path(str(config))
            if found is None:
                close = difflib.get_close_matches(str(config), list_presets(), n=3, cutoff=0.4)
                hint = f"; did you mean {', '.join(close)}?" if close else ""
                raise QuillError(
                    f"unknown preset {str(config)!r} (presets: {', '.join(list_presets())}){hint}"
                )
            path = found
        cfg.update(read_yaml(path))
    if overrides:
        cfg.update(overrides)
    cfg.validate()
    return cfg


def config_from_dict(values: dict[str, Any]) -> Config:
    cfg = Config()
    cfg.update(values)
    return cfg
