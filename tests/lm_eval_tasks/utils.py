"""Loads an offline task's data: a .jsonl file of data/, one document per line, as the "test"
split (no download, no cache; the YAMLs name this through `custom_dataset`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

DATA = Path(__file__).resolve().parent / "data"


def load(data_file: str, **_metadata: Any) -> dict[str, Any]:
    import datasets

    with open(DATA / data_file, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return {"test": datasets.Dataset.from_list(rows)}
