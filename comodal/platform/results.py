"""The run directory: resolved config, metric matrices, summary, TensorBoard."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
import yaml

from comodal.core.files import atomic_write_text
from comodal.errors import DataError

# What a run's numbers mean. Format 2: retrieval counts content-identical partners as positives
# and a non-finite similarity as a miss, class-incremental Acc is pooled over test rows,
# relation_kd distils only pairs the teacher trained, kd distils a trained encoder's output.
# Results or checkpoints of another format are never reused, resumed or reported beside these.
RESULTS_FORMAT = 2


def _clean(value: float) -> float | None:
    return None if value is None or math.isnan(value) else round(float(value), 6)


def matrix_csv(matrix: torch.Tensor, task_names: list[str]) -> str:
    """Rows: 'before' then 'after <task>'; columns: evaluated tasks."""
    lines = ["after," + ",".join(task_names)]
    rows = ["before", *task_names]
    for name, row in zip(rows, matrix.tolist(), strict=True):
        lines.append(name + "," + ",".join("" if math.isnan(v) else f"{v:.6f}" for v in row))
    return "\n".join(lines) + "\n"


def write_run(
    out: Path,
    config: dict,
    task_names: list[str],
    matrices: dict[str, torch.Tensor],
    summary: dict[str, dict[str, float]],
    extra: dict[str, Any] | None = None,
) -> None:
    """Write everything a run produced into ``out`` (each file atomically)."""
    out = Path(out)
    atomic_write_text(out / "config.yaml", yaml.safe_dump(config, sort_keys=False))
    for metric, matrix in matrices.items():
        atomic_write_text(out / "matrices" / f"{metric}.csv", matrix_csv(matrix, task_names))
    payload = {
        "results_format": RESULTS_FORMAT,
        "tasks": task_names,
        "matrices": {m: [[_clean(v) for v in row] for row in r.tolist()]
                     for m, r in matrices.items()},
        "summary": {m: {k: _clean(v) for k, v in s.items()} for m, s in summary.items()},
        **(extra or {}),
    }
    atomic_write_text(out / "metrics.json", json.dumps(payload, indent=1))
    atomic_write_text(out / "summary.json", json.dumps(payload["summary"], indent=1))


def read_run(out: Path) -> dict:
    """The results a run wrote into ``out`` (its ``metrics.json``)."""
    path = Path(out) / "metrics.json"
    if not path.is_file():
        raise FileNotFoundError(f"{out}: not a run directory (no metrics.json)")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: truncated or corrupt ({err}); delete it and repeat the run "
                        "with --resume (compare resumes by itself): the run's checkpoints "
                        "rewrite it without training") from err


def results_format(data: dict) -> int:
    """The results format a run's ``metrics.json`` was written in (1: before it was recorded)."""
    return data.get("results_format", 1)


def check_same_format(runs: dict[str, dict]) -> None:
    """Refuse to show runs of different results formats side by side (``runs``: name ->
    ``metrics.json`` data): their numbers are computed differently."""
    formats = {name: results_format(data) for name, data in runs.items()}
    if len(set(formats.values())) > 1:
        old = [name for name, f in formats.items() if f != max(formats.values())]
        raise DataError(f"{', '.join(old[:3])}{' ...' if len(old) > 3 else ''}: written by an "
                        f"older comodal (results format {min(formats.values())}, the others "
                        f"{max(formats.values())}), whose numbers are computed differently; "
                        "rerun them (compare --rerun) before showing them together")


def format_matrix(matrix: torch.Tensor, task_names: list[str], metric: str) -> str:
    width = max(8, *(len(n) for n in task_names))
    head = f"{metric:<{width}} " + " ".join(f"{n[:width]:>{width}}" for n in task_names)
    lines = [head]
    for name, row in zip(["before", *task_names], matrix.tolist(), strict=True):
        cells = " ".join(f"{'-' if math.isnan(v) else f'{v:.3f}':>{width}}" for v in row)
        lines.append(f"{name[:width]:<{width}} {cells}")
    return "\n".join(lines)


def format_summaries(columns: dict[str, dict[str, dict[str, float]]], metric: str,
                     pooled: bool = False) -> str:
    """Side-by-side summary of ``metric`` for several runs: rows are summary measures. With
    ``pooled`` (class-incremental accuracy, as the runs record it) the labels say that acc and
    avg_inc_acc are pooled over test rows and the others per task."""
    names = list(columns)
    keys = list(next(iter(columns.values()))[metric])
    labels = {k: k if not pooled else
              f"{k} (pooled)" if k in ("acc", "avg_inc_acc") else f"{k} (per task)" for k in keys}
    head = max(14, *(len(label) + 1 for label in labels.values()))
    width = max(12, *(len(n) for n in names))
    lines = [f"{metric:<{head}}" + "".join(f"{n:>{width}}" for n in names)]
    for key in keys:
        cells = []
        for name in names:
            value = columns[name][metric].get(key)
            cells.append(f"{'-' if value is None or value != value else f'{value:+.4f}':>{width}}")
        lines.append(f"{labels[key]:<{head}}" + "".join(cells))
    return "\n".join(lines)
