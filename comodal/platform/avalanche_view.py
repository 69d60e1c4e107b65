"""What stock Avalanche plugins need of comodal beyond the trainer's attributes: the criterion
they call on the model's output (``strategy._criterion(model(x), y)``), and the plugins that
cannot apply to a stream, refused before training with the reason."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from comodal._avalanche import (
    AccuracyPluginMetric,
    EarlyStoppingPlugin,
    EvaluationPlugin,
    ExperienceForgetting,
    GDumbPlugin,
    LRSchedulerPlugin,
    LwFPlugin,
    ReplayPlugin,
    StreamForgetting,
)
from comodal.config import EvalConfig, TrainConfig
from comodal.errors import ConfigError


class AvalancheCriterion(nn.Module):
    """The task loss of a model output and Avalanche targets, as a plugin computes it on its
    own batches (AGEM's and GEM's memories, EWC's Fisher):

    - logits ``[B, C]`` and classifier rows: cross-entropy over the rows whose class has a
      classifier row (targets -1, classes not learned yet, are left out; 0 if none has one);
    - a pair output ``[B, 2, D]`` and task indices: InfoNCE (``infonce``) between the two
      embeddings as the model scores them (``model.scored``) within each task's rows,
      weighted by its share of the rows (a memory batch may mix tasks; the negatives stay each
      task's own);
    - a sequence task's token logits ``[B, L, V]`` and target tokens ``[B, L]``: the decoder's
      teacher-forced cross-entropy over the tokens that are not padding.

    ``model()`` gives the model whose logit scale InfoNCE uses (the trainer's may be replaced)."""

    def __init__(self, model: Callable[[], nn.Module], infonce: nn.Module) -> None:
        super().__init__()
        self.model, self.infonce = model, infonce

    def forward(self, output: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if targets.dim() == 2:  # a sequence task's token logits [B, L, V] and targets [B, L]
            return self.model().decoder.loss(output, targets)
        if output.dim() == 2:
            known = targets >= 0
            if not bool(known.all()):
                if not bool(known.any()):
                    return output.new_zeros(())
                output, targets = output[known], targets[known]
            return F.cross_entropy(output, targets)
        model = self.model()
        scale, z = model.scale, model.scored(output)
        tasks = targets.unique()
        if len(tasks) == 1:
            return self.infonce(z[:, 0], z[:, 1], scale)
        return sum((targets == t).float().mean()
                   * self.infonce(z[targets == t, 0], z[targets == t, 1], scale)
                   for t in tasks)


def is_evaluator(plugin: Any) -> bool:
    return isinstance(plugin, EvaluationPlugin)


# (plugin class, task kind it cannot apply to, why)
_REFUSED = (
    (LwFPlugin, "pair", "it distils class logits over the classes seen so far, and pair "
                        "tasks have a contrastive loss and no class logits (use comodal's "
                        "relation_kd)"),
    (ReplayPlugin, "pair", "its loader joins memory rows of earlier tasks into one training "
                           "batch, and tasks of different modality pairs cannot share a "
                           "contrastive batch (use comodal's er, which keeps side batches)"),
    (GDumbPlugin, "pair", "it balances its buffer by class, and pair tasks have no classes "
                          "(use comodal's er with policy: experience)"),
)


def check_plugins(plugins: Sequence[Any], scenario: Any, evaluator: Any,
                  train: TrainConfig, evaluation: EvalConfig) -> None:
    """Refuse, before training, a stock plugin that cannot apply to the scenario's tasks."""
    kinds = {task.kind for task in scenario.tasks}
    for i, plugin in enumerate(plugins):
        name = type(plugin).__name__
        for cls, kind, why in _REFUSED:
            if isinstance(plugin, cls) and kind in kinds:
                raise ConfigError(f"plugin {i} ({name}) cannot run on {kind} tasks: {why}")
        if isinstance(plugin, EarlyStoppingPlugin) and (evaluator is None
                                                        or not evaluation.every_epochs):
            raise ConfigError(f"plugin {i} ({name}) stops on a metric the evaluator reports "
                              "during training: attach an EvaluationPlugin with that metric "
                              "and set eval.every_epochs (e.g. 1), whose evaluations of the "
                              "test stream ('test_stream') it then reads")
        if isinstance(plugin, LRSchedulerPlugin) and train.scheduler.name != "none":
            raise ConfigError(f"plugin {i} ({name}) and train.scheduler "
                              f"({train.scheduler.name}) would both set the learning rate: "
                              "keep one of them")
    unscored = {"pair": "their output is two embeddings", "sequence": "their output is token "
                "logits, decoded into strings that comodal scores (intent accuracy, WER)"}
    for kind in sorted(kinds & unscored.keys()):
        for metric in getattr(evaluator, "metrics", []):
            if isinstance(metric, (AccuracyPluginMetric, ExperienceForgetting,
                                   StreamForgetting)):
                raise ConfigError(f"EvaluationPlugin metric {metric} scores class predictions, "
                                  f"and {kind} tasks have none ({unscored[kind]}): use loss "
                                  "metrics, and comodal's own metrics")
