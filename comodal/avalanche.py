"""For Avalanche users with their own strategies: a comodal scenario as an Avalanche benchmark
with the model and criterion that read its batches.

``for_avalanche(config)`` prepares the config's scenario (frozen backbones through the feature
cache), and returns its ``benchmark`` (experiences with ``task_labels``,
``classes_in_this_experience``, datasets with ``targets`` and ``targets_task_labels``, batches
``[Batch, y, t]`` from the datasets' own collate function), the ``model`` (a
``MultimodalEncoder`` whose ``forward`` takes the batch dict; on a class-incremental stream
its classifier holds every class of the stream from the start, numbered in arrival order, as
Avalanche's fixed heads do) and the ``criterion`` (cross-entropy on logits, InfoNCE on pairs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from comodal.config import RunConfig
from comodal.core.data import Batch
from comodal.platform.avalanche_view import AvalancheCriterion
from comodal.platform.model import MultimodalEncoder
from comodal.scenarios.task import Scenario

__all__ = ["AvalancheCriterion", "Batch", "ForAvalanche", "for_avalanche"]


@dataclass
class ForAvalanche:
    """What a stock Avalanche strategy needs: ``benchmark``, ``model`` and ``criterion``."""

    benchmark: Any
    model: MultimodalEncoder
    criterion: AvalancheCriterion


def for_avalanche(config: RunConfig, scenario: Scenario | None = None) -> ForAvalanche:
    """The config's scenario (or ``scenario``) prepared for Avalanche's own strategies."""
    from comodal.build import check
    from comodal.platform.run import build_trainer
    from comodal.scenarios.registry import build_scenario

    check(config)
    trainer = build_trainer(config, plugins=[])
    trainer.setup(scenario if scenario is not None else build_scenario(config))
    trainer.grow_classes(range(len(trainer.scenario.tasks)))
    return ForAvalanche(trainer.benchmark, trainer.model, trainer._criterion)
