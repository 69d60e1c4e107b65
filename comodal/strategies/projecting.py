"""What the projection strategies share: project each protected layer's gradient before the
step (``mode: grad``) or the optimizer's actual change after it (``mode: update``)."""

from __future__ import annotations

from typing import Any

import torch

from comodal.strategies.base import Strategy
from comodal.strategies.projection import layer_matrix, set_layer_matrix

MODES = ("grad", "update")


class ProjectingStrategy(Strategy):
    """Subclasses say which layers to protect this step (``targets``) and how
    (``subtract_``)."""

    kinds = ("pair",)  # bases are per head and layer; a growing classifier has none

    def __init__(self, config: object | None = None) -> None:
        super().__init__(config)
        self.projections = 0
        self._before: dict[str, torch.Tensor] = {}

    def targets(self, strategy: Any) -> list[tuple[str, torch.nn.Linear, Any]]:
        raise NotImplementedError

    def subtract_(self, target: torch.Tensor, source: torch.Tensor, basis: Any) -> None:
        """``target -= `` the protected part of ``source``, in place."""
        raise NotImplementedError

    def _apply(self, layer: torch.nn.Linear, basis: Any, grad: bool,
               old: torch.Tensor | None = None) -> None:
        """Project the layer's gradient (``grad``) or its change since ``old``. Bias-free layers
        (the heads, unless ``model.head_bias``) are edited in place; a bias joins the weight as
        ``[W | b]``."""
        self.projections += 1
        if layer.bias is None:
            target = layer.weight.grad if grad else layer.weight.data
            self.subtract_(target, target if grad else target - old, basis)
            return
        matrix = layer_matrix(layer, grad=grad)
        self.subtract_(matrix, matrix if grad else matrix - old, basis)
        set_layer_matrix(layer, matrix, grad=grad)

    @torch.no_grad()
    def after_backward(self, strategy: Any, **kwargs: Any) -> None:
        if self.config.mode != "grad":
            return
        for name, layer, basis in self.targets(strategy):
            if layer.weight.grad is not None and not self.project_from_factors(name, layer, basis):
                self._apply(layer, basis, grad=True)

    def project_from_factors(self, name: str, layer: torch.nn.Linear, basis: Any) -> bool:
        """A cheaper way to project this layer's gradient, if the subclass has one."""
        return False

    @torch.no_grad()
    def before_update(self, strategy: Any, **kwargs: Any) -> None:
        if self.config.mode != "update":
            return
        for name, layer, _ in self.targets(strategy):
            current = layer.weight if layer.bias is None else layer_matrix(layer)
            if name in self._before and self._before[name].shape == current.shape:
                self._before[name].copy_(current)
            else:
                self._before[name] = current.detach().clone()

    @torch.no_grad()
    def after_update(self, strategy: Any, **kwargs: Any) -> None:
        if self.config.mode != "update":
            return
        for name, layer, basis in self.targets(strategy):
            self._apply(layer, basis, grad=False, old=self._before[name])
