"""lm-evaluation-harness in process: `quill eval --tasks`, the "quill" model class, tasks during
training. Offline: the tasks are the YAMLs under tests/lm_eval_tasks (data from local .jsonl
files), the harness is told it is offline, and any connection to another host fails the test.

The independent references: lm-eval's own `hf` backend on the `export-hf` output (same numbers,
request by request), and a plain full forward pass per request (every kind of run)."""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.nn import functional as F

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # before the harness imports datasets
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
lm_eval = pytest.importorskip("lm_eval", reason="the eval extra: pip install 'quillgpt[eval]'")

from conftest import LM_EVAL_TASKS, data_file, make_any_run, task_text  # noqa: E402
from lm_eval import utils as lm_utils  # noqa: E402

from quillgpt import checkpoint as ckpt  # noqa: E402
from quillgpt.cli import main  # noqa: E402
from quillgpt.config import ModelConfig, load_config  # noqa: E402
from quillgpt.errors import QuillError  # noqa: E402
from quillgpt.evaluate import count_words  # noqa: E402
from quillgpt.generate import generate  # noqa: E402
from quillgpt.lm_eval_adapter import QuillLM, check_tasks, headline, run_tasks, task_manager  # noqa: E402
from quillgpt.tokenizers import CharTokenizer, SyllableTokenizer  # noqa: E402
from quillgpt.tokenizers.bpe import ByteBPETokenizer  # noqa: E402

TASKS_DIR = LM_EVAL_TASKS
ALL_TASKS = ["quill_sonnets", "quill_verse_choice", "quill_verse_lastword", "quill_verse_repeat"]
pytestmark = pytest.mark.usefixtures("offline")  # any connection to another host fails the test


SMALL = dict(block_size=48, n_layer=2, n_head=2, n_embd=32)


@pytest.fixture(scope="module")
def manager():
    return task_manager(TASKS_DIR, ALL_TASKS)


@pytest.fixture(scope="module")
def bpe():
    return ByteBPETokenizer.train(task_text(), 320)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, bpe):
    """An exportable run (BPE, GPT-2's architecture, context 48) and its `export-hf` output."""
    from quillgpt.hf import export_hf

    root = tmp_path_factory.mktemp("exported")
    run_dir = make_any_run(root / "run", ModelConfig(**SMALL), bpe)
    export_hf(run_dir, root / "hf")
    return run_dir, root / "hf"


def close(a: float, b: float, rel: float = 1e-4) -> bool:
    return math.isclose(a, b, rel_tol=rel, abs_tol=1e-4)


def same_responses(ours, theirs) -> bool:
    """Equal structure; floats within 1e-4 (relative), everything else exactly equal."""
    if isinstance(ours, (list, tuple)):
        return len(ours) == len(theirs) and all(same_responses(a, b) for a, b in zip(ours, theirs))
    if isinstance(ours, float) and not isinstance(ours, bool):
        return close(ours, theirs)
    return ours == theirs


def evaluate(model, manager, limit: int, **kwargs):
    return lm_eval.simple_evaluate(model=model, tasks=ALL_TASKS, task_manager=manager, limit=limit,
                                   bootstrap_iters=0, log_samples=True, **kwargs)


def test_same_numbers_as_the_harness_hf_backend(exported, manager):
    """Request by request and metric by metric, `quill eval --tasks` in process equals lm-eval's
    hf backend on the exported model: contexts cut to the context, the rolling windows, greedy
    flags, generated text."""
    run_dir, hf_dir = exported
    run = ckpt.load_run(run_dir)
    ours = evaluate(QuillLM(model=run.model, tokenizer=run.tokenizer, batch_size=5, progress=False),
                    manager, 16)
    theirs = evaluate("hf", manager, 16, model_args=f"pretrained={hf_dir}", batch_size=5, device="cpu")
    for task in ALL_TASKS:
        a = {s["doc_id"]: s for s in ours["samples"][task]}
        b = {s["doc_id"]: s for s in theirs["samples"][task]}
        assert sorted(a) == sorted(b) and len(a) == (13 if task == "quill_sonnets" else 16)
        for doc_id in a:
            assert same_responses(a[doc_id]["resps"], b[doc_id]["resps"]), (task, doc_id, a[doc_id]["resps"],
                                                                           b[doc_id]["resps"])
        for metric, value in theirs["results"][task].items():
            if "," not in metric or "stderr" in metric:
                continue
            name = metric.split(",")[0]
            if name in ("acc", "acc_norm", "exact_match"):
                assert ours["results"][task][metric] == value, (task, metric)
            else:
                assert ours["results"][task][metric] == pytest.approx(value, rel=1e-4), (task, metric)
    # the requests went through every path: truncated contexts, several windows per sonnet
    lastword = [s for s in ours["samples"]["quill_verse_lastword"]]
    assert any(len(run.tokenizer.encode(s["doc"]["context"])) > 48 for s in lastword)
    assert all(len(run.tokenizer.encode(s["doc"]["text"])) > 2 * 48 for s in ours["samples"]["quill_sonnets"])
    # what the harness printed for us holds real figures
    assert set(headline(ours)) == {"quill_sonnets/bits_per_byte", "quill_verse_choice/acc_norm",
                                   "quill_verse_lastword/acc", "quill_verse_repeat/exact_match"}


# --- every kind of run, against a plain forward pass per request ---------------------------------

def reference_loglikelihood(model, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    """One unbatched full forward pass over the last block_size + 1 tokens."""
    whole = (context + continuation)[-(model.config.block_size + 1):]
    with torch.no_grad():
        logp = F.log_softmax(model(torch.tensor([whole[:-1]]))[0][0].float(), dim=-1)
    rows = logp[len(whole) - 1 - len(continuation):]
    target = torch.tensor(continuation)
    return float(rows.gather(1, target[:, None]).sum()), bool((rows.argmax(-1) == target).all())


def reference_choice_accuracy(model, tok, n: int) -> tuple[float, float]:
    """acc and acc_norm of quill_verse_choice's first `n` documents, from a plain forward pass per
    choice: the choice of highest log-likelihood (acc_norm: per character, as the harness
    normalises) against the label. Requests are encoded as the harness encodes them: the
    context's trailing whitespace moves to the front of the continuation."""
    lines = (TASKS_DIR / "data" / "verse_choice.jsonl").read_text(encoding="utf-8").splitlines()[:n]
    B = model.config.block_size

    def loglikelihood(ctx: list[int], cont: list[int]) -> float:  # pieces of B tokens after what fits
        return sum(reference_loglikelihood(model, ctx + cont[:i], cont[i:i + B])[0] for i in range(0, len(cont), B))

    acc = norm = 0
    for doc in map(json.loads, lines):
        context = doc["context"].rstrip()
        ctx = tok.encode(context)
        lls = [loglikelihood(ctx, tok.encode(doc["context"] + c)[len(ctx):]) for c in doc["choices"]]
        acc += max(range(len(lls)), key=lambda i: lls[i]) == doc["label"]
        norm += max(range(len(lls)), key=lambda i: lls[i] / len(doc["choices"][i])) == doc["label"]
    return acc / n, norm / n


def kinds(bpe_tokenizer) -> dict:
    char = CharTokenizer.train(task_text())
    speedrun = dict(rope=True, qk_norm=True, norm="rmsnorm", activation="relu2", tie_embeddings=False,
                    logit_softcap=15.0, bias=False)
    return {
        "char": (char, {}),
        "syllable": (SyllableTokenizer.train(task_text(), 200), {}),
        "bpe": (bpe_tokenizer, {}),
        "bigram": (char, {"kind": "bigram"}),
        "single-head": (char, {"kind": "single-head"}),
        "multi-head": (char, {"kind": "multi-head"}),
        "block": (char, {"kind": "block"}),
        "speedrun": (char, speedrun),
    }


KINDS = ["char", "syllable", "bpe", "gpt2", "bigram", "single-head", "multi-head", "block", "speedrun",
         "imported"]


@pytest.fixture(scope="module")
def any_run(tmp_path_factory, bpe, exported):
    made = {}

    def get(kind: str):
        if kind not in made:
            root = tmp_path_factory.mktemp(kind)
            if kind == "imported":  # a Hugging Face GPT-2 directory brought in with import-hf
                from quillgpt.hf import import_hf

                run_dir = import_hf(exported[1], root / "run")
            elif kind == "gpt2":  # GPT-2's own 50,257-token vocabulary
                from quillgpt.tokenizers.gpt2 import gpt2_tokenizer

                tokenizer = gpt2_tokenizer(data_file("gpt2.tiktoken"))
                run_dir = make_any_run(root / "run", ModelConfig(**SMALL), tokenizer)
            else:
                tokenizer, options = kinds(bpe)[kind]
                run_dir = make_any_run(root / "run", ModelConfig(**{**SMALL, **options}), tokenizer)
            made[kind] = ckpt.load_run(run_dir)
        return made[kind]

    return get


def requests(*args) -> list[SimpleNamespace]:
    return [SimpleNamespace(args=a) for a in args]


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_of_run_answers_the_three_requests(any_run, kind):
    run = any_run(kind)
    model, tok = run.model, run.tokenizer
    lm = QuillLM(model=model, tokenizer=tok, batch_size=3, progress=False)
    sonnet = json.loads((TASKS_DIR / "data" / "sonnets.jsonl").read_text().splitlines()[2])["text"]
    pairs = [("Shall I compare thee", " to a summer's day?"), ("Rough winds do", " shake"),
             ("", "Thou art more lovely"), (sonnet[:300], " and temperate"), ("So long", " as men")]
    got = lm.loglikelihood(requests(*pairs))
    for (context, continuation), (logprob, greedy) in zip(pairs, got):
        if context:
            ctx = tok.encode(context)
            cont = tok.encode(context + continuation)[len(ctx):]
        else:
            ctx, cont = [lm.prefix_token_id], tok.encode(continuation)
        ref_logprob, ref_greedy = reference_loglikelihood(model, ctx, cont)
        assert logprob == pytest.approx(ref_logprob, rel=1e-4, abs=1e-4) and greedy == ref_greedy
    # a text longer than the context, in the harness's windows (the first token after the start token)
    (rolling,) = lm.loglikelihood_rolling(requests((sonnet,)))
    windows = lm_utils.get_rolling_token_windows(token_list=tok.encode(sonnet), prefix_token=lm.prefix_token_id,
                                                 max_seq_len=model.config.block_size, context_len=1)
    parts = [lm_utils.make_disjoint_window(w) for w in windows]
    assert len(parts) > 2
    assert rolling == pytest.approx(sum(reference_loglikelihood(model, c, k)[0] for c, k in parts), rel=1e-4)
    # greedy generation, batched (rows of different lengths), equals generating one prompt at a time
    settings = {"until": ["\n", "eye"], "max_gen_toks": 12, "do_sample": False}
    prompts = ["Shall I compare", "Rough winds", "", "So long as men can breathe or"]
    texts = lm.generate_until(requests(*[(p, dict(settings)) for p in prompts]))
    for prompt, text in zip(prompts, texts):
        assert text == generate(model, tok, prompt, max_new_tokens=12, temperature=0, stop=["\n", "eye"])


def test_batching_changes_nothing(any_run):
    run = any_run("bpe")
    pairs = [(f"line {i}: {'word ' * i}", f" end {i}") for i in range(1, 12)]
    one = QuillLM(model=run.model, tokenizer=run.tokenizer, batch_size=1, progress=False)
    many = QuillLM(model=run.model, tokenizer=run.tokenizer, batch_size=7, progress=False)
    for (a, ga), (b, gb) in zip(one.loglikelihood(requests(*pairs)), many.loglikelihood(requests(*pairs))):
        assert a == pytest.approx(b, rel=1e-5) and ga == gb


@pytest.mark.parametrize("kind", ["bpe", "speedrun"])
def test_contexts_shared_by_choices_run_once_and_score_the_same(any_run, kind, monkeypatch):
    """Multiple-choice requests run each context once into a KV cache (left-padded contexts of
    different lengths, choices of different lengths, one-token choices): the same numbers as
    running every request whole."""
    from quillgpt import scoring

    run = any_run(kind)
    tok = run.tokenizer
    contexts = ["Shall I compare thee", "Rough winds do shake the darling buds of May,\nAnd", "So"]
    choices = [" to a summer's day?", " x", " and", " more lovely and more temperate", "!"]
    pairs = [(tok.encode(c), tok.encode(c + k)[len(tok.encode(c)):]) for c in contexts for k in choices]
    pairs.append((tok.encode("alone"), tok.encode(" here")))
    calls = []
    real = scoring._run_shared
    monkeypatch.setattr(scoring, "_run_shared", lambda m, rows, top: calls.append(len(rows)) or real(m, rows, top))
    shared = scoring.score_continuations(run.model, pairs, batch_size=8)
    whole = scoring.score_continuations(run.model, pairs, batch_size=8, share_prefixes=False)
    # the choices whose context (as kept within the model's context) another choice shares ran
    # it once, in batches of at most 8; the others ran whole
    B = run.model.config.block_size
    kept = [tuple((c + k)[-(B + 1):][: -len(k)]) for c, k in pairs]
    assert sum(calls) == sum(kept.count(x) > 1 for x in kept) >= 9 and max(calls) <= 8
    for a, b in zip(shared, whole):
        assert a.logprob == pytest.approx(b.logprob, rel=1e-5, abs=1e-5) and a.greedy == b.greedy
    for (ctx, cont), score in zip(pairs, shared):
        assert score.logprob == pytest.approx(reference_loglikelihood(run.model, ctx, cont)[0], rel=1e-4, abs=1e-4)


def test_a_continuation_longer_than_the_context_is_scored_in_pieces(any_run):
    """The hf backend refuses such a request; each piece of block_size tokens is scored after as
    much of what precedes it as fits."""
    run = any_run("char")
    model, tok = run.model, run.tokenizer
    context, continuation = tok.encode("Shall I compare thee"), tok.encode(" to a summer's day? " * 6)
    assert len(continuation) > 2 * model.config.block_size
    lm = QuillLM(model=model, tokenizer=tok, progress=False)
    (logprob, greedy), = lm._loglikelihood_tokens([(None, context, continuation)])
    B = model.config.block_size
    pieces = [reference_loglikelihood(model, context + continuation[:i], continuation[i : i + B])
              for i in range(0, len(continuation), B)]
    assert logprob == pytest.approx(sum(p[0] for p in pieces), rel=1e-5)
    assert greedy == all(p[1] for p in pieces)


@pytest.mark.parametrize("kind", ["char", "speedrun"])
def test_run_tasks_on_a_char_model(any_run, manager, kind):
    run = any_run(kind)
    results = run_tasks(run.model, run.tokenizer, ALL_TASKS, limit=4, batch_size=4, progress=False,
                        bootstrap_iters=0, manager=manager)
    figures = headline(results)
    assert len(figures) == 4 and all(math.isfinite(v) for v in figures.values())
    _, acc_norm = reference_choice_accuracy(run.model, run.tokenizer, 4)
    assert figures["quill_verse_choice/acc_norm"] == acc_norm and results["dropped"] == []


def test_a_limit_past_any_task_is_the_whole_task_and_huge_fewshot_is_one_line(any_run, manager):
    """--limit 1e19 (past what islice takes) is the whole task; --num-fewshot past what a task
    can draw from, or past any context, is a QuillError, not the harness's traceback."""
    run = any_run("char")
    whole = run_tasks(run.model, run.tokenizer, ["quill_verse_choice"], limit=1e19, batch_size=8,
                      progress=False, bootstrap_iters=0, manager=manager)
    assert whole["n-samples"]["quill_verse_choice"]["effective"] == whole["n-samples"]["quill_verse_choice"]["original"]
    for n, fragment in ((1_000_000, "between 0 and 1000"), (999, "fewer examples than that")):
        with pytest.raises(QuillError, match=fragment):
            run_tasks(run.model, run.tokenizer, ["quill_verse_choice"], limit=2, num_fewshot=n, progress=False,
                      manager=manager)


# --- characters a char-level vocabulary lacks ---------------------------------------------------

def test_unknown_characters_stop_or_are_dropped(tmp_path, manager):
    tok = CharTokenizer.train("abcdefghijklmnopqrstuvwxyz \n")  # no capitals, no punctuation
    run = ckpt.load_run(make_any_run(tmp_path / "run", ModelConfig(**SMALL), tok))
    with pytest.raises(QuillError, match="--unknown skip"):
        run_tasks(run.model, tok, ["quill_verse_choice"], limit=2, progress=False, manager=manager)
    results = run_tasks(run.model, tok, ["quill_verse_choice"], limit=2, unknown="skip", progress=False,
                        bootstrap_iters=0, manager=manager)
    assert "F" in results["dropped"] and "," in results["dropped"] and "a" not in results["dropped"]


def test_data_word_perplexity_and_unknown_skip(tmp_path, capsys):
    tok = CharTokenizer.train("abcdefghijklmnopqrstuvwxyz \n")
    run_dir = make_any_run(tmp_path / "run", ModelConfig(**SMALL), tok)
    text = "Shall I compare thee to a summer's day?\nThou art more lovely and more temperate:\n"
    data = tmp_path / "t.txt"
    data.write_text(text)
    capsys.readouterr()
    assert main(["eval", str(run_dir), "--data", str(data), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "'S'" in err and "--unknown skip" in err and "\n" == err[-1] and err.count("\n") == 1
    assert main(["eval", str(run_dir), "--data", str(data), "--no-progress", "--unknown", "skip", "--json"]) == 0
    out = capsys.readouterr()
    r = json.loads(out.out)
    dropped = sum(c not in tok.stoi for c in text)
    assert r["dropped"] == dropped == 6 and f"dropped {dropped} characters" in out.err
    # words as the harness counts them for its word perplexity
    from lm_eval.api.task import ConfigurableTask

    assert r["words"] == count_words(text) == ConfigurableTask.count_words(text)
    assert r["word_perplexity"] == pytest.approx(math.exp(r["nll"] / r["words"]))
    assert main(["eval", str(run_dir), "--data", str(data), "--no-progress", "--unknown", "skip"]) == 0
    table = capsys.readouterr().out
    assert "word perplexity" in table and "dropped" in table


# --- the command line -------------------------------------------------------------------------

def test_quill_eval_tasks_prints_the_table_and_writes_json(exported, tmp_path, capsys):
    run_dir, hf_dir = exported
    out = tmp_path / "results.json"
    capsys.readouterr()
    assert main(["eval", str(run_dir), "--tasks", "quill_verse_choice,quill_sonnets", "--include-path",
                 str(TASKS_DIR), "--limit", "6", "--batch-size", "4", "--no-progress", "--json", str(out)]) == 0
    printed = capsys.readouterr()
    assert "|quill_verse_choice" in printed.out and "acc_norm" in printed.out and "bits_per_byte" in printed.out
    assert "wrote" in printed.err
    results = json.loads(out.read_text())
    assert set(results["results"]) == {"quill_verse_choice", "quill_sonnets"}
    acc = results["results"]["quill_verse_choice"]["acc,none"]
    run = ckpt.load_run(run_dir)
    assert (acc, results["results"]["quill_verse_choice"]["acc_norm,none"]) == \
        reference_choice_accuracy(run.model, run.tokenizer, 6)
    assert results["config"]["limit"] == 6
    # the exported Hugging Face directory evaluates the same, without importing it first
    assert main(["eval", str(hf_dir), "--tasks", "quill_verse_choice", "--include-path", str(TASKS_DIR),
                 "--limit", "6", "--no-progress", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["results"]["quill_verse_choice"]["acc,none"] == acc


def test_the_harness_knows_the_model_class_quill(exported, manager):
    """lm_eval.simple_evaluate(model="quill", model_args="run=...") works once the adapter is imported."""
    run_dir, _ = exported
    settings = dict(tasks=["quill_verse_choice"], task_manager=manager, limit=6, bootstrap_iters=0)
    by_name = lm_eval.simple_evaluate(model="quill", model_args=f"run={run_dir},progress=False", batch_size=3,
                                      **settings)
    run = ckpt.load_run(run_dir)
    direct = lm_eval.simple_evaluate(model=QuillLM(model=run.model, tokenizer=run.tokenizer, progress=False),
                                     **settings)
    assert by_name["results"] == direct["results"]


def test_quill_eval_tasks_bad_input(exported, tmp_path, capsys):
    run_dir, _ = exported

    def error(argv: list[str]) -> str:
        capsys.readouterr()
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("quill: error: ") and "\n" not in err, err
        return err

    tasks = ["--include-path", str(TASKS_DIR)]
    assert "task directory not found" in error(["eval", str(run_dir), "--tasks", "x", "--include-path",
                                                str(tmp_path / "nope")])
    assert "--stride applies to --data" in error(["eval", str(run_dir), "--tasks", "quill_sonnets", "--stride",
                                                   "4", *tasks])
    assert "--limit applies to --tasks" in error(["eval", str(run_dir), "--data", str(tmp_path), "--limit", "3"])
    assert "not allowed with" in error(["eval", str(run_dir), "--tasks", "a", "--data", "b"])
    assert "no tasks" in error(["eval", str(run_dir), "--tasks", ",", *tasks])
    assert "limit must be positive" in error(["eval", str(run_dir), "--tasks", "quill_sonnets", "--limit", "0",
                                              *tasks])
    assert "not found" in error(["eval", str(tmp_path / "norun"), "--tasks", "quill_sonnets", *tasks])


def test_unknown_task_names_the_close_ones(manager):
    with pytest.raises(QuillError, match="unknown task 'quill_verse_choise'; did you mean quill_verse_choice"):
        check_tasks(["quill_verse_choise"], manager)
    assert check_tasks([" quill_sonnets", "quill_verse_choice ", ""], manager) == ["quill_sonnets",
                                                                                   "quill_verse_choice"]


@pytest.mark.slow  # a name the offline tasks lack makes the harness index its ten thousand YAMLs
def test_quill_eval_unknown_task_is_one_line(exported, capsys):
    capsys.readouterr()
    assert main(["eval", str(exported[0]), "--tasks", "quill_verse_choise", "--include-path", str(TASKS_DIR)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("quill: error: unknown task 'quill_verse_choise'; did you mean quill_verse_choice")
    assert "\n" not in err


# --- during training ----------------------------------------------------------------------------

@pytest.mark.slow  # trains, and runs two tasks three times
def test_tasks_run_during_training_and_land_in_metrics_and_the_plot(tmp_path, capsys):
    data = tmp_path / "verse.txt"
    data.write_text(task_text() * 3, encoding="utf-8")
    out = tmp_path / "run"
    argv = ["train", "--data", str(data), "--out", str(out), "--n-layer", "1", "--n-head", "2", "--n-embd", "16",
            "--block-size", "32", "--batch-size", "4", "--max-iters", "8", "--eval-interval", "4",
            "--eval-iters", "2", "--log-interval", "2", "--warmup-iters", "1", "--sample-tokens", "0",
            "--no-progress", "--eval-tasks", "quill_verse_choice,quill_verse_repeat", "--eval-tasks-path",
            str(TASKS_DIR), "--eval-tasks-limit", "5", "--eval-tasks-interval", "8"]
    assert main(argv) == 0
    with open(out / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    scored = {int(r["step"]): r for r in rows if r.get("quill_verse_choice/acc_norm")}
    assert sorted(scored) == [0, 8]  # step 0, every 8 steps, the end
    # the last row holds the final weights' scores: a plain forward pass per choice, and the
    # tasks run again on the saved run
    run = ckpt.load_run(out)
    final = headline(run_tasks(run.model, run.tokenizer, ["quill_verse_choice", "quill_verse_repeat"],
                               include_path=TASKS_DIR, limit=5, bootstrap_iters=0, progress=False))
    assert float(scored[8]["quill_verse_choice/acc_norm"]) == reference_choice_accuracy(run.model, run.tokenizer, 5)[1]
    assert float(scored[8]["quill_verse_repeat/exact_match"]) == pytest.approx(final["quill_verse_repeat/exact_match"])
    pytest.importorskip("matplotlib")
    from quillgpt.plot import task_columns

    assert task_columns(ckpt_rows(out)) == ["quill_verse_choice/acc_norm", "quill_verse_repeat/exact_match"]
    assert (out / "loss.png").stat().st_size > 0
    # the keys are checked before training starts
    capsys.readouterr()
    assert main([*argv[:-2], "--eval-tasks-interval", "6", "--overwrite"]) == 2
    assert "multiple of eval_interval" in capsys.readouterr().err
    assert main([*argv, "--overwrite", "--eval-tasks", "nonesuch"]) == 2
    assert "unknown task 'nonesuch'" in capsys.readouterr().err


def ckpt_rows(run_dir: Path) -> list[dict]:
    from quillgpt.plot import read_metrics

    return read_metrics(run_dir)


def test_eval_tasks_key_validation():
    with pytest.raises(QuillError, match="eval_tasks_limit must be positive, got 0"):
        load_config(None, {"eval_tasks_limit": 0})
    cfg = load_config(None, {"eval_interval": 100, "eval_tasks_interval": 300})
    assert cfg.train.eval_tasks_interval == 300


def test_the_offline_guard_refuses_other_hosts():
    """What keeps these tests honest about the network: a connection elsewhere fails at once."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock, pytest.raises(OSError, match="offline"):
        sock.connect(("192.0.2.1", 443))  # TEST-NET-1: never a real host
