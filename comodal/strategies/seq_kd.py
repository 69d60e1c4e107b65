"""``seq_kd``: sequence-level knowledge distillation (Cappellazzo et al., "Sequence-Level
Knowledge Distillation for Class-Incremental End-to-End Spoken Language Understanding",
Interspeech 2023; Kim & Rush 2016), for sequence tasks.

At each task's start the teacher (the model as the previous task left it) beam-decodes every
rehearsal row in the stack's replay buffer; those decoded sequences are the rows' pseudo-targets.
Whenever a rehearsal row joins a training batch, the student is also trained on its
pseudo-target with the teacher-forced cross-entropy, beside the row's true target:

  L = task loss + λ · CE(student | pseudo-targets of the batch's rehearsal rows)

The pseudo-targets are decoded once per task from the model the task's checkpoint holds, so a
resumed run decodes the same ones and they need no checkpointing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from comodal.errors import ConfigError
from comodal.platform.sequences import PAD
from comodal.strategies.base import Strategy
from comodal.strategies.replay import memory_batches


@dataclass
class SeqKDConfig:
    weight: float = 1.0  # λ
    beam_width: int = 0  # of the teacher's decoding; 0: model.decoder.beam_width

    def __post_init__(self) -> None:
        if self.weight < 0 or self.beam_width < 0:
            raise ConfigError("strategy_args.seq_kd: weight and beam_width must be >= 0, "
                              f"got {self.weight} and {self.beam_width}")


class SeqKD(Strategy):
    name = "seq_kd"
    across_ranks = "replicated"  # the teacher and the buffer are the same on every rank
    Config = SeqKDConfig
    kinds = ("sequence",)
    uses_teacher = True

    def __init__(self, config: SeqKDConfig | None = None) -> None:
        super().__init__(config)
        self.pseudo: torch.Tensor | None = None  # [buffer slots, L] token ids of this task

    @torch.no_grad()
    def before_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        """The teacher's decoding of every buffer slot, in slot order."""
        self.pseudo = None
        owners = [p for p in strategy.plugins if getattr(p, "owns_buffer", False)]
        buffer = owners[0].buffer if owners else None
        if strategy.teacher is None or buffer is None or not len(buffer):
            return
        decoded = [(slots, strategy.decode(batch, strategy.teacher, self.config.beam_width))
                   for slots, batch in memory_batches(strategy, buffer,
                                                      torch.arange(len(buffer)))]
        width = max(ids.shape[1] for _, ids in decoded)
        self.pseudo = torch.full((len(buffer), width), PAD, dtype=torch.long,
                                 device=strategy.device)
        for slots, ids in decoded:
            self.pseudo[slots] = F.pad(ids, (0, width - ids.shape[1]), value=PAD)

    def before_backward(self, strategy: Any, **kwargs: Any) -> None:
        batch = strategy.mbatch
        slots = batch.get("slots")
        if self.pseudo is None or slots is None or not len(slots) or not self.config.weight:
            return
        rows = batch["rehearsal"].to(strategy.device)
        targets = self.pseudo[slots.to(strategy.device)]
        memory, valid = strategy.outputs.memory
        _, loss = strategy.model.decoder.teacher_forced(memory[rows], valid[rows], targets)
        strategy.loss = strategy.loss + self.config.weight * loss

    def results(self) -> dict[str, Any]:
        return {"weight": self.config.weight, "beam_width": self.config.beam_width}
