"""``gpm``: gradient projection memory (Saha et al., ICLR 2021), one-sided, per linear layer.

After each task, every linear layer the task used keeps a basis U of its input
representations: directions are added from what the old basis does not explain until the
retained energy reaches the task's threshold (which grows along the stream). Each step the
gradient loses its component in span(U): G <- G - G U Uᵀ, so outputs on old inputs stay put.
This protects only the input side, the natural baseline for the dual-sided ``dns``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from comodal.config import check_choice
from comodal.errors import ConfigError
from comodal.strategies.projecting import MODES, ProjectingStrategy
from comodal.strategies.projection import input_moments, linear_layers, subtract_input_


@dataclass
class GPMConfig:
    # Saha et al. start at 0.97 and add 0.003 per task; on synth-pairs a flat 0.999 kept the
    # most (examples/projection_study.py sweep; examples/README.md)
    threshold: float = 0.999  # retained energy for the first task
    threshold_step: float = 0.0  # added per later task
    max_threshold: float = 0.9999
    layers: list[str] | None = None  # qualified names of nn.Linear modules; default every one
    mode: str = "update"  # grad: project G (Saha et al. use SGD); update: project the step

    def __post_init__(self) -> None:
        check_choice("strategy_args.gpm.mode", self.mode, MODES)
        for field in ("threshold", "max_threshold"):
            if not 0 < getattr(self, field) <= 1:
                raise ConfigError(f"strategy_args.gpm.{field}: must be in (0, 1], "
                                  f"got {getattr(self, field)}")


def grow_basis(basis: torch.Tensor | None, moment: torch.Tensor, threshold: float) -> torch.Tensor:
    """Saha et al.'s update on a second moment M: keep the old basis U, and add the leading
    eigenvectors of (I - UUᵀ) M (I - UUᵀ) until (energy in U + added) / trace(M) >= threshold."""
    total = moment.trace().double()
    if basis is None:
        basis = moment.new_zeros(moment.shape[0], 0)
    explained = (basis.T @ moment @ basis).trace().double()
    if total <= 0 or explained / total >= threshold:
        return basis
    rest = moment - basis @ (basis.T @ moment)
    rest = rest - (rest @ basis) @ basis.T
    eigenvalues, eigenvectors = torch.linalg.eigh(rest.double())
    order = eigenvalues.argsort(descending=True)
    lam = eigenvalues[order].clamp(min=0)
    k = int(((explained + lam.cumsum(0)) / total < threshold).sum()) + 1
    k = min(k, int((lam > 1e-9 * total).sum()))  # never add directions the data lacks
    added = eigenvectors[:, order[:k]].to(basis.dtype)
    added = added - basis @ (basis.T @ added)  # re-orthogonalise against the old basis
    added = torch.linalg.qr(added)[0] if k else added
    return torch.cat([basis, added], dim=1)


class GPM(ProjectingStrategy):
    name = "gpm"
    across_ranks = "reduced"  # input moments summed over the ranks' rows
    Config = GPMConfig

    def __init__(self, config: GPMConfig | None = None) -> None:
        super().__init__(config)
        self.bases: dict[str, torch.Tensor] = {}
        self.ranks: list[dict[str, Any]] = []
        self.tasks_seen = 0
        self._layers: dict[str, torch.nn.Linear] = {}

    def layers(self, model: Any) -> dict[str, torch.nn.Linear]:
        found = linear_layers(model)
        if self.config.layers is None:
            return found
        modules = dict(model.named_modules())
        for name in self.config.layers:
            if name not in found:
                kind = type(modules[name]).__name__ if name in modules else "not a module"
                raise ConfigError(f"strategy gpm: layer {name!r} is {kind}, not an nn.Linear "
                                 f"(linear layers: {', '.join(found)})")
        return {name: found[name] for name in self.config.layers}

    def check(self, model: Any) -> None:
        self._layers = self.layers(model)

    def targets(self, strategy: Any) -> list[tuple[str, torch.nn.Linear, Any]]:
        return [(name, layer, self.bases[name]) for name, layer in self._layers.items()
                if name in self.bases and layer.weight.grad is not None]

    def subtract_(self, target: torch.Tensor, source: torch.Tensor, basis: Any) -> None:
        subtract_input_(target, source, basis)

    @torch.no_grad()
    def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        index = strategy.experience_index
        pair = strategy.scenario.tasks[index].modalities
        model = strategy.model
        moments = input_moments(self._layers, lambda batch: [model.encode(batch, m) for m in pair],
                                strategy.statistics_pass(index))
        cfg = self.config
        threshold = min(cfg.threshold + cfg.threshold_step * self.tasks_seen, cfg.max_threshold)
        for name, (moment, n) in moments.items():
            self.bases[name] = grow_basis(self.bases.get(name), moment / n, threshold)
        self.tasks_seen += 1
        self.ranks.append({"task": index, "threshold": threshold,
                           "kept": {name: u.shape[1] for name, u in self.bases.items()}})

    def state_dict(self) -> dict[str, Any]:
        return {"bases": self.bases, "ranks": self.ranks, "tasks_seen": self.tasks_seen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)

    def results(self) -> dict[str, Any]:
        return {"mode": self.config.mode, "threshold": self.config.threshold,
                "threshold_step": self.config.threshold_step,
                "kept_ranks": self.ranks}
