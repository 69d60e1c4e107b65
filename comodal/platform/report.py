"""Tables and plots of a comparison directory, from the saved run results alone.

``summary.md`` and ``summary.csv``: one row per strategy stack, mean ± std over seeds of the
continual summaries of the headline metric (R@1 for pair streams, accuracy for
class-incremental ones) and of the other task metrics, the best value per column marked, and
the hyperparameters that differ between rows listed under the table. ``plots/``: the metric
matrix per stack as a heatmap, each task's metric along the stream, and the
stability-plasticity trade-off (Plasticity against BWT); the same figures go to TensorBoard
under ``tb/``.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import shutil
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from comodal.config import from_dict  # noqa: E402
from comodal.core.files import atomic_write_text  # noqa: E402
from comodal.errors import DataError  # noqa: E402
from comodal.platform.results import check_same_format, read_run  # noqa: E402
from comodal.yaml_input import read_yaml  # noqa: E402

SUMMARIES = [("Acc", "acc", True), ("Avg inc Acc", "avg_inc_acc", True), ("BWT", "bwt", True),
             ("FWT", "fwt", True), ("Forgetting", "forgetting", False),
             ("Plasticity", "plasticity", True)]
# the final value ("acc") of other metrics, and whether higher is better: sequence tasks' word
# and character error rates are pooled over the test rows of the intents seen so far
EXTRA = [("R@10 Acc", "recall@10", True), ("zero-shot Acc", "zeroshot", True),
         ("Last WER (pooled)", "wer", False), ("Last CER (pooled)", "cer", False)]
# ``--columns cmcl``: the CMCL paper's table (Liu et al., NeurIPS 2025): final zero-shot
# accuracy and its BWT, final R@1, R@5 and R@10, and the BWT of R@10
CMCL_COLUMNS = [("zero-shot Acc", "zeroshot", "acc", True),
                ("zero-shot BWT", "zeroshot", "bwt", True), ("R@1", "recall@1", "acc", True),
                ("R@5", "recall@5", "acc", True), ("R@10", "recall@10", "acc", True),
                ("R@10 BWT", "recall@10", "bwt", True)]
LABELS = {"recall@1": "R@1", "accuracy": "accuracy"}
POOLED_LABELS = {"acc": "Last Acc (pooled)", "avg_inc_acc": "Avg Acc (pooled)"}


def load_runs(directory: Path) -> dict[str, list[dict[str, Any]]]:
    """Finished runs of a comparison directory by stack (``<stack>/seed<k>/metrics.json``)."""
    runs: dict[str, list[dict[str, Any]]] = {}
    named: dict[str, dict[str, Any]] = {}  # <stack>/seed<k> -> data
    for path in sorted(Path(directory).glob("*/seed*/metrics.json")):
        data = named[f"{path.parent.parent.name}/{path.parent.name}"] = read_run(path.parent)
        data["config"] = read_yaml(path.parent / "config.yaml", "run config")
        runs.setdefault(path.parent.parent.name, []).append(data)
    check_same_format(named)
    if not runs:
        if (Path(directory) / "metrics.json").is_file():
            raise FileNotFoundError(f"{directory}: a run directory, not a comparison (no "
                                    "<stack>/seed<k>/metrics.json); comodal summarize shows runs")
        raise FileNotFoundError(f"{directory}: no finished runs (<stack>/seed<k>/metrics.json)")
    asked = read_plan(directory).get("strategies", [])  # the order the stacks were asked for
    order = [s for s in asked if s in runs] + sorted(s for s in runs if s not in asked)
    return {s: runs[s] for s in order}


def read_plan(directory: Path) -> dict[str, list]:
    """The entries, seeds and table columns ``compare`` was asked for (``compare.json``; empty
    if absent)."""
    path = Path(directory) / "compare.json"
    if not path.is_file():
        return {}
    try:
        plan = json.loads(path.read_text())
        return {"strategies": list(plan["strategies"]), "seeds": list(plan["seeds"]),
                "columns": plan.get("columns", "default")}  # older comparisons: default
    except (ValueError, KeyError, TypeError) as err:
        raise DataError(f"{path}: truncated or not written by comodal compare ({err!r}); "
                        "repeat the compare command to rewrite it") from err


def missing(directory: Path, plan: dict[str, list]) -> list[str]:
    """``<entry> seed<k>`` of every run of the plan that has not finished."""
    return [f"{s} seed{k}" for s in plan.get("strategies", []) for k in plan.get("seeds", [])
            if not (Path(directory) / s / f"seed{k}" / "metrics.json").is_file()]


def headline(runs: dict[str, list[dict[str, Any]]]) -> str:
    summary = next(iter(runs.values()))[0]["summary"]
    return "recall@1" if "recall@1" in summary else "accuracy"


def columns(runs: dict[str, list[dict[str, Any]]],
            kind: str = "default") -> list[tuple[str, str, str, bool]]:
    """(label, metric, summary key, higher is better) of every table column: ``default`` the
    headline's summaries and the final R@10 and zero-shot accuracy (sequence tasks: the final
    pooled WER and CER, lower is better); ``cmcl`` the CMCL paper's.
    Where every run records its headline's Acc and Avg Acc as pooled over test rows
    (class-incremental accuracy), the labels say so, and that the other summaries come from the
    per-task matrix."""
    available = set.intersection(*(set(r["summary"]) for rs in runs.values() for r in rs))
    if kind == "cmcl":
        absent = sorted({m for _, m, _, _ in CMCL_COLUMNS} - available)
        if absent:
            raise DataError(f"--columns cmcl: the CMCL table needs {', '.join(absent)} in every "
                            "run, and some runs have none (pair tasks with labels and class "
                            "texts give zero-shot accuracy; class-incremental streams have no "
                            "recalls); use --columns default")
        return CMCL_COLUMNS
    metric = headline(runs)
    if all(metric in r.get("pooled_acc", ()) for rs in runs.values() for r in rs):
        cols = [(POOLED_LABELS.get(key, f"{label} (per task)"), metric, key, up)
                for label, key, up in SUMMARIES]
    else:
        cols = [(f"{LABELS[metric]} {label}", metric, key, up) for label, key, up in SUMMARIES]
    cols += [(label, m, "acc", up) for label, m, up in EXTRA if m in available and m != metric]
    return cols


def _value(run: dict[str, Any], metric: str, key: str) -> float:
    value = run["summary"].get(metric, {}).get(key)
    return math.nan if value is None else value


def aggregate(runs: dict[str, list[dict[str, Any]]],
              cols: list[tuple[str, str, str, bool]]) -> dict[str, dict[str, tuple]]:
    """Per stack and column: (mean, std, seeds) over the stack's runs (std nan for one seed)."""
    out: dict[str, dict[str, tuple]] = {}
    for stack, rs in runs.items():
        out[stack] = {}
        for label, metric, key, _ in cols:
            values = [_value(r, metric, key) for r in rs]
            values = [v for v in values if not math.isnan(v)]
            mean = statistics.fmean(values) if values else math.nan
            std = statistics.stdev(values) if len(values) > 1 else math.nan
            out[stack][label] = (mean, std, len(values))
    return out


def best(table: dict[str, dict[str, tuple]], runs: dict, cols: list[tuple[str, str, str, bool]],
         seeds: int = 0) -> dict[str, set[str]]:
    """Per column, the stacks with the best mean (ties all count) among those with all
    ``seeds`` runs (default: as many as the most complete stack): a mean of fewer seeds
    does not win."""
    full = seeds or max(len(rs) for rs in runs.values())
    winners = {}
    for label, _, _, up in cols:
        means = {s: row[label][0] for s, row in table.items()
                 if not math.isnan(row[label][0]) and len(runs[s]) >= full}
        if means:
            top = max(means.values()) if up else min(means.values())
            winners[label] = {s for s, m in means.items() if abs(m - top) < 5e-4}
    return winners


def hyperparameters(runs: dict[str, list[dict[str, Any]]]) -> dict[str, list[str]]:
    """Per stack, ``strategy.option = value`` for every resolved strategy option that is not
    the same in every stack (the runs share everything else: one config). The modules under
    the config's ``imports`` are imported first, to find the strategies they register."""
    from comodal.build import import_modules
    from comodal.strategies.registry import strategies

    flat: dict[str, dict[str, Any]] = {}
    for stack, rs in runs.items():
        config = rs[0]["config"]
        import_modules(config.get("imports", []))  # runs of an older comodal have none
        options = {}
        for name in config["strategies"]:
            cls = strategies()[name].Config
            given = config["strategy_args"].get(name, {})
            resolved = dataclasses.asdict(from_dict(cls, given, f"strategy_args.{name}"))
            options.update({f"{name}.{k}": v for k, v in resolved.items()})
        flat[stack] = options
    keys = {k for options in flat.values() for k in options}
    shared = {k for k in keys if sum(k in o for o in flat.values()) == len(flat)
              and len({repr(o[k]) for o in flat.values()}) == 1}
    return {s: [f"{k} = {o[k]}" for k in sorted(o) if k not in shared] for s, o in flat.items()}


def _cell(mean: float, std: float, n: int) -> str:
    if math.isnan(mean):
        return "-"
    return f"{mean:.3f} ± {std:.3f}" if n > 1 else f"{mean:.3f} (1 seed)"


def summary_table(runs: dict[str, list[dict[str, Any]]], seeds: int,
                  kind: str) -> tuple[list[tuple[str, str, str, bool]], dict, dict]:
    """The ``kind`` of columns, each stack's (mean, std, seeds) per column, and each column's
    best stacks: what ``markdown`` and ``csv_text`` render."""
    cols = columns(runs, kind)
    table = aggregate(runs, cols)
    return cols, table, best(table, runs, cols, seeds)


def markdown(runs: dict[str, list[dict[str, Any]]], seeds: int = 0,
             absent: Sequence[str] = (), kind: str = "default") -> str:
    """The summary table of the ``kind`` of columns; ``seeds`` asked per entry, ``absent`` the
    planned runs missing."""
    cols, table, winners = summary_table(runs, seeds, kind)
    lines = ["| strategy | seeds | " + " | ".join(c[0] for c in cols) + " |",
             "|---|---:|" + "---:|" * len(cols)]
    for stack, row in table.items():
        cells = []
        for label, *_ in cols:
            text = _cell(*row[label])
            cells.append(f"**{text}**" if stack in winners.get(label, ()) else text)
        lines.append(f"| {stack} | {len(runs[stack])} | " + " | ".join(cells) + " |")
    full = seeds or max(len(rs) for rs in runs.values())
    partial = (f" among entries with all {full} seeds" if any(len(rs) < full for rs in
                                                               runs.values()) else "")
    lines += ["", f"Mean ± std over seeds; **bold**: best in its column{partial} (lowest for "
              "Forgetting, highest otherwise)."]
    if absent:
        lines += ["", "Not finished, left out: " + ", ".join(absent) + "."]
    params = hyperparameters(runs)
    if any(params.values()):
        lines += ["", "Hyperparameters that differ between rows:", ""]
        lines += [f"- {s}: " + ", ".join(p) for s, p in params.items() if p]
    return "\n".join(lines) + "\n"


def csv_text(runs: dict[str, list[dict[str, Any]]], seeds: int = 0,
             kind: str = "default") -> str:
    cols, table, winners = summary_table(runs, seeds, kind)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["strategy", "seeds", *(f"{c[0]} {s}" for c in cols for s in ("mean", "std")),
                     "best in"])
    for stack, row in table.items():
        values = [f"{v:.6f}" for c in cols for v in row[c[0]][:2]]
        marks = ";".join(c[0] for c in cols if stack in winners.get(c[0], ()))
        writer.writerow([stack, len(runs[stack]), *values, marks])
    return buffer.getvalue()


# ----------------------------------------------------------------------------- plots
def _matrix(run: dict[str, Any], metric: str) -> np.ndarray:
    return np.array([[np.nan if v is None else v for v in row]
                     for row in run["matrices"][metric]], dtype=float)


def _short(name: str, width: int = 18) -> str:
    return name if len(name) <= width else name[: width - 1] + "…"


def _task_key(tasks: list[str]) -> str:
    """``T1 = name, ...`` in lines of at most three tasks (figure titles)."""
    names = [f"T{j + 1} = {_short(t, 28)}" for j, t in enumerate(tasks)]
    return "\n".join(", ".join(names[i:i + 3]) for i in range(0, len(names), 3))


def plot_matrices(runs: dict[str, list[dict[str, Any]]]) -> plt.Figure:
    """Seed-mean matrix of the headline metric per stack, one annotated heatmap each, on one
    colour scale."""
    metric = headline(runs)
    tasks = next(iter(runs.values()))[0]["tasks"]
    means = {s: np.nanmean([_matrix(r, metric) for r in rs], axis=0) for s, rs in runs.items()}
    top = max(0.05, float(np.nanmax([np.nanmax(m) for m in means.values()])))
    n, t = len(runs), len(tasks)
    cols = min(n, 4 if t <= 5 else 3 if t <= 7 else 2)  # figures no wider than about 18 in
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, squeeze=False, constrained_layout=True,
                             figsize=(1.6 + 0.75 * (t + 1) * cols, 1.2 + 0.5 * (t + 2) * rows))
    for ax in axes.flat[n:]:
        ax.axis("off")
    for k, (ax, (stack, mean)) in enumerate(zip(axes.flat, means.items(), strict=False)):
        image = ax.imshow(mean, vmin=0, vmax=top, cmap="viridis", aspect="auto")
        ax.set_title(f"{stack} ({len(runs[stack])} seeds)", fontsize=10)
        ax.set_xticks(range(t), [f"T{j + 1}" for j in range(t)], fontsize=8)
        labels = ["before"] + [f"after T{i + 1}" for i in range(t)]
        ax.set_yticks(range(t + 1), labels if k % cols == 0 else [""] * (t + 1), fontsize=8)
        for (i, j), v in np.ndenumerate(mean):
            if not np.isnan(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                        color="black" if v > 0.6 * top else "white")
    fig.colorbar(image, ax=axes, shrink=0.7, label=f"{LABELS[metric]} (columns: evaluated task)")
    fig.suptitle(f"{LABELS[metric]} on each task (columns) after each task (rows), mean over "
                 f"seeds\n{_task_key(tasks)}", fontsize=9)
    return fig


def plot_stream(runs: dict[str, list[dict[str, Any]]]) -> plt.Figure:
    """Each task's headline metric after every task, one panel per task, a line per stack
    (mean over seeds, band = ± std)."""
    metric = headline(runs)
    tasks = next(iter(runs.values()))[0]["tasks"]
    cols = min(math.ceil(math.sqrt(len(tasks))), 3)
    rows = math.ceil(len(tasks) / cols)
    fig, axes = plt.subplots(rows, cols, squeeze=False, sharey=True,
                             figsize=(4.2 * cols, 3.2 * rows + 0.6))
    steps = np.arange(len(tasks) + 1)
    for j, ax in enumerate(axes.flat):
        if j >= len(tasks):
            ax.axis("off")
            continue
        for stack, rs in runs.items():
            values = np.array([_matrix(r, metric)[:, j] for r in rs])
            mean = values.mean(0)
            std = values.std(0, ddof=1) if len(values) > 1 else np.zeros_like(mean)
            ax.plot(steps, mean, marker="o", markersize=3, label=stack)
            ax.fill_between(steps, mean - std, mean + std, alpha=0.15)
        ax.axvline(j + 1, color="grey", linestyle=":", linewidth=1)
        ax.set_title(f"T{j + 1}: {_short(tasks[j], 34)}", fontsize=10)
        ax.set_xticks(steps, ["0"] + [f"T{i + 1}" for i in range(len(tasks))])
        ax.set_xlabel("trained up to", fontsize=9)
        ax.set_ylabel(LABELS[metric], fontsize=9)
        ax.grid(alpha=0.3)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.suptitle(f"Each task's {LABELS[metric]} along the stream (dotted: when it is trained)",
                 fontsize=11)
    if len(tasks) < rows * cols:  # an empty panel holds the legend
        axes.flat[len(tasks)].legend(handles, labels, loc="center", fontsize=9)
        fig.tight_layout(rect=(0, 0, 1, 0.95))
    else:
        fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 5), fontsize=9)
        fig.tight_layout(rect=(0, 0.06 + 0.04 * math.ceil(len(labels) / 5), 1, 0.95))
    return fig


def plot_tradeoff(runs: dict[str, list[dict[str, Any]]]) -> plt.Figure:
    """Plasticity against BWT, one labelled point per stack with ± std bars over seeds."""
    metric = headline(runs)
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    for i, (stack, rs) in enumerate(runs.items()):
        x = [_value(r, metric, "bwt") for r in rs]
        y = [_value(r, metric, "plasticity") for r in rs]
        spread = (np.std(x, ddof=1), np.std(y, ddof=1)) if len(rs) > 1 else (0.0, 0.0)
        ax.errorbar(np.mean(x), np.mean(y), xerr=spread[0], yerr=spread[1], fmt="o", capsize=3)
        ax.annotate(stack, (np.mean(x), np.mean(y)), textcoords="offset points",
                    xytext=(6, 5 if i % 2 == 0 else -14), fontsize=9,  # neighbours apart
                    bbox={"boxstyle": "round,pad=0.1", "fc": "white", "alpha": 0.7, "lw": 0})
    ax.set_xlabel(f"BWT of {LABELS[metric]} (stability: higher forgets less)")
    ax.set_ylabel(f"Plasticity of {LABELS[metric]} (mean R[j, j])")
    ax.set_title("Stability-plasticity trade-off (mean ± std over seeds)", fontsize=11)
    ax.grid(alpha=0.3)
    ax.margins(0.2)
    fig.tight_layout()
    return fig


PLOTS = {"matrices": plot_matrices, "stream": plot_stream, "stability_plasticity": plot_tradeoff}


def write_report(directory: Path, kind: str | None = None) -> dict[str, Any]:
    """Write ``summary.md``, ``summary.csv`` (with the ``kind`` of columns: ``default`` or
    ``cmcl``; None: those ``compare`` was given), ``plots/*.png`` and TensorBoard images from
    the saved runs; returns the paths, the Markdown table and the planned runs not finished."""
    from torch.utils.tensorboard import SummaryWriter

    directory = Path(directory)
    runs = load_runs(directory)
    plan = read_plan(directory)
    absent, seeds = missing(directory, plan), len(plan.get("seeds", []))
    kind = kind or plan.get("columns", "default")
    text = markdown(runs, seeds, absent, kind)
    atomic_write_text(directory / "summary.md", text)
    atomic_write_text(directory / "summary.csv", csv_text(runs, seeds, kind))
    shutil.rmtree(directory / "tb", ignore_errors=True)
    plots = {}
    with SummaryWriter(str(directory / "tb")) as writer:
        for name, draw in PLOTS.items():
            fig = draw(runs)
            path = directory / "plots" / f"{name}.png"
            path.parent.mkdir(exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp.png")
            fig.savefig(tmp, dpi=110)
            tmp.replace(path)  # atomic, like every other result file
            writer.add_figure(f"compare/{name}", fig)  # closes the figure
            plots[name] = path
    return {"markdown": text, "plots": plots, "missing": absent}
