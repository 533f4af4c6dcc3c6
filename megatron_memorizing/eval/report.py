"""Output shared by the evaluation tools: aligned terminal tables, JSON files and matplotlib figures
(Agg backend: no display needed)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Right-aligned columns under a header and a rule; floats as given (format them before)."""
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def run_labels(paths: Sequence[Path]) -> list[str]:
    """Each run's name, with its parent folder's where two runs share a name (the same variant in
    two comparisons, e.g. two seeds), less the leading words all those folders share:
    runs/cmp-1500-seed1/memory and runs/cmp-1500-seed2/memory -> seed1/memory and seed2/memory."""
    names = [path.name for path in paths]
    folders = [path.parent.name.split("-") for path in paths if names.count(path.name) > 1]
    shared = len(os.path.commonprefix(folders)) if folders else 0
    labels = []
    for path in paths:
        folder = "-".join(path.parent.name.split("-")[shared:]) or path.parent.name
        labels.append(f"{folder}/{path.name}" if names.count(path.name) > 1 else path.name)
    return labels


def write_json(path: str | Path, data: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def save_figure(figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def new_figure(width: float = 7.0, height: float = 4.2, columns: int = 1):
    """A figure and its axes (an array of `columns` axes side by side when more than one)."""
    return plt.subplots(1, columns, figsize=(width, height))
