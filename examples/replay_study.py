"""Replay and distillation strategies, 3 seeds each.

    .venv/bin/python examples/replay_study.py pairs    # finetune, er, er+relation_kd, joint
    .venv/bin/python examples/replay_study.py classes  # finetune, er, kd, coconut (1 %, 4 %)

``pairs`` runs the default synth-pairs scenario, ``classes`` the class-incremental stream over
synth-pairs/all.
Each row is ``comodal run`` of ``examples/synth_pairs.yaml`` or
``examples/class_incremental.yaml`` with overrides; the tables (mean ± std over seeds) are
printed and written to ``examples/results/replay_<mode>.md``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from projection_study import fmt, write_result

from comodal.config import load_config
from comodal.platform.run import run

ROOT = Path(__file__).resolve().parent
SEEDS = [0, 1, 2]

PAIRS = [
    ("finetune", "[finetune]", None),
    ("er", "[er]", None),
    ("er + relation_kd", "[er, relation_kd]", None),
    ("joint", "[joint]", None),
]


def buffered(fraction: float) -> list[tuple[str, str, str | None]]:
    """er, er + kd (the "kd" row: distillation needs the rehearsal rows) and coconut, each
    with a class-balanced buffer of ``fraction`` of the training rows."""
    size = f"{{fraction: {fraction}}}"
    return [
        (f"er ({fraction:.0%})", "[er]", f"{{er: {size}}}"),
        (f"kd = er + kd ({fraction:.0%})", "[er, kd]", f"{{er: {size}}}"),
        (f"coconut ({fraction:.0%})", "[coconut]", f"{{coconut: {size}}}"),
    ]


CLASSES = [("finetune", "[finetune]", None), *buffered(0.01), *buffered(0.04),
           ("joint", "[joint]", None)]

COLUMNS = {
    "pairs": ("synth_pairs.yaml", "recall@1", [("R@1 Acc", "acc"), ("R@1 BWT", "bwt"),
                                               ("R@1 Forgetting", "forgetting"),
                                               ("R@1 Plasticity", "plasticity")]),
    "classes": ("class_incremental.yaml", "accuracy", [("Avg Acc (pooled)", "avg_inc_acc"),
                                                      ("Last Acc (pooled)", "acc"), ("BWT", "bwt"),
                                                      ("Forgetting", "forgetting"),
                                                      ("Plasticity", "plasticity")]),
}


def one(config: str, strategies: str, args: str | None, seed: int) -> dict:
    overrides = [f"strategies={strategies}", f"seed={seed}", "progress=false"]
    if args:
        overrides.append(f"strategy_args={args}")
    result = run(load_config(ROOT / config, overrides))
    return {**result.summary, "seconds": result.seconds}


def table(mode: str, variants: list) -> str:
    config, metric, columns = COLUMNS[mode]
    extra = ["R@10 Acc"] if mode == "pairs" else []
    head = [c for c, _ in columns] + extra + ["s/run"]
    lines = ["| strategy | " + " | ".join(head) + " |", "|---|" + "---:|" * len(head)]
    for label, strategies, args in variants:
        runs = [one(config, strategies, args, seed) for seed in SEEDS]
        cells = [fmt([r[metric][key] for r in runs]) for _, key in columns]
        if extra:
            cells.append(fmt([r["recall@10"]["acc"] for r in runs]))
        cells.append(f"{sum(r['seconds'] for r in runs) / len(runs):.0f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    return "\n".join(lines) + "\n"


def main() -> None:
    mode = sys.argv[1] if len(sys.argv) > 1 else "pairs"
    if mode not in COLUMNS:
        sys.exit(f"usage: replay_study.py pairs|classes (got {mode!r})")
    write_result(f"replay_{mode}", SEEDS, table(mode, PAIRS if mode == "pairs" else CLASSES))


if __name__ == "__main__":
    main()
