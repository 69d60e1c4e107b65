"""Distillation from the model as it was at the start of each task (the teacher).

``kd`` (Cappellazzo et al., Interspeech 2023), for class-incremental tasks: feature KD, the
mean squared error between student and teacher joint features, and prediction KD,
KL(teacher || student) over the old classes' logits at temperature τ, scaled by τ². Each acts
on the rehearsal rows only (weight α = sqrt(n_rehearsal / n_batch)) or on the whole batch
(α = log(1 + old classes / all classes)), as the paper weighs them, unless a weight is given.

``relation_kd`` (Co2L's instance-relation distillation, Cha et al. 2021, on cross-modal
pairs): the student's softmax over each row's similarities to the batch's partner embeddings
(both directions) is pulled to the teacher's, KL(teacher || student), on pairs the teacher
had learned: the current batch when both of its modalities were trained before, and every
replayed side batch.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from comodal.config import check_choice
from comodal.errors import ConfigError
from comodal.strategies.base import Strategy

SCOPES = ("rehearsal", "batch", "off")


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` in eval mode with no gradients: the teacher."""
    teacher = copy.deepcopy(model).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


class TeacherStrategy(Strategy):
    """Keeps ``teacher``, a frozen copy of the model taken at the start of each task after the
    first (``before_training``: before the classifier grows the task's classes)."""

    def __init__(self, config: object | None = None) -> None:
        super().__init__(config)
        self.teacher: torch.nn.Module | None = None

    def before_training(self, strategy: Any, **kwargs: Any) -> None:
        self.teacher = frozen_copy(strategy.model) if strategy.experience_index > 0 else None


def kl_distill(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(teacher / τ) || softmax(student / τ)) averaged over rows, times τ²."""
    log_p = F.log_softmax(student / temperature, dim=1)
    q = F.softmax(teacher / temperature, dim=1)
    return F.kl_div(log_p, q, reduction="batchmean") * temperature**2


@dataclass
class KDConfig:
    feature: str = "rehearsal"  # rehearsal | batch | off
    prediction: str = "rehearsal"
    temperature: float = 2.0
    feature_weight: float | None = None  # default: the α rule of the scope
    prediction_weight: float | None = None

    def __post_init__(self) -> None:
        check_choice("strategy_args.kd.feature", self.feature, SCOPES)
        check_choice("strategy_args.kd.prediction", self.prediction, SCOPES)
        if self.temperature <= 0:
            raise ConfigError(f"strategy_args.kd.temperature: must be > 0, got {self.temperature}")
        for field in ("feature_weight", "prediction_weight"):
            if (getattr(self, field) or 0) < 0:
                raise ConfigError(f"strategy_args.kd.{field}: must be >= 0, "
                                  f"got {getattr(self, field)}")

    @property
    def needs_buffer(self) -> bool:
        return "rehearsal" in (self.feature, self.prediction)


class KD(TeacherStrategy):
    name = "kd"
    Config = KDConfig
    kinds = ("classify",)

    def before_backward(self, strategy: Any, **kwargs: Any) -> None:
        if self.teacher is None:
            return
        batch, student = strategy.mbatch, strategy.mb_output
        rehearsal = batch.get("rehearsal")
        old = len(self.teacher.class_ids)
        with torch.no_grad():
            teacher = strategy.forward(batch, self.teacher)
        cfg = self.config
        for scope, weight, term in (
            (cfg.feature, cfg.feature_weight,
             lambda rows: F.mse_loss(student.features[rows], teacher.features[rows])),
            (cfg.prediction, cfg.prediction_weight,
             lambda rows: kl_distill(student.logits[rows, :old], teacher.logits[rows],
                                     cfg.temperature)),
        ):
            if scope == "off":
                continue
            if scope == "rehearsal":
                if rehearsal is None or not bool(rehearsal.any()):
                    continue
                rows = rehearsal
                alpha = math.sqrt(int(rows.sum()) / len(rows))
            else:
                rows = torch.ones(len(student.logits), dtype=torch.bool)
                alpha = math.log(1 + old / len(strategy.model.class_ids))
            strategy.loss = strategy.loss + (alpha if weight is None else weight) * term(rows)


@dataclass
class RelationKDConfig:
    weight: float = 1.0
    temperature: float = 0.1  # of both similarity softmaxes (cosine similarities / τ)

    def __post_init__(self) -> None:
        if self.weight < 0 or self.temperature <= 0:
            raise ConfigError("strategy_args.relation_kd: weight must be >= 0 and temperature "
                              f"> 0, got {self.weight} and {self.temperature}")


def relation_loss(student: tuple[torch.Tensor, torch.Tensor],
                  teacher: tuple[torch.Tensor, torch.Tensor], temperature: float) -> torch.Tensor:
    """Mean over both directions of KL(teacher || student) between row softmaxes of the
    cross-modal similarity matrices of a batch of normalised pair embeddings."""
    s = student[0] @ student[1].T / temperature
    t = teacher[0] @ teacher[1].T / temperature
    return (kl_distill(s, t, 1.0) + kl_distill(s.T, t.T, 1.0)) / 2


class RelationKD(TeacherStrategy):
    name = "relation_kd"
    Config = RelationKDConfig
    kinds = ("pair",)

    def __init__(self, config: RelationKDConfig | None = None) -> None:
        super().__init__(config)
        self.trained: set[str] = set()  # modalities some earlier task trained

    def before_backward(self, strategy: Any, **kwargs: Any) -> None:
        if self.teacher is None:
            return
        pairs = list(getattr(strategy, "replay_outputs", []))
        if all(m in self.trained for m in strategy.pair(strategy.mbatch)):
            pairs.append((strategy.mbatch, strategy.mb_output))
        terms = []
        for batch, student in pairs:
            with torch.no_grad():
                teacher = strategy.forward(batch, self.teacher)
            terms.append(relation_loss(student, teacher, self.config.temperature))
        if terms:
            strategy.loss = strategy.loss + self.config.weight * sum(terms) / len(terms)

    def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        self.trained.update(strategy.scenario.tasks[strategy.experience_index].modalities)

    def state_dict(self) -> dict[str, Any]:
        return {"trained": sorted(self.trained)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.trained = set(state["trained"])
