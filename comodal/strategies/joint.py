"""``joint``: all tasks' training data at once, the upper bound.

At the first task the trainer's loader is replaced by one that interleaves every task's
batches; later tasks train nothing, so each later row of the metric matrix re-evaluates the
jointly trained model.
"""

from __future__ import annotations

from typing import Any

from comodal.strategies.base import Strategy


class Joint(Strategy):
    name = "joint"

    def before_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        if strategy.experience_index == 0:
            every = range(len(strategy.scenario.tasks))
            strategy.dataloader = strategy.make_loader(every)
            strategy.grow_classes(every)  # every class from the start, so the optimizer
            strategy.optimizer = strategy.make_optimizer()  # must cover the grown classifier
        else:
            strategy.dataloader = []
