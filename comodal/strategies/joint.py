"""``joint``: all tasks' training data at once, the upper bound.

At the first task the trainer loads every task's batches (pair tasks interleaved, classify
tasks in one dataset) and grows every class; later tasks train nothing, so each later row of
the metric matrix re-evaluates the jointly trained model.
"""

from __future__ import annotations

from typing import Any

from comodal.strategies.base import Strategy


class Joint(Strategy):
    name = "joint"
    across_ranks = "replicated"
    kinds = ("pair", "classify", "sequence")

    def train_tasks(self, trainer: Any) -> list[int]:
        """Every task at the first task, none afterwards."""
        return list(range(len(trainer.scenario.tasks))) if trainer.experience_index == 0 else []
