"""``co2l`` (Cha, Lee & Shin, "Co2L: Contrastive Continual Learning", ICCV 2021): experience
replay with an asymmetric contrastive loss and instance-wise relation distillation (IRD),

  L = L_asym + λ · L_IRD                                       (λ: ``ird_weight``, 1 in the paper)

adapted from supervised contrastive learning on images to cross-modal pair tasks:

- L_asym replaces the pair task loss (the trainer's ``pair_loss`` hook). Memory rows of the
  current modality pair join the batch (``er``'s loader, ``batch["rehearsal"]``); as Co2L's
  anchors are the current task's samples only, only the current rows are anchors here: for
  anchor i the positive is its partner b_i and the candidates are every row's partner, memory
  rows' included (``AsymmetricInfoNCE``, logits = the model's scores times ``model.scale``,
  both directions when ``train.loss.symmetric``). Without memory rows it is the trainer's
  InfoNCE exactly. It is averaged over the anchors (the paper sums over them; its code divides
  by every row of the batch, memory rows counting zero). Memory rows of other modality pairs
  come as side batches; having no current rows they have no anchors, so L_asym takes nothing
  from them (and, unlike ``er``, their own task loss is not added either).
- L_IRD: each row's softmax over its similarities to the batch's partners (both directions),
  the student's at κ (``student_temperature``, 0.2 in the paper and its code) pulled to the
  teacher's (the model at the task's start) at κ* (``teacher_temperature``, 0.01), as
  KL(teacher || student) (``RelationDistill``; Co2L's cross-entropy minus the teacher's
  entropy, which has no gradient). A row's partner is among its candidates: across modalities
  it is not the row itself, which Co2L's single-modality form leaves out. It acts on every
  batch whose unordered modality pair an earlier task trained (the batch with its memory rows,
  and each side batch), averaged over their rows; on a pair new to the model the teacher's
  relations were never trained, and there is nothing to keep.

Class-incremental ``classify`` tasks are refused: Co2L learns the representation only and
classifies by a linear classifier trained afterwards on the buffer, while comodal's classify
tasks train a cross-entropy classifier with the representation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from comodal.errors import ConfigError
from comodal.platform.losses import AsymmetricInfoNCE, RelationDistill
from comodal.strategies.buffers import BufferConfig
from comodal.strategies.replay import ER


@dataclass
class Co2LConfig(BufferConfig):
    batch_size: int = 0  # memory rows per step; 0: the training batch size
    ird_weight: float = 1.0  # λ
    student_temperature: float = 0.2  # κ
    teacher_temperature: float = 0.01  # κ*

    strategy = "co2l"  # the name in error messages (a class attribute, not a config field)

    def __post_init__(self) -> None:
        where = f"strategy_args.{self.strategy}"
        self.check(where)
        if self.batch_size < 0 or self.ird_weight < 0:
            raise ConfigError(f"{where}: batch_size and ird_weight must be >= 0, got "
                              f"{self.batch_size} and {self.ird_weight}")
        if min(self.student_temperature, self.teacher_temperature) <= 0:
            raise ConfigError(f"{where}: student_temperature and teacher_temperature must be "
                              f"> 0, got {self.student_temperature} and "
                              f"{self.teacher_temperature}")


class Co2L(ER):
    name = "co2l"
    Config = Co2LConfig
    kinds = ("pair",)
    uses_teacher = True

    def __init__(self, config: Co2LConfig | None = None) -> None:
        super().__init__(config)
        self.relation = RelationDistill(self.config.student_temperature,
                                        self.config.teacher_temperature)
        self.weight = self.config.ird_weight  # λ of the current task
        self.contrastive: AsymmetricInfoNCE | None = None  # symmetric as the trainer's loss

    def before_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        self.contrastive = AsymmetricInfoNCE(strategy.criterion.symmetric)
        super().before_training_exp(strategy, **kwargs)

    def pair_loss(self, trainer: Any, batch: dict[str, Any], output: Any) -> torch.Tensor:
        """L_asym of a pair batch: its memory rows (``batch["rehearsal"]``) are no anchors."""
        rehearsal = batch.get("rehearsal")
        return self.contrastive(*output, trainer.model.scale,
                                None if rehearsal is None else ~rehearsal)

    def ird(self, strategy: Any) -> torch.Tensor | None:
        """L_IRD over the step's batches whose pair an earlier task trained, averaged over
        their rows; None before there is a teacher or without such a batch."""
        if strategy.teacher is None:
            return None
        tasks = strategy.scenario.tasks
        trained = {frozenset(t.modalities) for t in tasks[:strategy.experience_index]}
        # the main batch last, so that its teacher output stays cached for other strategies
        batches = [(batch, out)
                   for batch, out in [*strategy.side_outputs, (strategy.mbatch, strategy.outputs)]
                   if frozenset(strategy.pair(batch)) in trained]
        if not batches:
            return None
        rows = sum(len(batch["index"]) for batch, _ in batches)
        return sum(len(batch["index"]) / rows * self.relation(out, strategy.teacher_output(batch))
                   for batch, out in batches)

    def before_backward(self, strategy: Any, **kwargs: Any) -> None:
        """λ · L_IRD; side batches add no task loss (``er`` would add theirs)."""
        ird = self.ird(strategy)
        if ird is not None:
            strategy.loss = strategy.loss + self.weight * ird

    def results(self) -> dict[str, Any]:
        cfg = self.config
        return {**super().results(), "ird_weight": cfg.ird_weight,
                "student_temperature": cfg.student_temperature,
                "teacher_temperature": cfg.teacher_temperature}
