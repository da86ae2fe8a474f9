"""The offline tasks the project ships (tests/lm_eval_tasks/) are clean under the harness: loading
and running them prints no warning, whether through `quill eval --tasks` or the harness's own
`lm-eval` command, and they keep the metrics docs/eval.md names."""

from __future__ import annotations

import logging
import os
import warnings

import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # before the harness imports datasets
os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("lm_eval", reason="the eval extra: pip install 'quillgpt[eval]'")

from conftest import LM_EVAL_TASKS, task_text  # noqa: E402

from quillgpt.config import ModelConfig  # noqa: E402
from quillgpt.lm_eval_adapter import run_tasks  # noqa: E402
from quillgpt.model import GPT  # noqa: E402
from quillgpt.tokenizers import CharTokenizer  # noqa: E402

TASKS = ["quill_sonnets", "quill_verse_choice", "quill_verse_lastword", "quill_verse_repeat"]
pytestmark = pytest.mark.usefixtures("offline")


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_loading_and_running_the_tasks_warns_about_nothing():
    from lm_eval.tasks import TaskManager

    handler = Records()
    harness = logging.getLogger("lm_eval")
    harness.addHandler(handler)
    tokenizer = CharTokenizer.train(task_text())
    model = GPT(ModelConfig(vocab_size=tokenizer.vocab_size, block_size=32, n_layer=1, n_head=2, n_embd=16))
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            manager = TaskManager(include_path=str(LM_EVAL_TASKS), include_defaults=False)
            loaded = manager.load(TASKS)["tasks"]
            results = run_tasks(model, tokenizer, TASKS, include_path=LM_EVAL_TASKS, limit=2, progress=False,
                                bootstrap_iters=0)
    finally:
        harness.removeHandler(handler)
    assert set(loaded) == set(TASKS)
    said = [f"{r.name}: {r.getMessage()}" for r in handler.records]
    assert not said, "the harness warned:\n" + "\n".join(said)
    ours = [str(w.message) for w in caught if "lm_eval_tasks" in str(w.filename)]
    assert not ours, ours
    # the metrics the docs print, each with its direction as the harness shows it (↓ / ↑)
    assert set(results["results"]["quill_sonnets"]) >= {"bits_per_byte,none", "word_perplexity,none",
                                                        "byte_perplexity,none"}
    assert results["higher_is_better"]["quill_sonnets"] == {"word_perplexity": False, "byte_perplexity": False,
                                                            "bits_per_byte": False}
    assert results["higher_is_better"]["quill_verse_choice"] == {"acc": True, "acc_norm": True}
