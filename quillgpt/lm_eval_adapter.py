"""lm-evaluation-harness in process: any quill model as the harness's model "quill".

    quill eval RUN --tasks hellaswag,lambada_openai --limit 500

    from quillgpt.lm_eval_adapter import run_tasks, results_table
    results = run_tasks(run.model, run.tokenizer, ["hellaswag"], limit=500)
    print(results_table(results))

or through the harness's own front door, once this module is imported:
`lm_eval.simple_evaluate(model="quill", model_args="run=runs/x", tasks=[...])`.

The harness turns every task into three kinds of request, and `QuillLM` answers them:

- `loglikelihood(context, continuation)`: log p(continuation | context) and whether greedy
  decoding would produce it (multiple choice: each choice is one request). Scored by
  `scoring.score_continuations`: batched, longest first, contexts cut from the left to the
  model's context, as the harness's hf backend does.
- `loglikelihood_rolling(text)`: the whole text's log-likelihood (perplexity tasks), in the
  harness's windows of block_size tokens (each token scored once, with as much context as fits),
  all windows batched together.
- `generate_until(context, until=...)`: greedy (or sampled) continuations from the decode
  engine (`quillgpt.engine`; the ladder's rungs recompute), every request a row with its own
  settings, each stopped at its first stop string.

An empty context starts from the tokenizer's <|endoftext|>, or (tokenizers without one) a
newline. Characters outside a character-level vocabulary stop the evaluation, or with
`unknown="skip"` are dropped wherever they appear (`QuillLM.dropped` lists them).

`TaskEvalHook` runs tasks during training (config keys `eval_tasks`, `eval_tasks_interval`,
`eval_tasks_limit`, `eval_tasks_path`): each task's headline figure becomes a metrics.csv column.
"""

from __future__ import annotations

import difflib
import json
import logging
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch.nn as nn

from .engine import Request, complete
from .errors import QuillError
from .evaluate import encode_text
from .generate import start_ids
from .sampling import Sampling
from .scoring import score_continuations
from .tokenizers import Tokenizer

try:
    from lm_eval import utils as lm_utils
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs
except ImportError:  # pragma: no cover - the message is the point
    raise QuillError("evaluating on tasks needs lm-evaluation-harness: pip install 'quillgpt[eval]'") from None

DEFAULT_BATCH_SIZE = 16
MAX_FEWSHOT = 1000  # examples before each question: far more than any context holds
GENERATION_SEED = 1234  # the harness's default seed, for sampled generations


@register_model("quill")
class QuillLM(TemplateLM):
    """A quill model as an lm-evaluation-harness model: `QuillLM(run="runs/x")`, or
    `QuillLM(model=..., tokenizer=...)` for a model already in memory."""

    backend = "causal"

    def __init__(self, run: str | Path | None = None, model: nn.Module | None = None,
                 tokenizer: Tokenizer | None = None, batch_size: int | str | None = DEFAULT_BATCH_SIZE,
                 device: str | None = None, unknown: str = "error", max_gen_toks: int = 256,
                 progress: bool = True, **_ignored: Any):
        super().__init__()
        if model is None:
            if run is None:
                raise QuillError("QuillLM needs run=RUN_DIR, or model= and tokenizer=")
            from .checkpoint import load_run

            loaded = load_run(run, device or "cpu")
            model, tokenizer = loaded.model, loaded.tokenizer
        elif tokenizer is None:
            raise QuillError("QuillLM(model=...) needs the model's tokenizer= too")
        self.model, self.tokenizer = model, tokenizer
        self.batch_size = _batch_size(batch_size)
        self.unknown = unknown
        self.max_gen_toks = int(max_gen_toks)
        self.progress = progress
        self.dropped: set[str] = set()  # characters dropped from inputs (unknown="skip")
        self._device = next(model.parameters()).device
        encode_text(tokenizer, "", unknown)  # checks `unknown`

    # --- what the harness asks of a model -----------------------------------------------------

    @property
    def max_length(self) -> int:
        return self.model.config.block_size

    @property
    def eot_token_id(self) -> int:
        eot = self.tokenizer.eot_id
        return eot if eot is not None else start_ids(self.tokenizer)[0]

    @property
    def tokenizer_name(self) -> str:
        return f"quill-{self.tokenizer.kind}-{self.tokenizer.vocab_size}"

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        ids, dropped = encode_text(self.tokenizer, string, self.unknown)
        if dropped:
            known = self.tokenizer.stoi  # type: ignore[attr-defined] - only char tokenizers drop
            self.dropped.update(c for c in string if c not in known)
        return ids

    def _loglikelihood_tokens(self, requests: list, disable_tqdm: bool = False, **kwargs: Any
                              ) -> list[tuple[float, bool]]:
        for key, _, cont in requests:
            if not cont:  # e.g. a continuation made only of characters --unknown skip dropped
                context, continuation = key or ("", "")
                raise QuillError(f"the continuation {continuation!r} has no tokens to score "
                                 f"(after the context {context[-40:]!r})")
        scores = score_continuations(self.model, [(ctx, cont) for _, ctx, cont in requests],
                                     self.batch_size, progress=self.progress and not disable_tqdm)
        answers = [(s.logprob, s.greedy) for s in scores]
        for (key, _, _), answer in zip(requests, answers):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
        return answers

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        """Each text's log-likelihood over the harness's disjoint windows of max_length tokens
        (the first predicted from the start token), every window of every text in one batch run."""
        windows, owner = [], []
        for i, (string,) in enumerate(req.args for req in requests):
            for window in lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1):
                windows.append((None, *lm_utils.make_disjoint_window(window)))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owner, self._loglikelihood_tokens(windows, disable_tqdm)):
            totals[i] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        """Continuations until a stop string: every request a row of one decode engine with its
        own settings, `batch_size` rows at a time, longest context first (as the hf backend)."""
        args = [req.args for req in requests]
        encoded = [self.tok_encode(context) for context, _ in args]
        order = sorted(range(len(args)), key=lambda i: -len(encoded[i]))
        rows = [self._request(encoded[i], args[i][1], GENERATION_SEED + i) for i in order]
        out: list[str] = [""] * len(requests)
        for i, done in zip(order, complete(self.model, self.tokenizer, rows, max_rows=self.batch_size)):
            out[i] = done.text
            self.cache_hook.add_partial("generate_until", args[i], done.text)
        return out

    # --- generation ---------------------------------------------------------------------------

    def _request(self, context: list[int], gen_kwargs: dict, seed: int) -> Request:
        """One generate_until request as a decode-engine row: greedy unless the task samples."""
        kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
        eot = self.tokenizer.eot_id
        stop = handle_stop_sequences(kwargs.pop("until", None),
                                     self.tokenizer.decode([eot]) if eot is not None else None)
        max_new = int(kwargs.pop("max_gen_toks"))
        sampled = bool(kwargs.get("do_sample")) and float(kwargs.get("temperature") or 0.0) > 0
        # room for the new tokens where there is some, as the hf backend; past block_size the
        # engine moves its window (docs/generation.md)
        keep = self.max_length - max_new if max_new < self.max_length else self.max_length
        sampling = Sampling(max_new_tokens=max_new, stop=tuple(s for s in stop if s), seed=seed,
                            temperature=float(kwargs["temperature"]) if sampled else 0.0,
                            top_k=kwargs.get("top_k") if sampled else None,
                            top_p=kwargs.get("top_p") if sampled else None)
        return Request(context[-keep:] or start_ids(self.tokenizer), sampling)


def _batch_size(value: int | str | None) -> int:
    if value is None:
        return DEFAULT_BATCH_SIZE
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise QuillError(f"batch size must be a positive number (auto is not supported), got {value!r}") from None
    if n < 1:
        raise QuillError(f"batch size must be positive, got {n}")
    return n


# --- running tasks ----------------------------------------------------------------------------

def task_manager(include_path: str | Path | Sequence[str | Path] | None = None,
                 tasks: Sequence[str] | None = None) -> Any:
    """The harness's index of tasks, with the YAML files under `include_path` added. When every
    one of `tasks` is found there, only those directories are indexed (the harness's own index
    reads some ten thousand YAML files)."""
    from lm_eval.tasks import TaskManager

    quiet_harness()
    paths = [include_path] if isinstance(include_path, (str, Path)) else list(include_path or [])
    for p in paths:
        if not Path(p).is_dir():
            raise QuillError(f"task directory not found: {p}")
    paths = [str(p) for p in paths]
    if paths and tasks:
        local = TaskManager(include_path=paths, include_defaults=False)
        if all(name.strip() in local.all_tasks for name in tasks if name.strip()):
            return local
    return TaskManager(include_path=paths or None)


def check_tasks(names: Sequence[str], manager: Any) -> list[str]:
    """The task names, each known to the harness (QuillError naming close matches if not)."""
    names = [n.strip() for n in names if n.strip()]
    if not names:
        raise QuillError("no tasks given (e.g. --tasks hellaswag,lambada_openai)")
    known = set(manager.all_tasks)
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=3, cutoff=0.6)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise QuillError(f"unknown task {name!r}{hint} (lm-eval ls tasks lists them)")
    return names


def quiet_harness() -> None:
    """The harness logs every step at INFO; keep its warnings only."""
    logging.getLogger("lm_eval").setLevel(logging.WARNING)


def run_tasks(model: nn.Module, tokenizer: Tokenizer, tasks: Sequence[str],
              include_path: str | Path | Sequence[str | Path] | None = None, num_fewshot: int | None = None,
              limit: float | None = None, batch_size: int = DEFAULT_BATCH_SIZE, unknown: str = "error",
              bootstrap_iters: int = 1000, progress: bool = True, manager: Any = None) -> dict[str, Any]:
    """Run lm-evaluation-harness `tasks` on a model in memory; the harness's results dict, with
    "dropped": the distinct characters dropped from inputs (unknown="skip"), sorted.

    `limit`: items per task (a fraction of each task below 1). `bootstrap_iters`: resamples for
    the standard errors of metrics that need them (0: none)."""
    from lm_eval import simple_evaluate

    quiet_harness()
    manager = manager or task_manager(include_path, tasks)
    names = check_tasks(tasks, manager)
    if limit is not None and not 0 < limit < math.inf:  # NaN too
        raise QuillError(f"limit must be positive and finite, got {limit}")
    if num_fewshot is not None and not 0 <= num_fewshot <= MAX_FEWSHOT:
        raise QuillError(f"num_fewshot must be between 0 and {MAX_FEWSHOT}, got {num_fewshot}")
    if limit is not None and limit >= 1:
        limit = min(int(limit), sys.maxsize)  # more than a task holds: the whole task
    lm = QuillLM(model=model, tokenizer=tokenizer, batch_size=batch_size, unknown=unknown, progress=progress)
    was_training = model.training
    model.eval()
    try:
        results = simple_evaluate(model=lm, tasks=names, num_fewshot=num_fewshot, task_manager=manager,
                                  limit=limit, bootstrap_iters=bootstrap_iters, log_samples=False)
    except ValueError as e:
        if "Sample larger than population" not in str(e):
            raise
        raise QuillError(f"num_fewshot {num_fewshot}: a task has fewer examples than that to draw "
                         f"from") from None
    finally:
        model.train(was_training)
    results["dropped"] = sorted(lm.dropped)
    return results


def results_table(results: dict[str, Any]) -> str:
    """The harness's markdown table of results (and of groups, when there are any)."""
    table = lm_utils.make_table(results)
    if results.get("groups"):
        table += "\n" + lm_utils.make_table(results, "groups")
    return table


def results_json(results: dict[str, Any]) -> str:
    """The results as JSON (the harness's own serialisation of what JSON lacks)."""
    return json.dumps(results, indent=2, default=lm_utils.handle_non_serializable, ensure_ascii=False)


HEADLINE_METRICS = ("acc_norm", "acc", "exact_match", "bits_per_byte", "word_perplexity", "perplexity")


def headline(results: dict[str, Any]) -> dict[str, float]:
    """One figure per task, "task/metric": the first of HEADLINE_METRICS it reports (accuracy
    normalised by length where the task has it, as llm.c and nanochat plot HellaSwag)."""
    out = {}
    for task, metrics in results.get("results", {}).items():
        found = {k.split(",")[0]: v for k, v in metrics.items()
                 if "," in k and "_stderr" not in k and isinstance(v, (int, float))}
        for name in HEADLINE_METRICS:
            if name in found:
                out[f"{task}/{name}"] = float(found[name])
                break
    return out


# --- during training ----------------------------------------------------------------------------

@dataclass
class TaskEvalHook:
    """Runs lm-evaluation-harness tasks at the loop's evaluation steps (a train.EvalHook): one
    metrics.csv column per task ("hellaswag/acc_norm"). Characters a char-level vocabulary lacks
    are dropped (said once). `tokenizer` is the run's, set by `bind` once the trainer has it."""

    tasks: list[str]
    interval: int
    limit: float | None = None
    include_path: str | None = None
    batch_size: int = DEFAULT_BATCH_SIZE
    tokenizer: Tokenizer | None = None
    log: Any = print
    _manager: Any = field(default=None, repr=False)
    _said_dropped: bool = field(default=False, repr=False)

    @classmethod
    def from_config(cls, cfg: Any, log: Any = print) -> TaskEvalHook:
        t = cfg.train
        hook = cls([n.strip() for n in t.eval_tasks.split(",")], t.eval_tasks_interval or t.eval_interval,
                   t.eval_tasks_limit, t.eval_tasks_path, log=log)
        hook.check()
        return hook

    def check(self) -> None:
        """Fails now (not after the first training steps) on an unknown task or directory."""
        self._manager = task_manager(self.include_path, self.tasks)
        check_tasks(self.tasks, self._manager)

    def bind(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer

    def __call__(self, model: nn.Module, step: int) -> dict[str, float]:
        if self.tokenizer is None:
            raise QuillError("TaskEvalHook needs the run's tokenizer: call bind(tokenizer) first")
        results = run_tasks(model, self.tokenizer, self.tasks, limit=self.limit, batch_size=self.batch_size,
                            unknown="skip", bootstrap_iters=0, progress=False, manager=self._manager)
        if results["dropped"] and not self._said_dropped:
            shown = "".join(results["dropped"])
            self.log(f"tasks: characters outside the vocabulary are dropped wherever they appear: {shown!r}")
            self._said_dropped = True
        return headline(results)
