"""Learning-rate schedules within a task (``train.scheduler``), stepped once per optimizer
step: an optional linear warmup, then constant-step decay, a cosine down to ``min_lr`` or a
linear decay towards it.

Iteration ``i`` of a task (0-based, ``n = steps_per_epoch * epochs`` in all) trains at
``lr * (i + 1) / W`` during the ``W = round(warmup_epochs * steps_per_epoch)`` warmup
iterations; after them ``step`` multiplies ``lr`` by ``gamma`` every ``step_epochs`` epochs,
``cosine`` falls from ``lr`` to ``min_lr``, which the task's last iteration trains at, and
``linear`` trains iteration ``i`` at ``min_lr + (lr - min_lr) * (n - i) / (n - W)``: equal steps
from ``lr`` towards ``min_lr``, which it would reach one iteration after the task's last (with
``min_lr = 0`` and no warmup, the Hugging Face Trainer's linear schedule, which the CMCL code
trains with, a fresh one per task).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from comodal.config import SchedulerConfig


def build_scheduler(
    optimizer: torch.optim.Optimizer, config: SchedulerConfig, steps_per_epoch: int, epochs: int,
) -> torch.optim.lr_scheduler.LRScheduler | None:
    """The schedule of ``config`` over one task of ``epochs`` epochs of ``steps_per_epoch``
    optimizer steps, to be stepped after every optimizer step; None for ``none``."""
    if config.name == "none":
        return None
    total = steps_per_epoch * epochs
    warmup = round(config.warmup_epochs * steps_per_epoch)
    factors = [_factor(config, group.get("initial_lr", group["lr"]), total, warmup,
                       config.step_epochs * steps_per_epoch)
               for group in optimizer.param_groups]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factors)


def _factor(config: SchedulerConfig, base: float, total: int, warmup: int,
            step: int) -> Callable[[int], float]:
    """Iteration -> multiple of the group's ``base`` lr."""
    floor = config.min_lr / base if base else 0.0
    decay = max(1, total - 1 - warmup)  # iterations from the first after warmup to the last

    def factor(i: int) -> float:
        if i < warmup:
            return (i + 1) / warmup
        if config.name == "step":
            return config.gamma ** ((i - warmup) // max(1, step))
        if config.name == "linear":
            return floor + (1 - floor) * (total - i) / max(1, total - warmup)
        progress = min(1.0, (i - warmup) / decay)
        return floor + (1 - floor) * (1 + math.cos(math.pi * progress)) / 2

    return factor
