"""What replay adds to a training step, and what its buffer holds, at 1 % and 4 % buffers.

One process: a two-task class-incremental scenario over d-dimensional cached-feature-like rows
(n rows per task, 20 classes per task, a transcript column of the same width), and comodal
Trainers that differ only in their strategy: finetune, er, er + kd and coconut, each with a
class-balanced buffer of 1 % or 4 % of the training rows and the default memory batch (as many
rows as the training batch). Every runner trains task 1 once (untimed; the buffer fills), then
task 2 in ``--rounds`` interleaved rounds of one epoch; the per-step time of the epoch loop is
compared with finetune's in the same round. Nothing about time is asserted.

    .venv/bin/python benchmarks/replay_step.py          # about 1 min on 2 cores
"""

from __future__ import annotations

import argparse
import copy
import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from _options import (  # beside this script
    add_output_options,
    cpu_machine,
    parse_with_outputs,
    write_results,
)

from comodal.config import EvalConfig, ModalityConfig, TrainConfig, from_dict
from comodal.core.data import MultimodalDataset
from comodal.platform.feature_cache import FeatureCache
from comodal.platform.modalities import Modality
from comodal.platform.model import MultimodalEncoder
from comodal.platform.trainer import Trainer
from comodal.scenarios.task import Scenario, Task
from comodal.strategies.coconut import COCONUT, COCONUTConfig
from comodal.strategies.distill import KD
from comodal.strategies.finetune import Finetune
from comodal.strategies.replay import ER, ERConfig

RESULTS = Path(__file__).resolve().parent / "results" / "replay_step.json"
CLASSES_PER_TASK = 20


def make_task(i: int, n: int, d: int, g: torch.Generator) -> Task:
    """Rows of 20 classes around class centres, with a noisy transcript view of each."""
    classes = list(range(i * CLASSES_PER_TASK, (i + 1) * CLASSES_PER_TASK))
    centres = torch.randn(len(classes), d, generator=g)

    def split(rows: int, name: str) -> MultimodalDataset:
        labels = torch.randint(len(classes), (rows,), generator=g)
        audio = centres[labels] + torch.randn(rows, d, generator=g)
        text = centres[labels] + 0.5 * torch.randn(rows, d, generator=g)
        return MultimodalDataset(name, f"replay-bench-{i}-{name}",
                                 {"audio": audio, "text": text}, labels + classes[0])

    return Task(f"task{i + 1}", ("audio", "text"), split(n, "train"), split(n // 4, "test"),
                [f"c{c}" for c in range(2 * CLASSES_PER_TASK)], kind="classify",
                classes=classes)


def strategies(fraction: float) -> dict[str, list[Any]]:
    """The runners of one buffer size."""
    er = {"fraction": fraction}
    return {
        f"er {fraction:.0%}": [ER(from_dict(ERConfig, er))],
        f"er+kd {fraction:.0%}": [ER(from_dict(ERConfig, er)), KD()],
        f"coconut {fraction:.0%}": [COCONUT(from_dict(COCONUTConfig, er))],
    }


def make_trainer(plugins: list[Any], base: MultimodalEncoder, scenario: Scenario,
                 cache: str, args: argparse.Namespace) -> Trainer:
    d = args.dim
    modalities = {m: Modality(m, ModalityConfig(encoder="features", dim=d))
                  for m in ("audio", "text")}
    trainer = Trainer(copy.deepcopy(base), modalities, FeatureCache(cache, progress=False),
                      TrainConfig(epochs=1, batch_size=args.batch_size, lr=1e-3), EvalConfig(),
                      plugins=plugins, seed=0, progress=False)
    trainer.setup(scenario)
    return trainer


def epoch_seconds(trainer: Trainer) -> float:
    """One epoch of task 2; the buffer is not refilled (its after_training_exp is skipped)."""
    gc.collect()
    start = time.perf_counter()
    trainer.train_experience(trainer.benchmark.train_stream[1])
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--n", type=int, default=4000, help="training rows per task")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--rounds", type=int, default=7)
    add_output_options(p, RESULTS)
    args = parse_with_outputs(p, argv, RESULTS,
                              {"dim": 16, "n": 200, "rounds": 1, "batch_size": 32})
    g = torch.Generator().manual_seed(0)
    scenario = Scenario([make_task(i, args.n, args.dim, g) for i in range(2)])
    base = MultimodalEncoder({"audio": args.dim, "text": args.dim}, joint_dim=args.dim)
    runners = {"finetune": [Finetune()], **strategies(0.01), **strategies(0.04)}
    row_bytes = 2 * args.dim * 4 + 8  # a row's two float32 feature vectors and its label
    with tempfile.TemporaryDirectory() as cache:
        trainers = {name: make_trainer(plugins, base, scenario, cache, args)
                    for name, plugins in runners.items()}
        for trainer in trainers.values():  # task 1: the buffers fill
            trainer.train_experience(trainer.benchmark.train_stream[0])
            trainer._hooks["after_training_exp"] = []  # keep task 1's buffer as it is
            epoch_seconds(trainer)  # warm-up
        times: dict[str, list[float]] = {name: [] for name in trainers}
        names = list(trainers)
        for k in range(args.rounds):
            for name in names[k % len(names):] + names[: k % len(names)]:
                times[name].append(epoch_seconds(trainers[name]))
    steps = -(-args.n // args.batch_size)
    rows = {}
    for name, trainer in trainers.items():
        buffer = getattr(trainer.plugins[0], "buffer", None)
        ms = [1e3 * t / steps for t in times[name]]
        rows[name] = {
            "ms_per_step": statistics.median(ms),
            "ratio": statistics.median(ms) / statistics.median(1e3 * t / steps
                                                               for t in times["finetune"]),
            "paired": statistics.median(a / b for a, b in zip(times[name], times["finetune"],
                                                              strict=True)),
            "slots": len(buffer) if buffer else 0,
            "buffer_bytes": buffer.nbytes() if buffer else 0,
            "copied_rows_bytes": len(buffer) * row_bytes if buffer else 0,
        }
    print(f"d = {args.dim}, {args.n} training rows per task, batch {args.batch_size} "
          f"(+ as many memory rows), {steps} steps/epoch, {args.rounds} rounds")
    print(f"{'runner':<14}{'ms/step':>9}{'ratio':>8}{'paired':>8}{'slots':>7}"
          f"{'buffer B':>10}{'as copies B':>13}")
    for name, r in rows.items():
        print(f"{name:<14}{r['ms_per_step']:>9.2f}{r['ratio']:>8.2f}{r['paired']:>8.2f}"
              f"{r['slots']:>7}{r['buffer_bytes']:>10}{r['copied_rows_bytes']:>13}")
    report = {"benchmark": "replay_step", "config": vars(args) | {"out": str(args.out)},
              "machine": cpu_machine(),
              "runners": rows, "epoch_seconds": times}
    write_results(args.out, report)
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
