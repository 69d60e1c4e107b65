"""A comodal scenario as an Avalanche 0.6 benchmark.

Avalanche's dataset transforms assume (x, y, t) tuples and break on dict samples, so the
datasets are wrapped without transform groups and carry their own collate function.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from comodal._avalanche import (
    CLScenario,
    DatasetExperience,
    EagerCLStream,
    make_avalanche_dataset,
)
from comodal.scenarios.task import Task


class PairExperience(DatasetExperience):
    """An experience that knows its comodal task and modality pair."""

    def __init__(self, *, dataset: Any, task: Task, current_experience: int) -> None:
        super().__init__(dataset=dataset, current_experience=current_experience)
        self.task = task
        self.modalities = task.modalities


def pair_benchmark(tasks: Sequence[Task], collate_fn: Callable[[list], Any] | None) -> CLScenario:
    def stream(name: str, split: str) -> EagerCLStream:
        exps = [
            PairExperience(
                dataset=make_avalanche_dataset(getattr(task, split), collate_fn=collate_fn),
                task=task,
                current_experience=i,
            )
            for i, task in enumerate(tasks)
        ]
        return EagerCLStream(name, exps)

    return CLScenario([stream("train", "train"), stream("test", "test")])
