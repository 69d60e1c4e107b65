"""Plugins that break a torchrun run on purpose, for tests/test_distributed.py: one kills a
rank in the middle of a task, one lets a rank's weights drift."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import torch

from comodal.platform import distributed


class KillRank:
    """Kill rank ``rank`` with SIGKILL at step ``step`` of task ``task`` (0-based), once: the
    ``marker`` file it writes first keeps a resumed run alive."""

    across_ranks = "replicated"  # it changes nothing it does not kill

    def __init__(self, rank: int, task: int, step: int, marker: str) -> None:
        self.rank, self.task, self.step, self.marker = rank, task, step, Path(marker)
        self.steps = 0

    def before_training_iteration(self, strategy: Any, **kwargs: Any) -> None:
        world = distributed.current()
        if strategy.experience_index != self.task:
            return
        self.steps += 1
        if world.rank == self.rank and self.steps == self.step and not self.marker.exists():
            self.marker.write_text("killed\n")
            os.kill(os.getpid(), signal.SIGKILL)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class Drift:
    """Add ``amount`` to one weight of modality ``head``'s head on rank ``rank`` after the
    first task: state that differs across ranks, which ``train.check_ranks`` must catch."""

    across_ranks = "replicated"  # a false declaration

    def __init__(self, rank: int, head: str, amount: float) -> None:
        self.rank, self.head, self.amount = rank, head, amount

    def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        if distributed.current().rank == self.rank and strategy.experience_index == 0:
            with torch.no_grad():
                strategy.model.heads[self.head].weight[0, 0] += self.amount
