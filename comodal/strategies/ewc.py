"""``ewc``: elastic weight consolidation (Kirkpatrick et al., PNAS 2017).

After each task the diagonal empirical Fisher of the task's own loss is taken at the final
parameters θ*; later tasks add λ/2 Σ F (θ - θ*)². Avalanche's ``EWCPlugin`` computes its
Fisher with ``x, y, t = batch[0], batch[1], batch[-1]`` and ``criterion(out, y)``, which a dict
batch of modality pairs with a contrastive loss does not fit, so the Fisher is taken here from
the trainer's own loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from comodal.config import check_choice
from comodal.errors import ConfigError
from comodal.strategies.base import Strategy

EWC_MODES = ("separate", "online")


@dataclass
class EWCConfig:
    ewc_lambda: float = 1e5  # chosen on synth-pairs (examples/projection_study.py sweep)
    mode: str = "separate"  # separate: one penalty per past task; online: one decayed penalty
    decay_factor: float = 1.0  # online mode: old importance is multiplied by this per task

    def __post_init__(self) -> None:
        check_choice("strategy_args.ewc.mode", self.mode, EWC_MODES)
        if self.ewc_lambda < 0:
            raise ConfigError(f"strategy_args.ewc.ewc_lambda: must be >= 0, got {self.ewc_lambda}")


class EWC(Strategy):
    name = "ewc"
    across_ranks = "reduced"  # each Fisher batch's gradient averaged over ranks
    Config = EWCConfig
    kinds = ("pair",)  # a growing classifier changes parameter shapes under the anchors

    def __init__(self, config: EWCConfig | None = None) -> None:
        super().__init__(config)
        self.anchors: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = []  # (θ*, F)

    def penalty(self, model: torch.nn.Module) -> torch.Tensor:
        total = torch.zeros(())
        params = dict(model.named_parameters())
        for anchor in self.anchors:
            for name, (theta, fisher) in anchor.items():
                total = total + (fisher * (params[name] - theta) ** 2).sum()
        return self.config.ewc_lambda / 2 * total

    def before_backward(self, strategy: Any, **kwargs: Any) -> None:
        if self.anchors:
            strategy.loss = strategy.loss + self.penalty(strategy.model)

    def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        index = strategy.experience_index
        pair = strategy.scenario.tasks[index].modalities
        model = strategy.model
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        fisher = {n: torch.zeros_like(p) for n, p in params.items()}
        rows = 0
        # batches of the training size, so the loss (and its negatives) is the one trained; in
        # eval mode, so that batch-norm running statistics do not move
        for batch in strategy.statistics_pass(index, strategy.train_mb_size):
            n = len(batch["index"])
            model.zero_grad(set_to_none=True)
            za, zb = (model.encode(batch, m) for m in pair)
            strategy.criterion(za, zb, model.scale).backward()
            strategy.reduce_gradients()  # under torchrun: the whole batch's gradient
            for name, p in params.items():
                if p.grad is not None:
                    fisher[name] += n * p.grad.detach() ** 2  # a short last batch counts less
            rows += n
        model.zero_grad(set_to_none=True)
        anchor = {n: (p.detach().clone(), fisher[n] / max(rows, 1))
                  for n, p in params.items() if fisher[n].any()}
        if self.config.mode == "online" and self.anchors:
            (old,) = self.anchors
            for name, (_, f_old) in old.items():
                theta, f_new = anchor.get(name, (params[name].detach().clone(), 0.0))
                anchor[name] = (theta, self.config.decay_factor * f_old + f_new)
            self.anchors = [anchor]
        else:
            self.anchors.append(anchor)

    def state_dict(self) -> dict[str, Any]:
        return {"anchors": self.anchors}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.anchors = state["anchors"]
