"""One source for what each config key means: the dataclass fields. `quill train --help`, `quill
ladder --help` and the README's table all come from it."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from quillgpt.cli import build_parser
from quillgpt.config import ALL_KEYS, key_help, keys_markdown

README = Path(__file__).resolve().parent.parent / "README.md"


def test_every_key_has_a_meaning():
    missing = [k for k in ALL_KEYS if not key_help(k)[0]]
    assert not missing, f"config keys without a description: {missing}"


def test_readme_table_is_the_config_table():
    assert keys_markdown() in README.read_text(encoding="utf-8"), (
        "README's config table differs from the config's descriptions; paste quillgpt.config.keys_markdown()")


def test_help_shows_every_flag_with_its_meaning_and_default():
    for command in ("train", "ladder"):
        out = subprocess.run([sys.executable, "-m", "quillgpt", command, "--help"], capture_output=True,
                             text=True, env={"COLUMNS": "200", "PATH": ""}, check=True).stdout
        flat = " ".join(out.split())
        for key in ALL_KEYS:
            meaning, shown = key_help(key)
            flag = "--" + key.replace("_", "-")
            assert f"{flag} " in flat, (command, flag)
            assert " ".join(f"{meaning} (default: {shown})".split()) in flat, (command, key)


def subcommands(parser: argparse.ArgumentParser, prefix: str = "quill"):
    """(name, parser) of every command and subcommand."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield f"{prefix} {name}", sub
                yield from subcommands(sub, f"{prefix} {name}")


def test_every_flag_of_every_command_explains_itself_and_shows_its_default(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    commands = dict(subcommands(build_parser()))
    expected = ["train", "sample", "eval", "serve", "prepare", "tokenize", "tokenizer train", "import-hf",
                "export-hf", "plot", "ladder"]
    assert {f"quill {c}" for c in expected} <= set(commands)
    for name, parser in commands.items():
        text = " ".join(parser.format_help().split())
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            label = action.option_strings[-1] if action.option_strings else action.dest
            assert action.help, f"{name} {label} has no help"
            if action.option_strings and action.default not in (None, False, "", argparse.SUPPRESS):
                helped = " ".join(action.help.replace("%%", "%").split())
                after = text[text.index(helped[:30]):][:len(helped) + 60]
                assert "default" in after, f"{name} {label}: its help does not show its default {action.default!r}"


def test_quill_sft_help_shows_its_own_keys_first_with_its_own_defaults(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    text = " ".join(dict(subcommands(build_parser()))["quill sft"].format_help().split())
    own, rest = text.index("quill sft's keys"), text.index("the other config keys")
    assert own < rest
    lr = text.index("--learning-rate FLOAT, --lr FLOAT")
    assert own < lr < rest and "(default: 3e-05 with init_from, else 0.001)" in text[lr:rest]
    assert "(default: 0: a held-out conversation's reply is printed instead)" in text[own:rest]
    assert "None: shakespeare" not in text  # quill train's meaning of --data
    for key in ALL_KEYS:  # every key is still a flag
        assert "--" + key.replace("_", "-") + " " in text, key


def test_the_seeds_names_are_flags_and_no_parser_guesses_a_shortened_flag(capsys):
    from quillgpt.cli import main

    parser = build_parser()
    assert parser.allow_abbrev is False
    for name, sub in subcommands(parser):
        assert sub.allow_abbrev is False, name
    args, extra = parser.parse_known_args(["train", "--steps", "20", "--lr", "3e-4", "--n-ctxt", "64",
                                           "--context-length", "32", "--d-model", "64", "--num-layers", "2",
                                           "--num-heads", "2"])
    assert not extra
    assert (args.cfg_max_iters, args.cfg_learning_rate, args.cfg_block_size, args.cfg_n_embd, args.cfg_n_layer,
            args.cfg_n_head) == ("20", "3e-4", "32", "64", "2", "2")  # the last of --n-ctxt / --context-length
    for argv, fragment in ((["train", "--lr-dec", "5"], "unknown config key 'lr_dec'; did you mean lr_decay_iters"),
                           (["train", "--max-it", "5"], "unknown config key 'max_it'"),
                           (["sample", "RUN", "--max-new", "5"], "unrecognized arguments: --max-new 5"),
                           (["tokenize", "x", "--tok", "char"], "unrecognized arguments: --tok char")):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("quill: error: ") and fragment in err[0], (argv, err)
