"""The prepared-data folder's layout, shared by the stage that writes it and those that read it:
one JSON-lines file per split (`train.jsonl`, `validation.jsonl`, `test.jsonl`)."""

from __future__ import annotations

import json
import os
from pathlib import Path


def split_file(folder: str | os.PathLike, split: str) -> Path:
    return Path(folder) / f"{split}.jsonl"


def read_split(folder: str | os.PathLike, split: str) -> list[dict]:
    """The records of one prepared split."""
    with open(split_file(folder, split), encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]
