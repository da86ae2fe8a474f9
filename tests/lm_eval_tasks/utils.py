"""The offline tasks' data: a .jsonl file of data/, one document per line, as the "test" split,
read without a download or a cache. The YAMLs name `LocalTask` as their `class` (rather than a
`custom_dataset` function, which makes the harness print a note about custom kwargs on every
load); everything else about a task is its YAML."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lm_eval.api.task import ConfigurableTask

DATA = Path(__file__).resolve().parent / "data"


def load(data_file: str, **_metadata: Any) -> dict[str, Any]:
    import datasets

    with open(DATA / data_file, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return {"test": datasets.Dataset.from_list(rows)}


class LocalTask(ConfigurableTask):
    """A task configured by its YAML whose data is `dataset_kwargs.data_file` in data/."""

    def __init__(self, config: dict[str, Any] | None = None) -> None:
        super().__init__(config={k: v for k, v in (config or {}).items() if k != "class"})

    def download(self, dataset_kwargs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        self.dataset = load(**(dataset_kwargs or {}))
