"""Configuration: dataclasses for the model and the training run, YAML presets, overrides.

Every key has one flat name (`n_layer`, `learning_rate`, ...), unique across the sections, so a
preset, a YAML file and `--key-name value` on the command line all address keys the same way.
A config file may be flat or split into `model:` / `train:` sections; the resolved config that
is written into a run directory is always split and lists every key.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import numbers
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import QuillError, shown
from .fileio import read_regular

CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"
PACKAGED_CONFIGS_DIR = Path(__file__).resolve().parent / "presets"


def key(default: Any, help: str, shown: str | None = None) -> Any:
    """A config key's default and what it means: the one source of `quill train --help` and of
    the README's table of keys (`keys_markdown()`); `shown` replaces the default there."""
    return field(default=default, metadata={"help": help, "shown": shown})


# Upper bounds of the model's sizes: far above any real model, low enough that a typo (or a
# stranger's config) is refused before anything is allocated.
MODEL_SIZE_LIMITS = {"block_size": 1 << 20, "n_layer": 1 << 10, "n_head": 1 << 12, "n_embd": 1 << 16}
MAX_VOCAB_SIZE = 1 << 20  # as the tokenizers' bound
SEED_LIMIT = 2**63  # seeds are in 0 .. 2**63 - 1 (what torch, numpy and every generator take)

# The model's dropout sites, each a ModelConfig key (see ModelConfig.dropout_at).
DROPOUT_SITES = ("embd_dropout", "attn_dropout", "attn_out_dropout", "mlp_dropout", "resid_dropout")


@dataclass
class ModelConfig:
    kind: str = key("gpt", "gpt | bigram | single-head | multi-head | block (the learning ladder)")
    vocab_size: int = key(0, "set from the tokenizer when 0")
    block_size: int = key(256, "context length in tokens")
    n_layer: int = key(6, "transformer blocks")
    n_head: int = key(6, "attention heads")
    n_embd: int = key(384, "embedding width (divisible by n_head)")
    dropout: float = key(0.0, "dropout probability of every site below left empty (null)")
    # Dropout per site (docs/training.md); empty (null): `dropout`.
    embd_dropout: float | None = key(None, "on the token + position embeddings", shown="None (= dropout)")
    attn_dropout: float | None = key(None, "on the attention weights", shown="None (= dropout)")
    attn_out_dropout: float | None = key(None, "on each attention block's output, before it is added",
                                         shown="None (= dropout)")
    mlp_dropout: float | None = key(None, "on each MLP's output, before it is added", shown="None (= dropout)")
    resid_dropout: float = key(0.0, "on the residual stream itself, after each add (docs/training.md)")
    bias: bool = key(True, "biases in Linear and LayerNorm layers, as GPT-2")
    # Speedrun options (docs/speedrun.md); the defaults are GPT-2's architecture.
    rope: bool = key(False, "rotary position embeddings instead of learned ones")
    rope_base: float = key(10000.0, "rotary frequencies: base^(-2i/head_size)")
    qk_norm: bool = key(False, "normalise queries and keys per head (zero mean, unit RMS) before attention")
    norm: str = key("layernorm", "layernorm | rmsnorm")
    activation: str = key("gelu", "gelu (GPT-2's tanh approximation) | relu2 (ReLU squared)")
    tie_embeddings: bool = key(True, "LM head shares the token embedding's weights")
    zero_init: bool = key(False, "output projections (and an untied LM head) start at zero")
    logit_softcap: float = key(0.0, "logits = cap * tanh(logits / cap); 0 disables")

    def validate(self) -> None:
        for name, limit in MODEL_SIZE_LIMITS.items():
            if not 0 < getattr(self, name) <= limit:
                raise QuillError(f"{name} must be in 1..{limit:,}, got {shown(getattr(self, name))}")
        if not 0 <= self.vocab_size <= MAX_VOCAB_SIZE:
            raise QuillError(f"vocab_size must be in 0..{MAX_VOCAB_SIZE:,} (0: the tokenizer's), got "
                             f"{shown(self.vocab_size)}")
        check_finite(self, ("dropout", *DROPOUT_SITES, "rope_base", "logit_softcap"))
        if self.n_embd % self.n_head != 0:
            raise QuillError(
                f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})"
            )
        for name in ("dropout", *DROPOUT_SITES):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value < 1.0:
                raise QuillError(f"{name} must be in [0, 1), got {value}")
        if self.norm not in ("layernorm", "rmsnorm"):
            raise QuillError(f"norm must be layernorm or rmsnorm, got {shown(self.norm)}")
        if self.activation not in ("gelu", "relu2"):
            raise QuillError(f"activation must be gelu or relu2, got {shown(self.activation)}")
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
    data: str | None = key(None, "text file, directory, .jsonl, .parquet, URL or prepared dir; None: shakespeare")
    out: str | None = key(None, "run directory; default runs/<data name>")
    tokenizer: str = key("char", "char, syllable[:N], bpe[:N], gpt2, or a tokenizer .json")
    init_from: str | None = key(None, "fine-tune from a run directory, HF GPT-2 directory or hub id")
    max_megabytes: float | None = key(None, "use only the first N MB of the data")
    val_fraction: float = key(0.1, "held out for validation: whole documents, or the tail of one text")
    text_field: str = key("text", ".jsonl data: the field holding the text")
    column: str | None = key(None, ".parquet data: the text column (default: the first string column)")
    encoding_errors: str = key("strict", "strict: invalid UTF-8 is an error; replace: U+FFFD instead")
    sft_too_long: str = key("truncate", "quill sft: a conversation longer than the context is truncate(d) or drop(ped)")
    sft_skip_invalid: bool = key(False, "quill sft: skip (and count) invalid conversations instead of stopping")
    reward: str = key("exact", "quill rl: exact | number | regex:PATTERN | python:FILE:FUNCTION (docs/rl.md)")
    eval_data: str | None = key(None, "quill rl: held-out tasks (.jsonl); None: val_fraction of --data is held out")
    rl_group_size: int = key(8, "quill rl: replies sampled per prompt, compared with each other (batch_size: prompts)")
    rl_temperature: float = key(1.0, "quill rl: sampling temperature of the replies")
    rl_top_k: int = key(0, "quill rl: sample replies from the k likeliest tokens; 0: from all")
    rl_max_reply_tokens: int = key(128, "quill rl: a reply is cut after this many tokens")
    rl_std_advantage: bool = key(False, "quill rl: divide each group's advantages by the std of its rewards")
    rl_kl: float = key(0.0, "quill rl: weight of the KL penalty to the starting model; 0: none")
    rl_updates: int = key(1, "quill rl: optimizer steps per rollout batch; above 1, the PPO-clipped loss")
    rl_clip: float = key(0.2, "quill rl: with rl_updates > 1, the probability ratio is clipped to [1 - clip, 1 + clip]")
    rl_pass_k: int = key(8, "quill rl: k of the held-out pass@k (k samples per task)")
    rl_eval_limit: int = key(200, "quill rl: held-out tasks scored at each evaluation")
    rl_no_signal_steps: int = key(50, "quill rl: stop after this many steps of equal rewards in every group; 0: never")
    batch_size: int = key(64, "sequences per micro-batch")
    gradient_accumulation_steps: int = key(1, "micro-batches per optimizer step")
    max_iters: int = key(5000, "optimizer steps")
    learning_rate: float = key(1e-3, "peak AdamW learning rate")
    min_lr: float = key(1e-4, "learning rate at the end of the cosine decay")
    warmup_iters: int = key(100, "linear warmup steps")
    lr_decay_iters: int | None = key(None, "defaults to max_iters")
    weight_decay: float = key(0.1, "AdamW weight decay, on matrices only")
    beta1: float = key(0.9, "AdamW beta1")
    beta2: float = key(0.99, "AdamW beta2")
    grad_clip: float = key(1.0, "0 disables clipping")
    lr_schedule: str = key("cosine", "cosine | wsd (warmup, hold, linear cooldown to min_lr)")
    cooldown_frac: float = key(0.4, "wsd: the share of the run after warmup spent cooling down")
    optimizer: str = key("adamw", "adamw | muon (Muon for hidden matrices, AdamW for the rest)")
    muon_lr: float = key(0.02, "Muon's peak learning rate (follows the same schedule)")
    muon_momentum: float = key(0.95, "Muon's momentum (Nesterov)")
    muon_weight_decay: float = key(0.0, "decoupled weight decay of the Muon matrices")
    eval_interval: int = key(250, "steps between evaluations")
    eval_iters: int = key(200, "batches per evaluation (each split)")
    eval_tasks: str | None = key(None, "lm-evaluation-harness tasks to run while training, comma-separated "
                                       "(docs/eval.md; needs quillgpt[eval])")
    eval_tasks_interval: int = key(0, "steps between task runs, a multiple of eval_interval; 0: eval_interval")
    eval_tasks_limit: float | None = key(None, "items per task (below 1: a fraction of each); None: all")
    eval_tasks_path: str | None = key(None, "a directory of task YAMLs to add (lm-eval's --include_path)")
    log_interval: int = key(10, "steps between metrics rows")
    seed: int = key(1337, "fixes init, batches and the end sample")
    device: str = key("auto", "auto | cpu | cuda | cuda:N | mps")
    dtype: str = key("float32", "float32 | bfloat16 | float16 | auto (fastest safe for the device)")
    compile: bool = key(False, "torch.compile the model (falls back with a message)")
    sample_tokens: int = key(200, "length of the sample printed at the end; 0 disables it")
    sample_temperature: float | None = key(None, "the temperature this run recommends: the served page starts "
                                                 "from it (quill sft: 0, greedy); None: 0.8")
    checkpoint_interval: int = key(0, "steps between train_state/ checkpoints; 0: every eval_interval")
    keep_last: int = key(2, "checkpoints kept in train_state/ (plus the one with the best val loss)")
    time_budget: str | None = key(None, "e.g. 90s, 5m, 1.5h: fit the whole run, LR decay included")
    fsdp: bool = key(False, "under torchrun: shard parameters, gradients, optimizer state")
    tensorboard: bool = key(False, "also log to RUN/tensorboard/")

    def validate(self) -> None:
        check_finite(self, [f.name for f in dataclasses.fields(self) if key_type(f.name)[0] is float])
        for name in ("batch_size", "gradient_accumulation_steps", "eval_interval", "eval_iters",
                     "log_interval"):
            if getattr(self, name) <= 0:
                raise QuillError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("max_iters", "warmup_iters", "sample_tokens"):
            if getattr(self, name) < 0:
                raise QuillError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.sample_temperature is not None and self.sample_temperature < 0:
            raise QuillError(f"sample_temperature must be >= 0 (0: greedy), got {self.sample_temperature}")
        if self.lr_decay_iters is not None and self.lr_decay_iters < 1:
            raise QuillError(f"lr_decay_iters must be >= 1 (or empty: max_iters), got {self.lr_decay_iters}")
        if not 0 <= self.seed < SEED_LIMIT:
            raise QuillError(f"seed must be in 0 .. 2**63 - 1, got {shown(self.seed)}")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise QuillError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        for name in ("weight_decay", "muon_weight_decay", "min_lr", "grad_clip"):
            if getattr(self, name) < 0:
                raise QuillError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 < self.val_fraction < 1.0:
            raise QuillError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.dtype not in ("float32", "bfloat16", "float16", "auto"):
            raise QuillError(f"dtype must be float32, bfloat16, float16 or auto, got {shown(self.dtype)}")
        if self.checkpoint_interval < 0 or self.keep_last < 1:
            raise QuillError("checkpoint_interval must be >= 0 and keep_last >= 1")
        if self.time_budget is not None:
            parse_duration(self.time_budget)
        if self.max_megabytes is not None and self.max_megabytes <= 0:
            raise QuillError(f"max_megabytes must be positive, got {self.max_megabytes}")
        if self.lr_schedule not in ("cosine", "wsd"):
            raise QuillError(f"lr_schedule must be cosine or wsd, got {shown(self.lr_schedule)}")
        if not 0.0 <= self.cooldown_frac <= 1.0:
            raise QuillError(f"cooldown_frac must be in [0, 1], got {self.cooldown_frac}")
        if self.optimizer not in ("adamw", "muon"):
            raise QuillError(f"optimizer must be adamw or muon, got {shown(self.optimizer)}")
        if self.learning_rate <= 0 or self.muon_lr <= 0 or not 0.0 <= self.muon_momentum < 1.0:
            raise QuillError("learning_rate and muon_lr must be positive, muon_momentum in [0, 1)")
        if self.sft_too_long not in ("truncate", "drop"):
            raise QuillError(f"sft_too_long must be truncate or drop, got {self.sft_too_long!r}")
        self._validate_rl()
        if self.eval_tasks_interval < 0 or self.eval_tasks_interval % self.eval_interval:
            raise QuillError(f"eval_tasks_interval must be a multiple of eval_interval ({self.eval_interval}), "
                             f"got {self.eval_tasks_interval}")
        if self.eval_tasks_limit is not None and self.eval_tasks_limit <= 0:
            raise QuillError(f"eval_tasks_limit must be positive, got {self.eval_tasks_limit}")
        if self.encoding_errors not in ("strict", "replace"):
            raise QuillError(f"encoding_errors must be strict or replace, got {shown(self.encoding_errors)}")

    def _validate_rl(self) -> None:
        """The `quill rl` keys (the reward itself is read, and its code loaded, by quillgpt.rl)."""
        if not (self.reward in ("exact", "number") or self.reward.startswith(("regex:", "python:"))):
            raise QuillError(f"reward must be exact, number, regex:PATTERN or python:FILE:FUNCTION, got "
                             f"{shown(self.reward)}")
        if self.rl_group_size < 2:
            raise QuillError(f"rl_group_size must be at least 2 (each reply is compared with the others to "
                             f"the same prompt), got {self.rl_group_size}")
        if not self.rl_temperature > 0:
            raise QuillError(f"rl_temperature must be > 0 (equal greedy replies teach nothing), got "
                             f"{self.rl_temperature}")
        for name in ("rl_top_k", "rl_no_signal_steps"):
            if getattr(self, name) < 0:
                raise QuillError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("rl_max_reply_tokens", "rl_updates", "rl_pass_k", "rl_eval_limit"):
            if getattr(self, name) < 1:
                raise QuillError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.rl_kl < 0 or not 0 < self.rl_clip < 1:
            raise QuillError(f"rl_kl must be >= 0 and rl_clip in (0, 1), got {self.rl_kl} and {self.rl_clip}")


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
    if not 0 < seconds < math.inf:
        raise QuillError(f"time_budget must be a duration such as 90s, 5m or 1.5h, got {shown(text)}")
    return seconds


def check_finite(section: Any, names: Any) -> None:
    """Every float key named must be a finite number (NaN and infinity pass most range checks)."""
    for name in names:
        value = getattr(section, name)
        if value is not None and not math.isfinite(value):
            raise QuillError(f"{name} must be a finite number, got {value}")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    # the keys given a value (by a config file or an override), as opposed to left at their
    # defaults: a default may depend on the run (fine-tuning's learning rate, hf.init_from)
    given: set[str] = field(default_factory=set, compare=False, repr=False)

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
        self.given.add(name)

    def is_default(self, name: str) -> bool:
        """Whether key `name` was given no value and still has its default."""
        section = getattr(self, _section_of(name))
        return name not in self.given and getattr(section, name) == _FIELDS[name].default

    def update(self, values: dict[str, Any]) -> None:
        for key, value in flatten(values).items():
            self.set(key, value)


FINETUNE_LR = 3e-5  # the learning rate fine-tuning starts from unless one is given (hf.init_from)

# quill sft's own defaults where they differ from quill train's (a value the user gives wins)
SFT_DEFAULTS: dict[str, Any] = {"sample_tokens": 0}  # the end shows a held-out conversation's reply

# The keys that matter most to `quill sft`, first in its --help, as (meaning, default) there
# (here, not in sft.py, so that `quill --help` and the tokenizer commands start without torch)
SFT_KEY_HELP: dict[str, tuple[str, str]] = {
    "data": ("conversations in OpenAI's messages shape: a .jsonl or .parquet file (docs/chat.md)",
             "none: required"),
    "init_from": ("the model to fine-tune: a run directory, HF GPT-2 directory or hub id",
                  "None: a fresh model"),
    "out": ("run directory", "runs/<data name>"),
    "learning_rate": ("peak AdamW learning rate",
                      f"{FINETUNE_LR:g} with init_from, else {TrainConfig.learning_rate:g}"),
    "min_lr": ("learning rate at the end of the cosine decay",
               f"{FINETUNE_LR / 10:g} with init_from and no learning_rate given, else {TrainConfig.min_lr:g}"),
    "max_iters": ("optimizer steps", f"{TrainConfig.max_iters}"),
    "sample_tokens": ("length of a text sample printed at the end",
                      f"{SFT_DEFAULTS['sample_tokens']}: a held-out conversation's reply is printed instead"),
    "sample_temperature": ("the temperature this run recommends (the served page starts from it)",
                           "0: greedy, a learnt reply is the likeliest one"),
    "sft_too_long": ("a conversation longer than the context is truncate(d) or drop(ped)",
                     f'"{TrainConfig.sft_too_long}"'),
    "sft_skip_invalid": ("skip (and count) invalid conversations instead of stopping",
                         f"{TrainConfig.sft_skip_invalid}"),
}


# What `quill rl` starts from unless the preset or the flags say otherwise: RL takes small steps
# from a model that already answers sometimes (docs/rl.md: how these were measured).
RL_DEFAULTS: dict[str, Any] = {
    "batch_size": 8, "learning_rate": 1e-4, "min_lr": 1e-5, "warmup_iters": 10, "max_iters": 500,
    "weight_decay": 0.0, "eval_interval": 50, "eval_iters": 10, "log_interval": 5, "sample_tokens": 0,
}
# The keys that matter most to `quill rl`, first in its --help, as (meaning, default) there
# (here, not in rl.py, so that `quill --help` and the tokenizer commands start without torch)
RL_KEY_HELP: dict[str, tuple[str, str]] = {
    "init_from": ("the chat model to improve: a run trained with quill sft (any run with the chat template)",
                  "none: required"),
    "data": ("tasks: a .jsonl file, one {\"messages\": [...], \"answer\": ...} per line (docs/rl.md)",
             "none: required"),
    "reward": ("exact | number | regex:PATTERN | python:FILE:FUNCTION (docs/rl.md)", '"exact"'),
    "eval_data": ("held-out tasks for pass@1 and pass@k (.jsonl)", "None: val_fraction of data is held out"),
    "out": ("run directory", "runs/<data name>"),
    "batch_size": ("prompts per micro-batch, each answered rl_group_size times", "8"),
    "learning_rate": ("peak AdamW learning rate", f"{RL_DEFAULTS['learning_rate']:g}"),
    "min_lr": ("learning rate at the end of the cosine decay", f"{RL_DEFAULTS['min_lr']:g}"),
    "warmup_iters": ("linear warmup steps", f"{RL_DEFAULTS['warmup_iters']}"),
    "max_iters": ("optimizer steps (--time-budget fits them to a wall-clock time)", f"{RL_DEFAULTS['max_iters']}"),
    "weight_decay": ("AdamW weight decay, on matrices only", f"{RL_DEFAULTS['weight_decay']:g}"),
    "eval_interval": ("steps between held-out pass@1 / pass@k evaluations", f"{RL_DEFAULTS['eval_interval']}"),
    "eval_iters": ("batches of held-out reference answers per val_loss", f"{RL_DEFAULTS['eval_iters']}"),
    "log_interval": ("steps between metrics rows (mean reward, signal, reply length)",
                     f"{RL_DEFAULTS['log_interval']}"),
    "sample_tokens": ("length of a text sample printed at the end", f"{RL_DEFAULTS['sample_tokens']}"),
}
for _key in ("rl_group_size", "rl_temperature", "rl_top_k", "rl_max_reply_tokens", "rl_std_advantage", "rl_kl",
             "rl_updates", "rl_clip", "rl_pass_k", "rl_eval_limit", "rl_no_signal_steps"):
    _field = TrainConfig.__dataclass_fields__[_key]
    RL_KEY_HELP[_key] = (_field.metadata["help"].removeprefix("quill rl: "), repr(_field.default))


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
_FIELDS = {f.name: f for f in (*dataclasses.fields(ModelConfig), *dataclasses.fields(TrainConfig))}
_FIELD_TYPES = {f.name: f.type for f in dataclasses.fields(ModelConfig)}
_FIELD_TYPES.update({f.name: f.type for f in dataclasses.fields(TrainConfig)})


def _section_of(name: str) -> str:
    if name in MODEL_KEYS:
        return "model"
    if name in TRAIN_KEYS:
        return "train"
    raise QuillError(unknown_key_message(name))


def unknown_key_message(name: str) -> str:
    close = difflib.get_close_matches(name[:100], ALL_KEYS + list(ALIASES), n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return f"unknown config key {shown(name)}{hint}"


def key_help(name: str) -> tuple[str, str]:
    """(what the key means, its default as shown) for `--help` and the README's table."""
    f = _FIELDS[name]
    shown = f.metadata.get("shown") or (f'"{f.default}"' if isinstance(f.default, str) else repr(f.default))
    return f.metadata.get("help", ""), shown


def keys_markdown() -> str:
    """The README's table of every config key (tests/test_config_help.py keeps the two equal)."""
    rows = ["| key (flag `--key-name`) | default | meaning |", "| --- | --- | --- |"]
    for name in ALL_KEYS:
        meaning, shown = key_help(name)
        rows.append(f"| `{name}` | `{shown}` | {meaning.replace('|', chr(92) + '|')} |")
    return "\n".join(rows)


@functools.cache
def _type_hints() -> dict[str, Any]:
    """Every key's annotation, resolved once (the CLI asks for each key's type several times)."""
    return typing.get_type_hints(ModelConfig) | typing.get_type_hints(TrainConfig)


def key_type(name: str) -> tuple[type, bool]:
    """The base type of a key and whether it may be None."""
    tp = _type_hints()[name]
    optional = False
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = len(args) < len(typing.get_args(tp))
        tp = args[0]
    return tp, optional


SCALARS = (str, numbers.Number)  # numbers: bool, int, float and numpy's scalars
TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def coerce(name: str, value: Any) -> Any:
    """`value` as key `name`'s type; anything but a scalar (a list, a mapping) is refused before
    it is looked at further."""
    tp, optional = key_type(name)
    if value is not None and not isinstance(value, SCALARS):
        raise QuillError(f"{name} must be {TYPE_NAMES[tp]}, got a {type(value).__name__}")
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
            return str(value)
    except (TypeError, ValueError, OverflowError):
        pass
    raise QuillError(f"{name} must be {TYPE_NAMES[tp]}, got {shown(value)}")


def flatten(values: dict[str, Any]) -> dict[str, Any]:
    """Accept both flat configs and configs split into `model:` / `train:` sections."""
    if not isinstance(values, dict):
        raise QuillError("a config file must be a YAML mapping of keys to values")
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if key in ("model", "train") and isinstance(value, dict):
            for k, v in value.items():
                flat[_key_name(k)] = v
        else:
            flat[_key_name(key)] = value
    return flat


def _key_name(key: Any) -> str:
    if not isinstance(key, (str, int, float, bool)) and key is not None:
        raise QuillError(f"config keys must be names, got a {type(key).__name__}")
    return str(key)


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


MAX_YAML_BYTES = 16 << 20  # a config file is a few KB


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        text = read_regular(path, MAX_YAML_BYTES).decode("utf-8")
    except FileNotFoundError:
        raise QuillError(f"config file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise QuillError(f"cannot read config file {path}: {e}") from None
    return parse_yaml(text, path)


def parse_yaml(text: str, path: str | Path) -> Any:
    """YAML (safe: no tags run code) or QuillError with the problem and its place, in one line."""
    try:
        values = yaml.safe_load(text)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise QuillError(f"{path} is not valid YAML: {e.problem or e.context or 'syntax error'}{where}") from None
    except yaml.YAMLError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "syntax error"
        raise QuillError(f"{path} is not valid YAML: {first}") from None
    except RecursionError:
        raise QuillError(f"{path} is not a config: it is nested too deeply") from None
    return values or {}


def load_config(config: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Build a config from defaults, then a preset name or YAML file, then overrides."""
    cfg = Config()
    if config is not None:
        path = Path(config)
        if not path.is_file() and not str(config).endswith((".yaml", ".yml")):
            found = preset_path(str(config))
            if found is None:
                close = difflib.get_close_matches(str(config)[:100], list_presets(), n=3, cutoff=0.4)
                hint = f"; did you mean {', '.join(close)}?" if close else ""
                raise QuillError(
                    f"unknown preset {shown(str(config))} (presets: {', '.join(list_presets())}){hint}"
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
