"""``cflat``: C-Flat, a flatness-aware step around any optimizer and any stack (Bian, Li, Yuan,
Wang, Zhao, Lu, Ji, Feng et al., "Make Continual Learning Stronger via C-Flat", NeurIPS 2024).

The step minimises L + R⁰_ρ + λ R¹_ρ: R⁰ is SAM's zeroth-order sharpness (the rise of L within
radius ρ), R¹ = ρ max_{‖δ‖≤ρ} ‖∇L(θ + δ)‖ the first-order flatness (GAM's sharpness of the
gradient norm). Its gradient is taken with four gradients of the step's loss, as the official
code (optims/c_flat.py; defaults ρ = λ = 0.2) takes them, with ε = 1e-12:

    g₀ = ∇L(θ),            e₀ = ρ g₀ / (‖g₀‖ + ε),   g₁ = ∇L(θ + e₀)        (SAM)
    d  = g₁ - g₀ (≈ ρ H g₀/‖g₀‖, the ascent of ‖∇L‖ by finite differences),
                           e₁ = ρ d / (‖d‖ + ε),     g₂ = ∇L(θ + e₁)
                           e₂ = ρ g₂ / (‖g₂‖ + ε),   g₃ = ∇L(θ + e₁ + e₂)
    g  = g₁ + λ (g₃ - g₂)  (g₃ - g₂ ≈ ρ ∇‖∇L‖ at θ + e₁, the flatness term's gradient)

Norms are global over the parameters that have gradients. The base optimizer then steps from
θ with g, so ρ = 0 is the base step itself: nothing is computed then, bit for bit.

In comodal it runs in ``after_backward``: each gradient is ``trainer.compute_gradients()`` at
the perturbed weights, which re-runs every plugin's forward and loss hooks on the step's batch
(its memory rows and side batches, penalties and distillation against the cached teacher
outputs), so g is of the stack's full loss, and each is reduced over ranks. The weights are put
back from a copy (exactly), as are the step's loss and outputs (the first pass's, which the
epoch loss and later hooks read) and the model's buffers (batch-norm statistics move once per
step, as the official code freezes them in the extra passes). g₀ must be the unclipped
gradient: without ``train.clip_grad_norm`` it is the step's, otherwise it is computed again at
θ (a clipped gradient cannot be unscaled exactly), and ``train.clip_grad_norm`` then clips g,
the gradient the optimizer sees. It replaces the gradient, so it comes first in a stack (after
``joint``), before the strategies that edit the gradient (``dns``, ``gpm``, ``gem``, ``agem``).

Adaptation to pair tasks: none is needed, as C-Flat acts on the gradient of whatever loss the
step has: InfoNCE over the pair batch (plus the stack's terms); the batch, and so InfoNCE's
negatives, is the same in all four passes, so the differences compare one loss at nearby
weights. On class-incremental ``classify`` tasks the loss is cross-entropy over the classes seen
so far, as in the paper. ``train.precision: 16-mixed`` is refused: its grad scaler unscales the
gradients once per step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from comodal.errors import ConfigError
from comodal.strategies.base import Strategy

EPS = 1e-12  # the official code's perturb_eps


@dataclass
class CFlatConfig:
    rho: float = 0.2  # radius ρ of the perturbations (the official code's default)
    flatness_weight: float = 0.2  # λ, the first-order flatness term's weight (its default)

    def __post_init__(self) -> None:
        for field in ("rho", "flatness_weight"):
            value = getattr(self, field)
            if not 0 <= value < math.inf:
                raise ConfigError(f"strategy_args.cflat.{field}: must be a finite number "
                                  f">= 0, got {value}")


def _norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Global L2 norm of a list of tensors."""
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in tensors]))


def _direction(tensors: list[torch.Tensor], rho: float) -> list[torch.Tensor]:
    """``tensors`` scaled to global norm ``rho`` (``rho / (‖·‖ + ε)``, as the official code)."""
    scale = rho / (_norm(tensors) + EPS)
    return [t * scale for t in tensors]


class CFlat(Strategy):
    name = "cflat"
    across_ranks = "replicated"  # every gradient is reduced over the ranks; no random draws
    Config = CFlatConfig

    def __init__(self, config: CFlatConfig | None = None) -> None:
        super().__init__(config)
        self.steps = 0

    def before_training(self, strategy: Any, **kwargs: Any) -> None:
        if strategy.train_cfg.precision == "16-mixed":
            raise ConfigError("strategy cflat cannot run under train.precision 16-mixed: its "
                              "grad scaler unscales the gradients once per step, and cflat "
                              "takes three more per step (use train.precision bf16 or 32)")

    @torch.no_grad()
    def after_backward(self, strategy: Any, **kwargs: Any) -> None:
        """Replace the step's gradient by C-Flat's (see the module docstring)."""
        rho = self.config.rho
        if rho == 0:
            return
        model = strategy.model
        params = [p for p in model.parameters() if p.grad is not None]
        theta = [p.detach().clone() for p in params]
        buffers = [b.clone() for b in model.buffers()]

        def gradient_at(*shifts: list[torch.Tensor]) -> list[torch.Tensor]:
            """∇L at θ + Σ shifts (θ itself without shifts)."""
            for i, p in enumerate(params):
                p.copy_(theta[i])
                for shift in shifts:
                    p.add_(shift[i])
            with torch.enable_grad():
                strategy.compute_gradients()
            return [p.grad.clone() for p in params]

        with strategy.step_kept():
            g0 = ([p.grad.clone() for p in params] if strategy.train_cfg.clip_grad_norm is None
                  else gradient_at())
            g1 = gradient_at(_direction(g0, rho))
            e1 = _direction([a - b for a, b in zip(g1, g0, strict=True)], rho)
            g2 = gradient_at(e1)
            g3 = gradient_at(e1, _direction(g2, rho))
        lam = self.config.flatness_weight
        for p, t, a, b, c in zip(params, theta, g1, g2, g3, strict=True):
            p.copy_(t)
            p.grad.copy_(a + lam * (c - b))
        for b, saved in zip(model.buffers(), buffers, strict=True):
            b.copy_(saved)
        strategy.clip_gradients()
        self.steps += 1

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = state["steps"]

    def results(self) -> dict[str, Any]:
        return {"rho": self.config.rho, "flatness_weight": self.config.flatness_weight,
                "steps": self.steps}
