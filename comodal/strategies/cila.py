"""``cila`` (Wen, Tan, Zheng, Xie & Huang, "Provable Contrastive Continual Learning", ICML
2024): ``co2l``'s losses, L_asym + λ_t · L_IRD, with the distillation weight of task t set
from the losses of the tasks before it (their Algorithm 1, CILA):

  λ_t = max(λ_min, κ · Σ_{j<t} avg L_IRD(j) / Σ_{j<t} avg L_asym(j))

over the earlier tasks j that trained with distillation, avg being the mean of a loss over the
steps of task j's training: the paper's "ratio between average distillation losses and average
contrastive losses from previous tasks" (``balance``: κ, 1 by default, its value in the paper's
runs not confirmed here; ``min_weight``: λ_min, an optional floor, 0 by default, so the weight
is the ratio itself: with a floor of 1, Co2L's weight, the ratio, which stays below 1 on the
synth streams, never shows). Their bound weighs each task's distillation against its
contrastive loss, and the ratio of the two measured so far sets the next weight. The first task
trains no distillation (no teacher); the first task with a teacher, having no earlier
distillation loss, uses ``ird_weight`` (λ₂ = 1 in the paper, Co2L's weight). Pair tasks only,
as ``co2l``; the losses, their adaptation to pairs and what the side batches add are
``co2l``'s.

Each task accumulates the sums of its steps' L_asym and L_IRD (float64, detached; the values
of the step's first loss pass when a strategy such as ``cflat`` recomputes it at perturbed
weights) and their counts; a step with no batch to distil adds to L_asym only. L_IRD is
``co2l``'s KL form, the paper's cross-entropy less the teacher's entropy (near 0 at κ* = 0.01).
Every task's averages and weight are kept for checkpoints and reported by ``results()``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from comodal.errors import ConfigError
from comodal.strategies.co2l import Co2L, Co2LConfig


@dataclass
class CILAConfig(Co2LConfig):
    balance: float = 1.0  # κ, the paper's balance coefficient
    min_weight: float = 0.0  # λ_min, a lower bound of λ_t (0: the ratio itself)

    strategy = "cila"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.balance <= 0 or self.min_weight < 0:
            raise ConfigError(f"strategy_args.cila: balance must be > 0 and min_weight >= 0, "
                              f"got {self.balance} and {self.min_weight}")


class CILA(Co2L):
    name = "cila"
    Config = CILAConfig

    def __init__(self, config: CILAConfig | None = None) -> None:
        super().__init__(config)
        # per trained task: {"task", "contrastive", "distill" (None without distillation),
        # "weight" (None without a teacher)}
        self.records: list[dict[str, Any]] = []
        self._sums: torch.Tensor | None = None  # the task's [Σ L_asym, Σ L_IRD], float64
        self._counts = [0, 0]
        self._contrastive: torch.Tensor | None = None  # the last L_asym of the main batch
        self._step: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def adaptive_weight(self) -> float:
        """λ for the next task from the records: κ times the ratio of the summed average
        distillation and contrastive losses, at least λ_min; ``ird_weight`` before any
        task trained distillation."""
        distilled = [r for r in self.records if r["distill"] is not None]
        if not distilled:
            return self.config.ird_weight
        ratio = sum(r["distill"] for r in distilled) / sum(r["contrastive"] for r in distilled)
        return max(self.config.min_weight, self.config.balance * ratio)

    def before_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        super().before_training_exp(strategy, **kwargs)
        self.weight = self.adaptive_weight()
        self._sums = torch.zeros(2, dtype=torch.float64, device=strategy.device)
        self._counts = [0, 0]

    def pair_loss(self, trainer: Any, batch: dict[str, Any], output: Any) -> torch.Tensor:
        loss = super().pair_loss(trainer, batch, output)
        self._contrastive = loss.detach()
        return loss

    def ird(self, strategy: Any) -> torch.Tensor | None:
        loss = super().ird(strategy)
        if self._step is None and self._contrastive is not None:
            self._step = (self._contrastive, None if loss is None else loss.detach())
        return loss

    def after_training_iteration(self, strategy: Any, **kwargs: Any) -> None:
        """Add the step's losses to the task's sums (on the device: no synchronisation)."""
        if self._step is not None:
            contrastive, distill = self._step
            self._sums[0] += contrastive.double()
            self._counts[0] += 1
            if distill is not None:
                self._sums[1] += distill.double()
                self._counts[1] += 1
        self._step = self._contrastive = None

    def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        super().after_training_exp(strategy, **kwargs)
        (contrastive, distill), (n_con, n_dis) = self._sums.tolist(), self._counts
        self.records.append({
            "task": strategy.experience_index,
            "contrastive": contrastive / n_con if n_con else None,
            "distill": distill / n_dis if n_dis else None,
            "weight": self.weight if strategy.teacher is not None else None,
        })

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "records": self.records}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        state = dict(state)
        self.records = state.pop("records")
        super().load_state_dict(state)

    def results(self) -> dict[str, Any]:
        return {**super().results(), "balance": self.config.balance,
                "min_weight": self.config.min_weight,
                "weights": [r["weight"] for r in self.records],
                "contrastive": [r["contrastive"] for r in self.records],
                "distill": [r["distill"] for r in self.records]}
