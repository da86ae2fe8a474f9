"""`quill`: the command line. Thin: parse, call the library, print.

Each subcommand is a pair of functions, `add_<name>(subparsers)` and `cmd_<name>(args)`,
listed in COMMANDS at the bottom. The pieces several commands share are written once here:
the training options and config-key flags (`add_training_flags`, `training_config`,
`report_done`), a run and its weights (`add_weights_flags`, `open_run`), the sampling flags
(`add_sampling_flags`, `sampling_settings`). The prompt loop and the streaming printer of
`quill sample --interactive` and `quill chat` are the library's (`quillgpt.terminal`).

Heavy imports (torch) happen inside the commands that need them, so `quill --help` and the
tokenizer commands start fast. No parser guesses a shortened flag (`allow_abbrev=False`).
Mistakes a user can make end as one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from .errors import QuillError, shown

START_TIME = time.time()
RUN_HELP = "run directory (written by quill train, quill sft or quill import-hf)"


class HelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default, unless it says it already or there is none."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if "default" in text or default in (None, False, "", argparse.SUPPRESS) or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump), exit status 2, defaults in --help, and no
    prefix matching: `--lr-dec` is an unknown flag, never a guess at `--lr-decay-iters`."""

    def __init__(self, *args: Any, **kwargs: Any):
        kwargs.setdefault("formatter_class", HelpFormatter)
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        raise QuillError(f"{self.prog}: {message}")


def eprint(*args: Any) -> None:
    print(*args, file=sys.stderr, flush=True)


def warn_line(message: str) -> None:
    eprint(f"warning: {message}")


# --- config keys as flags ---------------------------------------------------------------------

CONFIG_KEYS_TITLE = "config keys (override the preset; the defaults are before any preset)"


def add_config_flags(parser: argparse.ArgumentParser, title: str = CONFIG_KEYS_TITLE,
                     keys: Sequence[str] | None = None,
                     shown: dict[str, tuple[str, str]] | None = None) -> None:
    """One `--key-name VALUE` flag per config key in `keys` (default: all), plus the seeds'
    names for it (`--steps`, `--lr`, ...: config.ALIASES); values are checked by the config.
    `shown` replaces a key's (meaning, default) in --help where a command has its own."""
    from .config import ALIASES, ALL_KEYS, key_help, key_type

    also: dict[str, list[str]] = {}
    for alias, key in ALIASES.items():
        also.setdefault(key, []).append("--" + alias.replace("_", "-"))
    parser.set_defaults(config_keys=True)
    group = parser.add_argument_group(title)
    for key in ALL_KEYS if keys is None else keys:
        flags = ["--" + key.replace("_", "-"), *also.get(key, [])]
        tp, _ = key_type(key)
        meaning, default = (shown or {}).get(key) or key_help(key)
        text = f"{meaning} (default: {default})".replace("%", "%%")
        if tp is bool:
            group.add_argument(*flags, dest=f"cfg_{key}", nargs="?", const="true",
                               default=argparse.SUPPRESS, metavar="BOOL", help=text)
        else:
            group.add_argument(*flags, dest=f"cfg_{key}", default=argparse.SUPPRESS,
                               metavar=tp.__name__.upper(), help=text)


def config_overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {k[4:]: v for k, v in vars(args).items() if k.startswith("cfg_")}


def reject_unknown(extra: list[str], config_keys: bool) -> None:
    """Unknown `--flags`: for a command that takes config keys, the close matches among the keys
    and their aliases; for any other, the flags as argparse would name them."""
    if not extra:
        return
    from .config import unknown_key_message

    for item in extra:
        if item.startswith("--") and config_keys:
            raise QuillError(unknown_key_message(item[2:].split("=")[0].replace("-", "_")))
        if item.startswith("-"):
            raise QuillError(f"unrecognized arguments: {' '.join(extra)}")
    raise QuillError(f"unexpected argument {extra[0]!r}")


# --- what quill train and quill sft share -----------------------------------------------------

def add_training_flags(p: argparse.ArgumentParser, config_help: str) -> None:
    """The run options of `quill train` and `quill sft` (the config keys come after a command's own)."""
    p.add_argument("--config", help=config_help)
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    p.add_argument("--no-save", action="store_true", help="write no run directory")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--resume", metavar="RUN",
                   help="continue RUN from its newest intact checkpoint (RUN/train_state/)")
    p.add_argument("--allow-config-change", action="store_true",
                   help="with --resume: accept changed schedule/logging keys such as --max-iters")


def training_config(args: argparse.Namespace, defaults: dict[str, Any] | None = None) -> tuple[Any, Any, str | None]:
    """(config, where --data says the data is now on --resume, the preset chosen for the user).

    A new run: `defaults` (the command's own), then --config (or, given none, the preset for
    this machine), then the flags the user typed. --resume: the run's own config, then the flags."""
    from .config import load_config
    from .train import default_preset, resume_config

    overrides = config_overrides(args)
    if args.resume:
        if args.no_save:
            raise QuillError("--resume writes into the run; it cannot be combined with --no-save")
        resume_data = overrides.pop("data", None)  # never downloaded; checked against the run
        return resume_config(args.resume, args.config, overrides, args.allow_config_change), resume_data, None
    if args.allow_config_change:
        raise QuillError("--allow-config-change only applies with --resume RUN")
    chosen = default_preset(overrides) if args.config is None else None
    return load_config(args.config or chosen, {**(defaults or {}), **overrides}), None, chosen


def report_done(result: Any, then: str = "") -> None:
    """The end of a training run: its figures, where it was saved (and `then`, what to do next)."""
    eprint(f"done: {result.steps} steps in {result.elapsed_s:.1f} s, train loss {result.train_loss:.4f}, "
           f"val loss {result.val_loss:.4f} (best {result.best_val_loss:.4f}), "
           f"{result.tokens_per_s:,.0f} tokens/s")
    if result.run_dir is not None:
        eprint(f"run saved to {result.run_dir}{then.format(run=result.run_dir)}")


# --- a run, its weights, sampling ---------------------------------------------------------------

def add_weights_flags(p: argparse.ArgumentParser, device: str = "cpu") -> None:
    """--device, --best, --dtype: which weights of RUN, where, in what precision (`open_run`)."""
    order = "cpu | auto" if device == "cpu" else "auto | cpu"
    p.add_argument("--device", default=device, help=f"{order} | cuda | cuda:N | mps")
    p.add_argument("--best", action="store_true", help="use the weights with the lowest val loss")
    p.add_argument("--dtype", default="float32", metavar="DTYPE",
                   help="float32 (default) | bfloat16 | int8 (weight-only, per-channel scales) | auto "
                        "(bfloat16 where the hardware has it, else float32); see docs/generation.md")


def weights_file(args: argparse.Namespace) -> str:
    from .checkpoint import BEST_FILE, MODEL_FILE

    return BEST_FILE if args.best else MODEL_FILE


def open_run(args: argparse.Namespace) -> Any:
    """The run `args.run` with the weights, device and precision the flags ask for."""
    from .checkpoint import load_run
    from .runtime import resolve_device

    return load_run(args.run, resolve_device(args.device), weights_file(args), dtype=args.dtype, warn=warn_line)


def add_sampling_flags(p: argparse.ArgumentParser, max_new_tokens: int, what: str) -> None:
    """The sampling controls of `quill sample` and `quill chat` (see quillgpt.generate)."""
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help=what)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy, deterministic (default 0.8)")
    p.add_argument("--top-k", type=int, default=200, help="keep the k most likely tokens (0 = all)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling: keep this much probability")
    p.add_argument("--min-p", type=float, default=None,
                   help="drop tokens less likely than this times the most likely one")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help=">1 discourages repeats")


def sampling_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The sampling flags as keyword arguments of the library, checked."""
    from .generate import check_sampling_args

    settings = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k or None,
                    top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty)
    check_sampling_args(**settings)
    return settings


# --- quill train ------------------------------------------------------------------------------

def add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model on a text file",
                       usage="quill train [--config PRESET_OR_YAML] [--data FILE] [--KEY-NAME VALUE ...] [options]",
                       description="Train a model. Settings come from defaults, then --config "
                                   "(a preset name or YAML file), then --key-name flags.")
    add_training_flags(p, "preset name (e.g. shakespeare-char-cpu) or YAML file; without it: "
                          "shakespeare-char-cpu on a CPU, the defaults (nanoGPT's GPU recipe in shape, "
                          "without its dropout) on a GPU")
    add_config_flags(p)


def cmd_train(args: argparse.Namespace) -> int:
    from .train import Trainer, task_hooks

    cfg, resume_data, chosen = training_config(args)
    hooks = task_hooks(cfg, eprint)
    trainer = Trainer(cfg, overwrite=args.overwrite, save=not args.no_save,
                      progress=not args.no_progress, start_time=START_TIME, resume=args.resume,
                      resume_data=resume_data, hooks=hooks)
    for hook in hooks:
        hook.bind(trainer.tokenizer)
    if chosen and trainer.dist.is_main:
        eprint(f"no --config on a CPU: the {chosen} preset (nanoGPT's CPU recipe); "
               "--config shakespeare-char is its larger GPU recipe")
    result = trainer.run()
    if not trainer.dist.is_main:
        return 0
    report_done(result)
    if result.sample:
        eprint("sample:")
        print(result.sample)
    return 0


# --- quill sft --------------------------------------------------------------------------------

def add_sft(sub: argparse._SubParsersAction) -> None:
    from .config import ALL_KEYS, SFT_KEY_HELP

    p = sub.add_parser("sft", help="fine-tune a model on conversations (chat)",
                       usage="quill sft --data CONVERSATIONS [--init-from RUN] [--KEY-NAME VALUE ...] [options]",
                       description="Supervised fine-tuning on conversations in OpenAI's messages shape "
                                   "(--data chats.jsonl or .parquet) from --init-from RUN|HF_DIR|hub-id, "
                                   "or a fresh model. The loss is on the assistant's turns only; every "
                                   "quill train key is a flag. See docs/chat.md.")
    p.add_argument("--exact-match-every", type=int, default=0, metavar="N",
                   help="every N steps, score greedy replies to held-out conversations (val_exact_match)")
    add_training_flags(p, "preset name or YAML file; without it and without --init-from: "
                          "shakespeare-char-cpu on a CPU, the defaults on a GPU")
    add_config_flags(p, "quill sft's keys (the defaults are quill sft's)", list(SFT_KEY_HELP), SFT_KEY_HELP)
    add_config_flags(p, "the other config keys, as quill train's",
                     [k for k in ALL_KEYS if k not in SFT_KEY_HELP])


def cmd_sft(args: argparse.Namespace) -> int:
    from .chat import last_reply, replies
    from .config import SFT_DEFAULTS
    from .sft import sft_trainer

    if args.exact_match_every < 0:
        raise QuillError(f"--exact-match-every must be >= 0, got {args.exact_match_every}")
    cfg, resume_data, _ = training_config(args, SFT_DEFAULTS)
    if resume_data is not None:
        cfg.train.data = str(resume_data)  # where the conversations are now (checked)
    trainer = sft_trainer(cfg, overwrite=args.overwrite, save=not args.no_save,
                          progress=not args.no_progress, start_time=START_TIME, resume=args.resume,
                          exact_match_every=args.exact_match_every)
    result = trainer.run()
    # every rank answers (under FSDP each forward pass gathers the weights from all ranks)
    held_out = trainer.data.val_conversations  # those that fit the context whole
    if held_out:
        prompt, reference = last_reply(held_out[0])
        reply = replies(trainer.model, trainer.tokenizer, [prompt], max_new_tokens=64, temperature=0)[0]
    if not trainer.dist.is_main:
        return 0
    report_done(result, then="; talk to it with: quill chat {run}")
    if held_out:
        eprint(f"a held-out conversation, greedy: {shown(prompt[-1].content)} -> {shown(reply)} "
               f"(reference {shown(reference)})")
    return 0


# --- quill rl ---------------------------------------------------------------------------------

def add_rl(sub: argparse._SubParsersAction) -> None:
    from .config import ALL_KEYS, RL_KEY_HELP

    p = sub.add_parser("rl", help="improve a chat model with rewards it earns (reinforcement learning)",
                       usage="quill rl --init-from RUN --data TASKS [--reward SPEC] [--KEY-NAME VALUE ...] [options]",
                       description="Reinforcement learning from verifiable rewards: a chat model (--init-from, "
                                   "trained with quill sft) answers the tasks of --data (.jsonl, one {\"messages\": "
                                   "[...], \"answer\": ...} per line) in groups of samples, --reward scores each "
                                   "reply, and replies better than their group's mean become likelier. Every quill "
                                   "train key is a flag. See docs/rl.md.")
    add_training_flags(p, "preset name or YAML file (quill rl's defaults fill the keys it leaves unset)")
    add_config_flags(p, "quill rl's keys (the defaults are quill rl's)", list(RL_KEY_HELP), RL_KEY_HELP)
    add_config_flags(p, "the other config keys, as quill train's", [k for k in ALL_KEYS if k not in RL_KEY_HELP])


def cmd_rl(args: argparse.Namespace) -> int:
    from .rewards import parse_reward
    from .rl import rl_config, rl_trainer

    reward = None
    if args.resume:
        moved = vars(args).pop("cfg_eval_data", None)  # where the held-out tasks are now (checked)
        cfg, resume_data, _ = training_config(args)
        if resume_data is not None:
            cfg.train.data = str(resume_data)
        if moved is not None:
            cfg.train.eval_data = str(moved)
        if "cfg_reward" in vars(args):  # named again: its code may run
            reward = parse_reward(cfg.train.reward)
    else:
        if args.allow_config_change:
            raise QuillError("--allow-config-change only applies with --resume RUN")
        cfg = rl_config(args.config, config_overrides(args))
    trainer = rl_trainer(cfg, overwrite=args.overwrite, save=not args.no_save, progress=not args.no_progress,
                         start_time=START_TIME, resume=args.resume, reward=reward)
    result = trainer.run()
    if not trainer.dist.is_main:
        return 0
    rewards = [r["rl/reward"] for r in trainer.metrics if r.get("rl/reward")]
    evals = [r for r in trainer.metrics if r.get("rl/pass@1")]
    k = cfg.train.rl_pass_k
    said = f", mean reward {float(rewards[-1]):.3f} (last logged)" if rewards else ""
    if evals:
        last = evals[-1]
        said += f", held-out pass@1 {float(last['rl/pass@1']):.3f}, pass@{k} {float(last[f'rl/pass@{k}']):.3f}"
    eprint(f"done: {result.steps} steps in {result.elapsed_s:.1f} s{said}")
    if result.run_dir is not None:
        eprint(f"run saved to {result.run_dir}; talk to it with: quill chat {result.run_dir}")
    return 0


# --- quill plot -------------------------------------------------------------------------------

def add_plot(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plot", help="draw a run's loss curves into RUN/loss.png")
    p.add_argument("run", help=RUN_HELP)
    p.add_argument("--output", help="image path (default RUN/loss.png)")


def cmd_plot(args: argparse.Namespace) -> int:
    from .plot import plot_run

    eprint(f"wrote {plot_run(args.run, args.output)}")
    return 0


# --- quill sample -----------------------------------------------------------------------------

def add_sample(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sample", help="generate text from a trained run",
                       description="Continue a prompt with a trained run (KV-cached decoding; "
                                   "see docs/generation.md).")
    p.add_argument("run", help=RUN_HELP)
    p.add_argument("--prompt", default="", help="text to continue (default: none, the model starts afresh)")
    add_sampling_flags(p, 500, "tokens to generate per sample")
    p.add_argument("--stop", action="append", default=None, metavar="TEXT",
                   help="stop before this text (repeatable; \\n and \\t are newline and tab)")
    p.add_argument("--overflow", choices=["shift", "slide"], default="shift",
                   help="past the context: shift (fast, default) or slide (exact window, slow)")
    p.add_argument("--num-samples", type=int, default=1, help="samples to draw (sample i uses seed+i)")
    p.add_argument("--stream", action="store_true", help="print text as it is produced")
    p.add_argument("--interactive", action="store_true",
                   help="a small REPL: each line you type is a prompt to continue (line editing and "
                        "history at a terminal; Ctrl-C stops a sample, Ctrl-D or /exit quits)")
    p.add_argument("--seed", type=int, default=None, help="fixes the output (default: a random seed)")
    add_weights_flags(p)


def _unescape(text: str) -> str:
    return text.replace("\\n", "\n").replace("\\t", "\t")


def sample_pieces(run: Any, prompts: list[str], seed: int, settings: dict[str, Any]) -> Iterator[list[str]]:
    """The one place `quill sample` decodes: each step, the new text piece of every prompt
    (row b samples with seed + b, as `generate.generate_batch`)."""
    from .generate import Sampling, encode_prompt, start_ids, stream_texts

    block_size = run.model.config.block_size
    ids = [encode_prompt(run.tokenizer, p, block_size) or start_ids(run.tokenizer) for p in prompts]
    options = dict(settings)
    overflow = options.pop("overflow", "shift")
    return stream_texts(run.model, run.tokenizer, ids, Sampling(seed=seed, **options), overflow=overflow)


def cmd_sample(args: argparse.Namespace) -> int:
    import itertools
    import os

    from .generate import check_sampling_args, check_seed
    from .terminal import print_stream, prompt_loop

    stop = [_unescape(s) for s in args.stop] if args.stop else None
    settings = sampling_settings(args)
    check_sampling_args(stop=stop)
    if args.num_samples < 1:
        raise QuillError(f"--num-samples must be >= 1, got {args.num_samples}")
    check_seed(args.seed, args.num_samples)
    run = open_run(args)
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little")
    settings.update(stop=stop, overflow=args.overflow)

    def stream(prompt: str, seed: int, interruptible: bool = False) -> None:
        rows = sample_pieces(run, [prompt], seed, settings)
        if print_stream((pieces[0] for pieces in rows), head=prompt, interruptible=interruptible).stopped:
            eprint("(stopped)")

    if args.interactive:
        eprint("quill sample: type a prompt and press Enter (\\n for a newline); Ctrl-C stops a sample, "
               "Ctrl-D or /exit quits")
        turns = itertools.count(seed)
        prompt_loop(lambda line: stream(_unescape(line), next(turns), interruptible=True))
        return 0
    if args.stream:
        for i in range(args.num_samples):
            if i:
                print("---------------")
            stream(args.prompt, seed + i)
        return 0
    texts = [""] * args.num_samples  # the same prompt as one batch: row i uses seed + i
    for pieces in sample_pieces(run, [args.prompt] * args.num_samples, seed, settings):
        texts = [t + p for t, p in zip(texts, pieces)]
    print("\n---------------\n".join(args.prompt + t for t in texts))
    return 0


# --- quill chat -------------------------------------------------------------------------------

def add_chat(sub: argparse._SubParsersAction) -> None:
    from .terminal import CHAT_USAGE

    p = sub.add_parser("chat", help="talk to a chat model (one trained with quill sft)",
                       description=f"Chat with RUN in the terminal: type a message, the reply streams back "
                                   f"(line editing and history at a terminal). {CHAT_USAGE}. With "
                                   f"--message: print one reply and exit.")
    p.add_argument("run", help="run directory of a chat model")
    p.add_argument("--message", help="send this one message, print the reply, exit")
    p.add_argument("--system", help="system prompt")
    p.add_argument("--tools", metavar="NAMES",
                   help="built-in tools the model may call, comma-separated: calculator, python (off unless "
                        "named; a model fine-tuned on tool conversations, docs/tools.md)")
    add_sampling_flags(p, 256, "longest reply in tokens")
    p.add_argument("--seed", type=int, default=None, help="fixes the replies (reply n uses seed + n)")
    add_weights_flags(p)


def cmd_chat(args: argparse.Namespace) -> int:
    from .chat import ChatSession
    from .model import count_params
    from .terminal import CHAT_USAGE, ChatTerminal
    from .tools import builtin_tools

    sampling = dict(sampling_settings(args), seed=args.seed)
    tools = builtin_tools(args.tools) or None  # a misspelt name fails before the model loads
    run = open_run(args)
    terminal = ChatTerminal(ChatSession(run.model, run.tokenizer, system=args.system, sampling=sampling,
                                        tools=tools))
    if args.message is not None:
        terminal.reply(args.message, interruptible=False)
        return 0
    with_tools = f"; tools: {', '.join(tools)}" if tools else ""
    eprint(f"quill chat: {args.run} ({count_params(run.model) / 1e6:.2f}M parameters, context "
           f"{run.config.model.block_size} tokens{with_tools}). {CHAT_USAGE}.")
    terminal.run()
    return 0


# --- quill import-hf / export-hf / eval (Hugging Face GPT-2 interop) -------------------------

def add_import_hf(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("import-hf", help="import a Hugging Face GPT-2 checkpoint as a run",
                       description="Write a Hugging Face GPT-2 checkpoint (a local directory with "
                                   "config.json and model.safetensors or pytorch_model.bin, or a hub "
                                   "id such as gpt2, gpt2-medium, distilgpt2) as a run directory.")
    p.add_argument("src", help="local HF directory or hub id")
    p.add_argument("out", help="run directory to write")
    p.add_argument("--overwrite", action="store_true", help="replace what is in OUT")
    p.add_argument("--tokenizer", metavar="SPEC",
                   help="gpt2 or a tokenizer .json, for a checkpoint without tokenizer.json (or vocab.json "
                        "and merges.txt)")


def cmd_import_hf(args: argparse.Namespace) -> int:
    from .chat import has_chat_template
    from .checkpoint import load_run
    from .hf import import_hf
    from .model import count_params

    out = import_hf(args.src, args.out, overwrite=args.overwrite, tokenizer=args.tokenizer,
                    warn=warn_line)
    run = load_run(out)
    m = run.config.model
    eprint(f"imported {args.src}: {count_params(run.model) / 1e6:.2f}M parameters, {m.n_layer} layers, "
           f"{m.n_head} heads, n_embd {m.n_embd}, context {m.block_size}, vocabulary {m.vocab_size}")
    if has_chat_template(run.tokenizer):
        eprint(f"it has quillgpt's chat template: talk to it with quill chat {out}")
    eprint(f"run saved to {out}")
    return 0


def add_export_hf(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export-hf", help="export a run as a Hugging Face GPT-2 checkpoint",
                       description="Write a run (GPT architecture, byte-level BPE tokenizer) as a "
                                   "directory that transformers' GPT2LMHeadModel.from_pretrained and "
                                   "AutoTokenizer.from_pretrained load.")
    p.add_argument("run", help="run directory")
    p.add_argument("out", help="directory to write")
    p.add_argument("--overwrite", action="store_true", help="replace what is in OUT")


def cmd_export_hf(args: argparse.Namespace) -> int:
    from .hf import export_hf

    out = export_hf(args.run, args.out, overwrite=args.overwrite, warn=warn_line)
    eprint(f"exported {args.run} to {out} ({', '.join(sorted(p.name for p in out.iterdir()))})")
    return 0


# --- quill export-gguf (llama.cpp and what is built on it) --------------------------------------

def add_export_gguf(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export-gguf", help="export a run as a GGUF file for llama.cpp, Ollama, LM Studio",
                       description="Write a run as one GGUF file that llama.cpp loads and decodes to the same "
                                   "greedy tokens (docs/export.md): GPT-2-shaped runs as llama.cpp's gpt2 "
                                   "architecture (rope: gptneox), with the tokenizer and a chat run's template.")
    p.add_argument("run", help="run directory")
    p.add_argument("out", help="the .gguf file to write")
    p.add_argument("--dtype", default="f32", choices=["f32", "f16", "bf16", "q8_0"],
                   help="the matrices' type: f32, f16, bf16 or q8_0 (8-bit blocks of 32, with a scale each)")
    p.add_argument("--best", action="store_true", help="export the weights with the lowest val loss")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")


def cmd_export_gguf(args: argparse.Namespace) -> int:
    from .gguf_export import export_gguf

    done = export_gguf(args.run, args.out, dtype=args.dtype, best=args.best, overwrite=args.overwrite,
                       warn=warn_line)
    chat = ", with its chat template" if done.chat_template else ""
    eprint(f"exported {args.run} to {done.path}: llama.cpp architecture {done.architecture}, {done.dtype}, "
           f"{done.tensors} tensors, {done.bytes / 1e6:.1f} MB; tokenizer: {done.vocab}{chat}")
    return 0


def add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="perplexity on a text file, or benchmark tasks (lm-evaluation-harness)",
                       description="Score a run on --data FILE (sliding windows of the model's context, "
                                   "as in Hugging Face's perplexity guide: loss, perplexity, bits per byte, "
                                   "word perplexity), or on lm-evaluation-harness --tasks run in process "
                                   "(pip install 'quillgpt[eval]'; the harness downloads standard tasks "
                                   "once). See docs/eval.md.")
    p.add_argument("run", help="run directory (or a Hugging Face GPT-2 directory / hub id)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--data", help="UTF-8 text file to score")
    what.add_argument("--tasks", help="comma-separated harness tasks, e.g. hellaswag,lambada_openai")
    p.add_argument("--include-path", action="append", metavar="DIR",
                   help="--tasks: a directory of task YAMLs to add (repeatable), e.g. tests/lm_eval_tasks")
    p.add_argument("--num-fewshot", type=int, metavar="K", help="--tasks: examples in each prompt "
                   "(default: each task's own)")
    p.add_argument("--limit", type=float, metavar="N", help="--tasks: items per task (below 1: a fraction)")
    p.add_argument("--stride", type=int, default=None,
                   help="--data: tokens between window starts (default: half the context; the context "
                        "length gives disjoint windows)")
    p.add_argument("--max-tokens", type=int, default=None, help="--data: score only the first N tokens")
    p.add_argument("--batch-size", type=int, default=8, help="windows or requests per forward pass (default 8)")
    p.add_argument("--unknown", choices=["error", "skip"], default="error",
                   help="characters outside a char-level vocabulary: stop (error, default) or drop them "
                        "and say how many (skip)")
    p.add_argument("--json", nargs="?", const="-", metavar="PATH",
                   help="the figures as JSON: on stdout, or written to PATH (the table is then printed)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_weights_flags(p)


def load_eval_model(args: argparse.Namespace) -> tuple[Any, Any]:
    """(model, tokenizer) of a run directory, or of a Hugging Face GPT-2 directory / hub id, in
    the precision --dtype asks for."""
    from .checkpoint import is_run_dir

    if is_run_dir(args.run):
        run = open_run(args)
        return run.model, run.tokenizer
    from .hf import load_hf
    from .inference import set_inference_dtype
    from .runtime import resolve_device

    hf = load_hf(args.run)
    model = hf.model.to(resolve_device(args.device))
    set_inference_dtype(model, args.dtype, warn_line)
    return model, hf.tokenizer


def check_eval_flags(args: argparse.Namespace) -> None:
    if args.batch_size < 1:
        raise QuillError(f"--batch-size must be positive, got {args.batch_size}")
    mode, other = ("--tasks", "--data") if args.tasks is not None else ("--data", "--tasks")
    only = {"--tasks": ("include_path", "num_fewshot", "limit"), "--data": ("stride", "max_tokens")}
    for name in only[other]:
        if getattr(args, name) is not None:
            raise QuillError(f"--{name.replace('_', '-')} applies to {other} only, not {mode}")


def write_or_print_json(path: str | None, text: str, table: str) -> None:
    """JSON on stdout (path "-"), or into `path` with the table on stdout; else the table."""
    if path == "-":
        print(text)
        return
    if path is not None:
        from pathlib import Path

        from .fileio import atomic_write_text

        atomic_write_text(Path(path), text + "\n")
        eprint(f"wrote {path}")
    print(table)


def cmd_eval(args: argparse.Namespace) -> int:
    import json

    check_eval_flags(args)
    if args.tasks is not None:
        return eval_tasks(args)
    from .evaluate import evaluate_text, format_result
    from .inference import check_inference_dtype
    from .readers import read_text

    check_inference_dtype(args.dtype)
    text = read_text(args.data)
    model, tokenizer = load_eval_model(args)
    result = evaluate_text(model, tokenizer, text, stride=args.stride, batch_size=args.batch_size,
                           max_tokens=args.max_tokens, progress=not args.no_progress, unknown=args.unknown)
    if result.dropped:
        eprint(f"dropped {result.dropped:,} characters outside the tokenizer's vocabulary (--unknown skip)")
    write_or_print_json(args.json, json.dumps(result.to_dict()), format_result(result))
    return 0


def eval_tasks(args: argparse.Namespace) -> int:
    """quill eval RUN --tasks ...: lm-evaluation-harness in process."""
    from .inference import check_inference_dtype
    from .lm_eval_adapter import check_tasks, results_json, results_table, run_tasks, task_manager

    check_inference_dtype(args.dtype)  # before the harness indexes its tasks (seconds)
    manager = task_manager(args.include_path, args.tasks.split(","))
    check_tasks(args.tasks.split(","), manager)  # before loading the model: a typo fails fast
    model, tokenizer = load_eval_model(args)
    start = time.perf_counter()
    results = run_tasks(model, tokenizer, args.tasks.split(","), num_fewshot=args.num_fewshot,
                        limit=args.limit, batch_size=args.batch_size, unknown=args.unknown,
                        progress=not args.no_progress, manager=manager)
    if results["dropped"]:
        eprint(f"dropped these characters outside the tokenizer's vocabulary wherever they appeared "
               f"(--unknown skip): {''.join(results['dropped'])!r}")
    eprint(f"{args.tasks}: {time.perf_counter() - start:.1f} s")
    write_or_print_json(args.json, results_json(results), results_table(results))
    return 0


# --- quill ladder -----------------------------------------------------------------------------

def add_ladder(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ladder", help="train bigram, single-head, multi-head, block and gpt side by side",
                       usage="quill ladder [--config PRESET_OR_YAML] [--budget-steps N] [--KEY-NAME VALUE ...]",
                       description="Train every rung of the learning ladder on the same data with the "
                                   "same steps and optimizer, each into OUT/<rung>; print a table and "
                                   "write OUT/ladder.csv and OUT/ladder.png. The budget is --budget-steps "
                                   "per rung, or --time-budget for the whole ladder (e.g. 5m), else "
                                   "--max-iters.")
    p.add_argument("--config", default="shakespeare-char-cpu",
                   help="preset name or YAML file shared by all rungs (default shakespeare-char-cpu)")
    p.add_argument("--budget-steps", type=int, metavar="N", help="training steps of every rung")
    p.add_argument("--overwrite", action="store_true", help="replace an existing ladder in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_config_flags(p)


def cmd_ladder(args: argparse.Namespace) -> int:
    from .config import load_config
    from .ladder_run import ladder_table, run_ladder

    cfg = load_config(args.config, config_overrides(args))
    out = cfg.train.out or "runs/ladder"
    result = run_ladder(cfg, out, steps=args.budget_steps, overwrite=args.overwrite,
                        progress=not args.no_progress)
    print(ladder_table(result))
    eprint(f"{result.steps} steps per rung in {result.elapsed_s:.1f} s; bigram entropy of the train split "
           f"{result.bigram_entropy:.4f}; wrote {result.out / 'ladder.csv'} and {result.out / 'ladder.png'}")
    return 0


# --- quill tokenizer train / quill tokenize (no torch: these start fast) ----------------------

def read_utf8(path: str) -> str:
    """A UTF-8 text file for the tokenizer commands (quillgpt.data would import torch)."""
    try:
        data = open(path, "rb").read()  # noqa: SIM115
    except FileNotFoundError:
        raise QuillError(f"file not found: {path}") from None
    except OSError as e:
        raise QuillError(f"cannot read {path}: {e.strerror}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise QuillError(f"{path} is not UTF-8: invalid byte 0x{data[e.start]:02x} at offset {e.start}") from None


def add_tokenizer(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tokenizer", help="train a tokenizer and save it as JSON")
    tsub = p.add_subparsers(dest="tokenizer_command", metavar="COMMAND", parser_class=ArgumentParser)
    t = tsub.add_parser("train", help="train a char, syllable or byte-level BPE tokenizer on a text file",
                        description="Train a tokenizer on --data and write it to --out (JSON), for "
                                    "--tokenizer OUT in quill train / tokenize.")
    t.add_argument("--kind", choices=["bpe", "syllable", "char"], default="bpe",
                   help="byte-level BPE, the seed's vowel-cut syllables, or characters")
    t.add_argument("--vocab-size", type=int, default=4096,
                   help="tokens in all, special tokens included (default 4096)")
    t.add_argument("--data", required=True, help="UTF-8 text file to learn from")
    t.add_argument("--out", required=True, help="tokenizer JSON to write")
    t.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    t.add_argument("--special-tokens", default="<|endoftext|>",
                   help="bpe: comma-separated special tokens (default <|endoftext|>; '' for none)")
    t.add_argument("--no-merge", default="", metavar="CHARS",
                   help="bpe: characters that never merge with anything, e.g. $'\\n\"'")
    t.add_argument("--across-words", action="store_true",
                   help="bpe: let merges cross word boundaries (chunks are lines)")
    t.add_argument("--no-space-prefix", action="store_true",
                   help="bpe: words do not take their leading space")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")


def cmd_tokenizer(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .fileio import check_apart
    from .tokenizers import train_tokenizer

    if args.tokenizer_command != "train":
        raise QuillError("quill tokenizer: expected a command: train")
    out = Path(args.out)
    if out.is_dir():
        raise QuillError(f"--out {out} is a directory; name the tokenizer file to write (e.g. {out / 'tok.json'})")
    check_apart(out, [args.data])
    if out.exists() and not args.overwrite:
        raise QuillError(f"{out} exists; pass --overwrite to replace it")
    text = read_utf8(args.data)
    if not text:
        raise QuillError(f"{args.data} is empty: there is nothing to learn a tokenizer from")
    start = time.perf_counter()
    specials = [s for s in args.special_tokens.split(",") if s]
    tok = train_tokenizer(args.kind, text, args.vocab_size, special_tokens=specials,
                          no_merge=args.no_merge, within_words=not args.across_words,
                          space_prefix=not args.no_space_prefix, progress=not args.no_progress)
    elapsed = time.perf_counter() - start
    tok.save(out)
    extra = ""
    if getattr(tok, "coverage", None) is not None:
        extra = f", covering {tok.coverage:.1%} of the training chunks"
    eprint(f"trained a {args.kind} tokenizer with {tok.vocab_size} tokens in {elapsed:.2f} s{extra}; "
           f"saved to {out}")
    return 0


def add_tokenize(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tokenize", help="show how a tokenizer splits a text, token by token",
                       description="Print the tokens and ids of TEXT (or --file). Tokenizers that "
                                   "learn (char, syllable[:N], bpe[:N]) learn from --data, else from "
                                   "the text itself.")
    p.add_argument("text", nargs="?", help="text to tokenize")
    p.add_argument("--tokenizer", default="gpt2",
                   help="char, syllable[:N], bpe[:N], gpt2 (default), a tokenizer .json or a run directory")
    p.add_argument("--file", help="tokenize this UTF-8 file instead of TEXT")
    p.add_argument("--data", help="text file the learning tokenizers train on")
    p.add_argument("--ids", action="store_true", help="print only the ids, as one JSON list")


def cmd_tokenize(args: argparse.Namespace) -> int:
    import json

    from .tokenizers import build_tokenizer

    if (args.text is None) == (args.file is None):
        raise QuillError("quill tokenize: give either TEXT or --file FILE")
    text = read_utf8(args.file) if args.file else args.text
    train_text = read_utf8(args.data) if args.data else text
    tok = build_tokenizer(args.tokenizer, train_text)
    ids = tok.encode(text)
    if args.ids:
        print(json.dumps(ids))
        return 0
    per_token = len(text) / len(ids) if ids else 0.0
    print("Tokens:", json.dumps(tok.token_strings(ids), ensure_ascii=False))
    print("Values:", json.dumps(ids))
    print(f"{len(text)} characters, {len(ids)} tokens, {per_token:.2f} characters per token "
          f"({args.tokenizer}: {tok.kind} tokenizer, vocabulary {tok.vocab_size})")
    return 0


# --- quill serve ----------------------------------------------------------------------------

def add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="web playground and OpenAI-compatible API (completions, chat)",
                       description="Serve a run: a playground page at /, OpenAI's completions API at "
                                   "/v1/completions and, for a chat model (quill sft), its chat API at "
                                   "/v1/chat/completions, streaming included. See docs/serve.md.")
    p.add_argument("run", help=RUN_HELP)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    p.add_argument("--allowed-hosts", default="", metavar="NAMES",
                   help="comma-separated host names requests may name besides IP addresses, localhost "
                        "and --host ('*': any; see docs/serve.md)")
    p.add_argument("--port", type=int, default=8000, help="port (0 = any free port)")
    p.add_argument("--max-tokens-cap", type=int, default=2048, help="largest max_tokens a request may ask")
    p.add_argument("--max-queue", type=int, default=256, help="requests waiting at most; more get 503")
    p.add_argument("--kv-cache-mb", type=float, default=None, metavar="MB",
                   help="memory for the KV cache; at most as many rows decode at once as fit at full "
                        "context (default: 16 rows)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's logging: each request is logged at info")
    p.add_argument("--tools", metavar="NAMES",
                   help="built-in tools run here for every chat request, comma-separated: calculator, python "
                        "(off unless named; clients' own tools need no flag; docs/tools.md)")
    add_weights_flags(p, device="auto")


def cmd_serve(args: argparse.Namespace) -> int:
    from .inference import check_inference_dtype
    from .runtime import resolve_device
    from .serve import ServeSettings, serve
    from .serve.guard import default_allowed_hosts

    check_inference_dtype(args.dtype)
    if not 0 <= args.port <= 65535:
        raise QuillError(f"--port must be in 0..65535, got {args.port}")
    if args.max_tokens_cap < 1 or args.max_queue < 1:
        raise QuillError("--max-tokens-cap and --max-queue must be positive")
    extra = [h.strip() for h in args.allowed_hosts.split(",") if h.strip()]
    if args.kv_cache_mb is not None and not args.kv_cache_mb > 0:
        raise QuillError(f"--kv-cache-mb must be positive, got {args.kv_cache_mb}")
    from .tools import builtin_tools

    settings = ServeSettings(max_tokens_cap=args.max_tokens_cap, max_queue=args.max_queue,
                             kv_cache_mb=args.kv_cache_mb, allowed_hosts=default_allowed_hosts(args.host, extra),
                             tools=tuple(builtin_tools(args.tools)))
    serve(args.run, args.host, args.port, resolve_device(args.device), weights_file(args), settings,
          log=eprint, log_level=args.log_level, dtype=args.dtype)
    return 0


# --- quill prepare ----------------------------------------------------------------------------

def add_prepare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prepare", help="tokenize a corpus into train.bin / val.bin / meta.json",
                       description="Tokenize a corpus (text file, .gz, directory, .jsonl, .parquet, "
                                   "URL, or 'shakespeare') on all cores into memory-mapped token "
                                   "files that `quill train --data DIR` uses as is.")
    p.add_argument("--data", required=True, help="the corpus")
    p.add_argument("--tokenizer", default="char", help="char, gpt2, ... or a tokenizer .json file")
    p.add_argument("--out", help="output directory (default: the cache, where `quill train --data "
                                 "CORPUS` finds it)")
    p.add_argument("--text-field", default="text", help=".jsonl: the field holding the text")
    p.add_argument("--column", help=".parquet: the text column (default: the first string column)")
    p.add_argument("--encoding-errors", default="strict", choices=["strict", "replace"],
                   help="replace: invalid UTF-8 becomes U+FFFD instead of an error")
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="held out for validation: whole documents, or the tail of one text")
    p.add_argument("--max-megabytes", type=float, default=None, help="read only the first N MB")
    p.add_argument("--workers", type=int, default=None, help="tokenizer processes (default: all cores)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def cmd_prepare(args: argparse.Namespace) -> int:
    from .prepare import prepare
    from .readers import ReadOptions

    if args.max_megabytes is not None and not 0 < args.max_megabytes < float("inf"):
        raise QuillError(f"max_megabytes must be a positive number, got {args.max_megabytes}")
    opts = ReadOptions(text_field=args.text_field, column=args.column, encoding_errors=args.encoding_errors,
                       max_bytes=None if args.max_megabytes is None else int(args.max_megabytes * 1_000_000))
    result = prepare(args.data, args.tokenizer, out=args.out, opts=opts, val_fraction=args.val_fraction,
                     workers=args.workers, overwrite=args.overwrite,
                     progress=False if args.no_progress else None)
    m = result.meta
    rate = m["input_bytes"] / 1e6 / max(m["seconds"], 1e-9)
    eprint(f"{m['documents']:,} documents, {m['input_bytes'] / 1e6:,.1f} MB -> {m['train_tokens']:,} train "
           f"+ {m['val_tokens']:,} val tokens ({m['dtype']}, split by {m['split']}), "
           f"{m['seconds']:.1f} s, {rate:.1f} MB/s, {m['workers']} processes")
    print(result.path)
    return 0


# --- entry point ------------------------------------------------------------------------------

COMMANDS: list[tuple[Callable, Callable]] = [
    (add_train, cmd_train),
    (add_sft, cmd_sft),
    (add_rl, cmd_rl),
    (add_chat, cmd_chat),
    (add_prepare, cmd_prepare),
    (add_plot, cmd_plot),
    (add_sample, cmd_sample),
    (add_import_hf, cmd_import_hf),
    (add_export_hf, cmd_export_hf),
    (add_export_gguf, cmd_export_gguf),
    (add_eval, cmd_eval),
    (add_ladder, cmd_ladder),
    (add_tokenizer, cmd_tokenizer),
    (add_tokenize, cmd_tokenize),
    (add_serve, cmd_serve),
]


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="quill", description="Train and run GPT-style language models.")
    from . import __version__

    parser.add_argument("--version", action="version", version=f"quill {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=ArgumentParser)
    for add, run in COMMANDS:
        before = set(sub.choices)
        add(sub)
        for name in set(sub.choices) - before:
            sub.choices[name].set_defaults(func=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if getattr(args, "func", None) is None:
            parser.print_help()
            return 2
        reject_unknown(extra, getattr(args, "config_keys", False))
        return args.func(args) or 0
    except QuillError as e:
        eprint(f"quill: error: {e}")
        return 2
    except KeyboardInterrupt:
        eprint("quill: interrupted")
        return 130
    except OSError as e:  # a full disk wherever it struck: one line, which file, and why
        import errno

        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        where = f"cannot write {e.filename}: " if e.filename else ""
        eprint(f"quill: error: {where}the disk is full ({e.strerror})")
        return 2
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
