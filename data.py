"""The data the model reads besides audio: for now, the AudioSet label file."""
from __future__ import annotations

import csv
from pathlib import Path


def read_labels(path: str | Path) -> list[str]:
    """AudioSet class_labels_indices.csv (columns index,mid,display_name) -> display names by index."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"label file {path}: no such file")
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"index", "mid", "display_name"} <= set(rows[0]):
        raise ValueError(f"label file {path}: expected the columns index,mid,display_name")
    names = {int(r["index"]): r["display_name"] for r in rows}
    if sorted(names) != list(range(len(names))):
        raise ValueError(f"label file {path}: indices are not 0..{len(names) - 1}")
    return [names[i] for i in range(len(names))]
