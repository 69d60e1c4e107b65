"""Distillation from the model as it was at the start of each task (the teacher, which the
trainer keeps for every plugin that sets ``uses_teacher``).

``kd`` (Cappellazzo et al., Interspeech 2023), for class-incremental tasks: feature KD, the
mean squared error between student and teacher features (by default, as in the paper, the
encoder's pooled output, the input of the projection head; ``feature_layer: joint`` the head's
output), and prediction KD,
KL(teacher || student) over the old classes' logits at temperature τ, scaled by τ². Each acts
on the rehearsal rows only (weight α = sqrt(n_rehearsal / n_batch)) or on the whole batch
(α = log(1 + old classes / all classes)), as the paper weighs them, unless a weight is given.
On sequence tasks prediction KD is token-level: the KL at temperature τ (times τ²) of the
decoder's teacher-forced token distributions, per target token that is not padding (the
paper's "token-level KD"); a decoder has no old-class rows, so there the whole-batch α is 1.

``relation_kd`` (Co2L's instance-relation distillation, Cha et al. 2021, on cross-modal
pairs): the student's softmax over each row's similarities to the batch's partner embeddings
(both directions) is pulled to the teacher's, KL(teacher || student), on pairs the teacher
had learned: batches (the current one, and replayed side batches) whose unordered modality
pair an earlier task trained. Two modalities each trained in other pairs are not such a pair.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from comodal.config import check_choice
from comodal.errors import ConfigError
from comodal.platform import distributed
from comodal.platform.losses import FeatureDistill, PredictionDistill, RelationDistill
from comodal.platform.model import SequenceOutput
from comodal.platform.sequences import PAD
from comodal.strategies.base import Strategy

SCOPES = ("rehearsal", "batch", "off")
LAYERS = ("auto", "encoder", "joint")


def catch_input(module: torch.nn.Module, caught: list[torch.Tensor]) -> None:
    """Append ``module``'s input at its next call to ``caught``, once."""
    def hook(mod: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        caught.append(inputs[0])
        handle.remove()

    handle = module.register_forward_pre_hook(hook)


@dataclass
class KDConfig:
    feature: str = "rehearsal"  # rehearsal | batch | off
    prediction: str = "rehearsal"
    temperature: float = 2.0
    feature_weight: float | None = None  # default: the α rule of the scope
    prediction_weight: float | None = None
    # encoder: the trained encoder's pooled output (the paper's); joint: the head's output;
    # auto: encoder where the classified modality's encoder is trained, joint on frozen features
    feature_layer: str = "auto"

    def __post_init__(self) -> None:
        check_choice("strategy_args.kd.feature", self.feature, SCOPES)
        check_choice("strategy_args.kd.prediction", self.prediction, SCOPES)
        check_choice("strategy_args.kd.feature_layer", self.feature_layer, LAYERS)
        if self.temperature <= 0:
            raise ConfigError(f"strategy_args.kd.temperature: must be > 0, got {self.temperature}")
        for field in ("feature_weight", "prediction_weight"):
            if (getattr(self, field) or 0) < 0:
                raise ConfigError(f"strategy_args.kd.{field}: must be >= 0, "
                                  f"got {getattr(self, field)}")

    @property
    def needs_buffer(self) -> bool:
        return "rehearsal" in (self.feature, self.prediction)


class KD(Strategy):
    name = "kd"
    across_ranks = "replicated"
    Config = KDConfig
    kinds = ("classify", "sequence")
    uses_teacher = True

    def __init__(self, config: KDConfig | None = None) -> None:
        super().__init__(config)
        self.layer = self.config.feature_layer  # auto is resolved at each task's start
        self.feature_loss = FeatureDistill()
        self.prediction_loss = PredictionDistill(self.config.temperature)
        self._caught: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])
        self._caught_batch: Any = None  # the batch whose teacher features ``_caught`` holds

    def before_training(self, strategy: Any, **kwargs: Any) -> None:
        cfg, m = self.config, strategy.scenario.tasks[strategy.experience_index].modalities[0]
        trained = m in strategy.model.encoders
        if cfg.feature_layer == "encoder" and cfg.feature != "off" and not trained:
            raise ConfigError(f"strategy_args.kd.feature_layer: 'encoder' distils a trained "
                              f"encoder's output, and {m!r} has a frozen backbone whose cached "
                              "features never change (use feature_layer: joint or auto)")
        if cfg.feature_layer == "auto":
            self.layer = "encoder" if trained else "joint"

    def before_forward(self, strategy: Any, **kwargs: Any) -> None:
        """Catch the pooled encoder outputs as the heads read them, the student's in the
        training forward and the teacher's in its shared one, so that no encoder runs twice.
        The teacher runs once per batch (its output is kept), so when the step's loss is
        computed again (``cflat``) its caught features are kept too."""
        if strategy.teacher is not None and self.config.feature != "off" \
                and self.layer == "encoder":
            m = strategy.pair(strategy.mbatch)[0]
            student, teacher = [], self._caught[1]
            catch_input(strategy.model.heads[m], student)
            if self._caught_batch is not strategy.mbatch:
                teacher = []
                catch_input(strategy.teacher.heads[m], teacher)
                self._caught_batch = strategy.mbatch
            self._caught = (student, teacher)

    def distilled(self, strategy: Any) -> tuple[torch.Tensor, Any]:
        """The student's features to distil, and the teacher's output with ``features`` of the
        same layer."""
        teacher = strategy.teacher_output(strategy.mbatch)
        if self.layer != "encoder" or self.config.feature == "off":
            return strategy.outputs.features, teacher
        student, caught = self._caught
        n = len(strategy.mbatch)  # under torchrun each rank's heads saw its share of the rows
        return (distributed.gather_rows(student[0], n),
                teacher._replace(features=distributed.gather_rows(caught[0], n)))

    def before_backward(self, strategy: Any, **kwargs: Any) -> None:
        if strategy.teacher is None:
            return
        batch, student = strategy.mbatch, strategy.outputs
        rehearsal = batch.get("rehearsal")
        old = len(strategy.teacher.class_ids)
        features, teacher = self.distilled(strategy)
        cfg = self.config

        def prediction(rows: torch.Tensor) -> torch.Tensor:
            if not isinstance(student, SequenceOutput):
                return self.prediction_loss(student.logits[rows, :old], teacher.logits[rows])
            tokens = batch["tokens"][rows, 1:] != PAD  # the target tokens, not the padding
            return self.prediction_loss(student.logits[rows][tokens],
                                        teacher.logits[rows][tokens])

        for scope, weight, term in (
            (cfg.feature, cfg.feature_weight,
             lambda rows: self.feature_loss(features[rows], teacher.features[rows])),
            (cfg.prediction, cfg.prediction_weight, prediction),
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
                alpha = (1.0 if isinstance(student, SequenceOutput)
                         else math.log(1 + old / len(strategy.model.class_ids)))
            strategy.loss = strategy.loss + (alpha if weight is None else weight) * term(rows)

    def results(self) -> dict[str, Any]:
        cfg = self.config
        return {"feature": cfg.feature, "feature_layer": self.layer,
                "prediction": cfg.prediction, "temperature": cfg.temperature,
                "feature_weight": cfg.feature_weight, "prediction_weight": cfg.prediction_weight}


@dataclass
class RelationKDConfig:
    weight: float = 1.0
    # of both similarity softmaxes (the model's scores / τ: cosine similarities, or raw dot
    # products under model.score: dot)
    temperature: float = 0.1

    def __post_init__(self) -> None:
        if self.weight < 0 or self.temperature <= 0:
            raise ConfigError("strategy_args.relation_kd: weight must be >= 0 and temperature "
                              f"> 0, got {self.weight} and {self.temperature}")


class RelationKD(Strategy):
    name = "relation_kd"
    across_ranks = "replicated"
    Config = RelationKDConfig
    kinds = ("pair",)
    uses_teacher = True

    def __init__(self, config: RelationKDConfig | None = None) -> None:
        super().__init__(config)
        self.trained: set[frozenset[str]] = set()  # unordered pairs some earlier task trained
        self.relation = RelationDistill(self.config.temperature)

    def before_backward(self, strategy: Any, **kwargs: Any) -> None:
        if strategy.teacher is None:
            return
        terms = [self.relation(student, strategy.teacher_output(batch))
                 for batch, student in [*strategy.side_outputs, (strategy.mbatch, strategy.outputs)]
                 if frozenset(strategy.pair(batch)) in self.trained]
        if terms:
            strategy.loss = strategy.loss + self.config.weight * sum(terms) / len(terms)

    def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        self.trained.add(frozenset(strategy.scenario.tasks[strategy.experience_index].modalities))

    def state_dict(self) -> dict[str, Any]:
        return {"trained_pairs": sorted(sorted(pair) for pair in self.trained)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.trained = {frozenset(pair) for pair in state["trained_pairs"]}
