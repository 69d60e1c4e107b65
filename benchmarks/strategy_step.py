"""What each strategy of the CMCL table adds to a pair-task training step, and what it keeps.

One process: a three-task scenario over one modality pair (vision, text) of d-dimensional
cached-feature-like rows (n training pairs per task: two noisy views of one latent), and comodal
Trainers that differ only in their strategy stack, on the default pair setting of
``examples/synth_pairs.yaml`` (joint width 256, batch 64, AdamW 1e-3) with each strategy's
default options. Every runner trains tasks 1 and 2 once (untimed: memories, anchors and bases
fill), then task 3 in ``--rounds`` interleaved rounds of one epoch; the per-step time of each
call is compared with finetune's in the same round. A call skips the runner's end-of-task work
(its ``after_training_exp``), so every round sees the memory of tasks 1 and 2 (``der`` and
``derpp``, which fill their buffers during training, also keep offering task 3's rows).
``state KiB`` is what the strategy keeps across tasks: the tensors of its ``state_dict()``
(buffer slots, stored outputs, Fisher anchors, moments), as its checkpoint holds them. Nothing
about time is asserted.

    .venv/bin/python benchmarks/strategy_step.py          # about 3 min on 2 cores
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

from comodal.config import EvalConfig, ModalityConfig, TrainConfig
from comodal.core.data import MultimodalDataset
from comodal.platform.feature_cache import FeatureCache
from comodal.platform.modalities import Modality
from comodal.platform.model import MultimodalEncoder
from comodal.platform.trainer import Trainer
from comodal.scenarios.task import Scenario, Task
from comodal.strategies.registry import build_strategies

RESULTS = Path(__file__).resolve().parent / "results" / "strategy_step.json"
STACKS = ("finetune", "er", "ewc", "dns", "gpm", "gem", "agem", "der", "derpp", "co2l", "cila",
          "cflat", "cflat+er", "cflat+dns")
TASKS = 3


def make_task(i: int, n: int, d: int, g: torch.Generator) -> Task:
    """Pairs of noisy views of a latent around one of 10 class centres (the labels, which a
    class-balanced buffer balances), each view through its own random map."""
    maps = [torch.randn(d, d, generator=g) / d ** 0.5 for _ in range(2)]
    centres = torch.randn(10, d, generator=g)

    def split(rows: int, name: str) -> MultimodalDataset:
        labels = torch.randint(10, (rows,), generator=g)
        latent = centres[labels] + torch.randn(rows, d, generator=g)
        views = {m: latent @ w + 0.3 * torch.randn(rows, d, generator=g)
                 for m, w in zip(("vision", "text"), maps, strict=True)}
        return MultimodalDataset(name, f"strategy-bench-{i}-{name}", views, labels)

    return Task(f"task{i + 1}", ("vision", "text"), split(n, "train"), split(n // 4, "test"))


def state_bytes(value: Any) -> int:
    """Bytes of the tensors in a (nested) state."""
    if isinstance(value, torch.Tensor):
        return value.element_size() * value.numel()
    if isinstance(value, dict):
        return sum(state_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(state_bytes(v) for v in value)
    return 0


def make_trainer(stack: str, base: MultimodalEncoder, scenario: Scenario, cache: str,
                 args: argparse.Namespace) -> Trainer:
    modalities = {m: Modality(m, ModalityConfig(encoder="features", dim=args.dim))
                  for m in ("vision", "text")}
    trainer = Trainer(copy.deepcopy(base), modalities, FeatureCache(cache, progress=False),
                      TrainConfig(epochs=1, batch_size=args.batch_size, lr=1e-3),
                      EvalConfig(pool_size=200, pool_draws=1),
                      plugins=build_strategies(stack.split("+"), {}), seed=0, progress=False)
    trainer.setup(scenario)
    return trainer


def epoch_seconds(trainer: Trainer) -> float:
    """One epoch of the last task, without its end-of-task work."""
    gc.collect()
    start = time.perf_counter()
    trainer.train_experience(trainer.benchmark.train_stream[TASKS - 1])
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dim", type=int, default=384, help="feature width of both modalities")
    p.add_argument("--joint-dim", type=int, default=256)
    p.add_argument("--n", type=int, default=1500, help="training pairs per task")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--stacks", default=",".join(STACKS),
                   help="comma-separated strategy stacks (finetune is always measured)")
    add_output_options(p, RESULTS)
    args = parse_with_outputs(p, argv, RESULTS, {"dim": 16, "joint_dim": 8, "n": 96,
                                                 "rounds": 1, "batch_size": 32})
    stacks = ["finetune", *(s for s in args.stacks.split(",") if s and s != "finetune")]
    g = torch.Generator().manual_seed(0)
    scenario = Scenario([make_task(i, args.n, args.dim, g) for i in range(TASKS)])
    base = MultimodalEncoder({"vision": args.dim, "text": args.dim}, joint_dim=args.joint_dim)
    with tempfile.TemporaryDirectory() as cache:
        trainers = {stack: make_trainer(stack, base, scenario, cache, args) for stack in stacks}
        for trainer in trainers.values():  # tasks before the timed one: memories fill
            for exp in list(trainer.benchmark.train_stream)[: TASKS - 1]:
                trainer.train_experience(exp)
            trainer._hooks["after_training_exp"] = []  # keep that memory as it is
            epoch_seconds(trainer)  # warm-up
        times: dict[str, list[float]] = {stack: [] for stack in trainers}
        for k in range(args.rounds):
            for stack in stacks[k % len(stacks):] + stacks[: k % len(stacks)]:
                times[stack].append(epoch_seconds(trainers[stack]))
    steps = -(-args.n // args.batch_size)
    base_ms = statistics.median(1e3 * t / steps for t in times["finetune"])
    rows = {}
    for stack, trainer in trainers.items():
        ms = statistics.median(1e3 * t / steps for t in times[stack])
        rows[stack] = {
            "ms_per_step": ms,
            "ratio": ms / base_ms,
            "paired": statistics.median(a / b for a, b in zip(times[stack], times["finetune"],
                                                              strict=True)),
            "state_bytes": sum(state_bytes(plugin.state_dict()) for plugin in trainer.plugins
                               if hasattr(plugin, "state_dict")),
        }
    print(f"d = {args.dim}, joint {args.joint_dim}, {args.n} training pairs per task, batch "
          f"{args.batch_size}, {steps} steps/epoch of task {TASKS}, {args.rounds} rounds")
    print(f"{'stack':<12}{'ms/step':>9}{'ratio':>8}{'paired':>8}{'state KiB':>11}")
    for stack, r in rows.items():
        print(f"{stack:<12}{r['ms_per_step']:>9.2f}{r['ratio']:>8.2f}{r['paired']:>8.2f}"
              f"{r['state_bytes'] / 1024:>11.1f}")
    report = {"benchmark": "strategy_step", "config": vars(args) | {"out": str(args.out)},
              "machine": cpu_machine(),
              "runners": rows, "epoch_seconds": times}
    write_results(args.out, report)
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
