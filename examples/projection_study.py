"""Gradient-projection strategies on the default synth-pairs scenario.

    .venv/bin/python examples/projection_study.py sweep     # DNS / GPM / EWC settings, seed 0
    .venv/bin/python examples/projection_study.py compare   # 3 seeds, the chosen defaults

Each variant is one ``comodal run`` of ``examples/synth_pairs.yaml`` with overrides; the tables
(mean ± std over seeds of the R@1 summaries and the final R@10) are printed and written to
``examples/results/projection_<mode>.md``.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

from comodal.config import load_config
from comodal.platform.run import run

ROOT = Path(__file__).resolve().parent
CONFIG = ROOT / "synth_pairs.yaml"

SWEEP = [
    ("finetune", "[finetune]", None),
    ("dns grad, energy 0.99 (paper-style)", "[dns]",
     "{dns: {mode: grad, input_rule: energy, input_threshold: 0.99, output_rule: energy, "
     "output_threshold: 0.99}}"),
    ("dns grad, relative 1e-4", "[dns]",
     "{dns: {mode: grad, input_rule: relative, input_threshold: 1e-4, "
     "output_rule: relative, output_threshold: 1e-4}}"),
    ("dns update, energy 0.99", "[dns]",
     "{dns: {mode: update, input_rule: energy, input_threshold: 0.99, output_rule: energy, "
     "output_threshold: 0.99}}"),
    ("dns update, energy 0.999", "[dns]",
     "{dns: {mode: update, input_rule: energy, input_threshold: 0.999, output_rule: energy, "
     "output_threshold: 0.999}}"),
    ("dns update, relative 1e-3", "[dns]",
     "{dns: {mode: update, input_rule: relative, input_threshold: 1e-3, "
     "output_rule: relative, output_threshold: 1e-3}}"),
    ("dns update, relative 1e-4", "[dns]",
     "{dns: {mode: update, input_rule: relative, input_threshold: 1e-4, "
     "output_rule: relative, output_threshold: 1e-4}}"),
    ("dns update, relative 1e-5", "[dns]",
     "{dns: {mode: update, input_rule: relative, input_threshold: 1e-5, "
     "output_rule: relative, output_threshold: 1e-5}}"),
    ("dns update, relative 1e-4, snapshot partners", "[dns]",
     "{dns: {mode: update, input_rule: relative, input_threshold: 1e-4, "
     "output_rule: relative, output_threshold: 1e-4, partner_embeddings: snapshot}}"),
    ("dns update, relative 1e-5, keep norms", "[dns]",
     "{dns: {mode: update, input_rule: relative, input_threshold: 1e-5, "
     "output_rule: relative, output_threshold: 1e-5, keep_norms: true}}"),
    ("dns as in the paper (preset: grad, absolute cuts 0.1 / 0, snapshot partners)", "[dns]",
     "{dns: {preset: paper}}"),
    ("gpm grad, 0.97 (+0.003/task, Saha et al.)", "[gpm]",
     "{gpm: {mode: grad, threshold: 0.97, threshold_step: 0.003, max_threshold: 0.999}}"),
    ("gpm update, 0.97 (+0.003/task)", "[gpm]",
     "{gpm: {mode: update, threshold: 0.97, threshold_step: 0.003, max_threshold: 0.999}}"),
    ("gpm update, 0.999", "[gpm]",
     "{gpm: {mode: update, threshold: 0.999, threshold_step: 0.0}}"),
    ("gpm update, 0.99999", "[gpm]",
     "{gpm: {mode: update, threshold: 0.99999, threshold_step: 0.0, max_threshold: 1.0}}"),
    ("ewc 1e3", "[ewc]", "{ewc: {ewc_lambda: 1000.0}}"),
    ("ewc 1e4", "[ewc]", "{ewc: {ewc_lambda: 10000.0}}"),
    ("ewc 1e5", "[ewc]", "{ewc: {ewc_lambda: 100000.0}}"),
    ("ewc 1e6", "[ewc]", "{ewc: {ewc_lambda: 1000000.0}}"),
]

COMPARE = [
    ("finetune", "[finetune]", None),
    ("dns (grad)", "[dns]", "{dns: {mode: grad}}"),
    ("dns (update)", "[dns]", "{dns: {mode: update}}"),
    ("dns (update, keep norms, relative 1e-5)", "[dns]",
     "{dns: {keep_norms: true, input_threshold: 1e-5, output_threshold: 1e-5}}"),
    ("dns (paper preset)", "[dns]", "{dns: {preset: paper}}"),
    ("gpm", "[gpm]", None),
    ("ewc", "[ewc]", None),
    ("joint", "[joint]", None),
]


def one(strategies: str, args: str | None, seed: int) -> dict:
    overrides = [f"strategies={strategies}", f"seed={seed}", "progress=false"]
    if args:
        overrides.append(f"strategy_args={args}")
    result = run(load_config(CONFIG, overrides))
    r1, r10 = result.summary["recall@1"], result.summary["recall@10"]
    return {"Acc": r1["acc"], "BWT": r1["bwt"], "Forgetting": r1["forgetting"],
            "Plasticity": r1["plasticity"], "R@10 Acc": r10["acc"]}


def fmt(values: list[float]) -> str:
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:+.3f}"
    return f"{mean:+.3f} ± {statistics.stdev(values):.3f}"


def table(variants: list, seeds: list[int]) -> str:
    columns = ["Acc", "BWT", "Forgetting", "Plasticity", "R@10 Acc"]
    lines = ["| strategy | " + " | ".join(f"R@1 {c}" if c != "R@10 Acc" else c
                                           for c in columns) + " |",
             "|---|" + "---:|" * len(columns)]
    for label, strategies, args in variants:
        runs = [one(strategies, args, seed) for seed in seeds]
        cells = [fmt([r[c] for r in runs]) for c in columns]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    return "\n".join(lines) + "\n"


def write_result(name: str, seeds: list[int], text: str) -> None:
    """A study's table under ``examples/results/<name>.md``, with the seeds it used."""
    out = ROOT / "results" / f"{name}.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text(f"seeds: {seeds}\n\n{text}")
    print(f"\nwrote {out}")


def main() -> None:
    mode = sys.argv[1] if len(sys.argv) > 1 else "compare"
    variants, seeds = (SWEEP, [0]) if mode == "sweep" else (COMPARE, [0, 1, 2])
    write_result(f"projection_{mode}", seeds, table(variants, seeds))


if __name__ == "__main__":
    main()
