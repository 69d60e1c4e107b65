"""``coconut`` (Cappellazzo et al., "Continual Contrastive Spoken Language Understanding",
ACL Findings 2024): experience replay plus two losses, for class-incremental tasks.

- NSPT, the supervised contrastive loss with the rehearsal rows as anchors, positives from the
  teacher (the model at the task's start), negatives from the student (``NSPT`` in
  ``comodal.platform.losses``; ``negatives: teacher`` is the NTPT ablation);
- MM, InfoNCE between each utterance's embedding and its transcript's (the task's second
  modality), over the whole batch (``MM`` there), scored as the model scores pairs
  (``model.score``: cosine, or raw dot products). NSPT and the classifier keep unit-norm
  features under either score.

On sequence tasks (COCONUT's own encoder-decoder setting) the transcript side of MM is the
decoder's token embeddings of the target's transcription, mean-pooled and mapped into the joint
space (``model.transcript_head``), not a separate text network.

Total: task loss + λ₁·NSPT + λ₂·MM (``nspt_weight``, ``mm_weight``). The teacher is the
trainer's, shared with ``kd``; it needs no checkpointing: it is the model as saved at the end
of the previous task.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from comodal.config import check_choice
from comodal.errors import ConfigError
from comodal.platform.encoders import masked_mean
from comodal.platform.losses import MM, NSPT
from comodal.strategies.replay import ER, ERConfig


@dataclass
class COCONUTConfig(ERConfig):
    nspt_weight: float = 1.0  # λ₁
    mm_weight: float = 1.0  # λ₂
    temperature: float = 0.1  # of NSPT
    negatives: str = "student"  # student (NSPT) | teacher (NTPT)

    strategy = "coconut"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("strategy_args.coconut.negatives", self.negatives, ("student", "teacher"))
        if self.temperature <= 0 or min(self.nspt_weight, self.mm_weight) < 0:
            raise ConfigError("strategy_args.coconut: temperature must be > 0 and the weights "
                              f">= 0, got {self.temperature}, {self.nspt_weight}, "
                              f"{self.mm_weight}")


class COCONUT(ER):
    name = "coconut"
    Config = COCONUTConfig
    kinds = ("classify", "sequence")
    uses_teacher = True

    def __init__(self, config: COCONUTConfig | None = None) -> None:
        super().__init__(config)
        self.nspt = NSPT(self.config.temperature, self.config.negatives)
        self.mm: MM | None = None  # symmetric as the trainer's task loss, set at each task

    def before_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        task = strategy.scenario.tasks[strategy.experience_index]
        if self.config.mm_weight and task.kind == "classify" and len(task.modalities) < 2:
            raise ConfigError(f"strategy coconut: the MM loss needs a transcript modality, but "
                              f"task {task.name!r} names only {task.modalities[0]!r} (add one "
                              "to scenario.class_incremental.modalities or set "
                              "strategy_args.coconut.mm_weight: 0)")
        self.mm = MM(strategy.criterion.symmetric, normalize=strategy.model.normalizes)
        super().before_training_exp(strategy, **kwargs)

    def before_backward(self, strategy: Any, **kwargs: Any) -> None:
        super().before_backward(strategy, **kwargs)
        batch, out, cfg = strategy.mbatch, strategy.outputs, self.config
        rehearsal = batch.get("rehearsal")
        if strategy.teacher is not None and rehearsal is not None and cfg.nspt_weight:
            teacher = strategy.teacher_output(batch)
            loss = self.nspt(out.features, teacher.features, batch["label"], rehearsal)
            strategy.loss = strategy.loss + cfg.nspt_weight * loss
        if not cfg.mm_weight:
            return
        modalities, model = strategy.pair(batch), strategy.model
        if batch.kind == "sequence":
            tokens = batch["tokens"]
            pooled = masked_mean(model.decoder.token_embeddings(tokens),
                                 strategy.tokenizer.transcript_mask(tokens))
            text = model.scored(model.transcript_head(pooled))
        elif len(modalities) == 2:
            text = model.encode(batch, modalities[1])
        else:
            return
        mm = self.mm(out.features, text, model.scale)
        strategy.loss = strategy.loss + cfg.mm_weight * mm
