"""What the projection strategies share: project each protected layer's gradient before the
step (``mode: grad``) or the optimizer's actual change after it (``mode: update``)."""

from __future__ import annotations

from typing import Any

import torch

from comodal.strategies.base import Strategy
from comodal.strategies.projection import layer_matrix, set_layer_matrix

MODES = ("grad", "update")


class ProjectingStrategy(Strategy):
    """Subclasses say which layers to protect this step (``targets``) and how (``project``)."""

    def __init__(self, config: object | None = None) -> None:
        super().__init__(config)
        self.projections = 0
        self._before: dict[str, torch.Tensor] = {}

    def targets(self, strategy: Any) -> list[tuple[str, torch.nn.Linear, Any]]:
        raise NotImplementedError

    def project(self, matrix: torch.Tensor, basis: Any) -> torch.Tensor:
        raise NotImplementedError

    def _project(self, matrix: torch.Tensor, basis: Any) -> torch.Tensor:
        self.projections += 1
        return self.project(matrix, basis)

    @torch.no_grad()
    def after_backward(self, strategy: Any, **kwargs: Any) -> None:
        if self.config.mode != "grad":
            return
        for _, layer, basis in self.targets(strategy):
            if layer.weight.grad is not None:
                grad = layer_matrix(layer, grad=True)
                set_layer_matrix(layer, self._project(grad, basis), grad=True)

    @torch.no_grad()
    def before_update(self, strategy: Any, **kwargs: Any) -> None:
        if self.config.mode == "update":
            self._before = {name: layer_matrix(layer) for name, layer, _ in self.targets(strategy)}

    @torch.no_grad()
    def after_update(self, strategy: Any, **kwargs: Any) -> None:
        if self.config.mode != "update":
            return
        for name, layer, basis in self.targets(strategy):
            old = self._before[name]
            set_layer_matrix(layer, old + self._project(layer_matrix(layer) - old, basis))
