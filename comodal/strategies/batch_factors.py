"""The batch-factor form of a dual-sided projection: a linear layer's gradient is G = Δᵀ X (the
step's inputs X, output gradients Δ; for a layer with a bias, G = [∇W | ∇b] and X = [X, 1]),
so G - V Vᵀ G U Uᵀ can go through X and Δ. Gradient clipping scales G by a constant c, which
the factors absorb (G = Δᵀ (c X))."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from comodal.strategies.projection import augmented, dual_flops, layer_matrix, set_layer_matrix


def factor_flops(n: int, out_dim: int, in_dim: int, k_out: int, k_in: int) -> int:
    """Multiply-adds of G - V M Uᵀ with M = (Δ V)ᵀ (X U), k_out x k_in: the correction has rank
    r = min(k_out, k_in, n) and costs r·d_out·d_in, plus the thin products (about n·d·(k + k̃))."""
    thin = n * out_dim * k_out + n * in_dim * k_in
    if min(k_in, k_out) < n:  # through the small core M
        return thin + n * k_out * k_in + min(k_in * out_dim * k_out, k_out * in_dim * k_in) \
            + min(k_in, k_out) * out_dim * in_dim
    return 2 * thin + n * out_dim * in_dim  # through the n batch rows


def subtract_dual_factors_(grad: torch.Tensor, x: torch.Tensor, delta: torch.Tensor,
                           u_in: torch.Tensor, v_out: torch.Tensor) -> None:
    """``grad -= V Vᵀ (Δᵀ X) U Uᵀ`` in place, for ``grad`` = Δᵀ X, through the factors."""
    k_in, k_out = u_in.shape[1], v_out.shape[1]
    if not (k_in and k_out):
        return
    dv, xu = delta @ v_out, x @ u_in
    if min(k_in, k_out) < len(x):
        core = dv.T @ xu
        if k_in <= k_out:
            grad.addmm_(v_out @ core, u_in.T, alpha=-1)
        else:
            grad.addmm_(v_out, core @ u_in.T, alpha=-1)
    else:
        grad.addmm_((dv @ v_out.T).T, xu @ u_in.T, alpha=-1)


class BatchFactors:
    """Each step's X and Δ of some linear layers, caught by hooks; valid while G is c Δᵀ X for
    a scalar c (clipping; a penalty on the weights breaks that, which a fixed random probe per
    layer checks)."""

    def __init__(self, layers: dict[str, nn.Linear], seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.entries: dict[str, list[list]] = {}
        self.probes: dict[str, torch.Tensor] = {}
        self.handles: list[Any] = []
        for name, layer in layers.items():
            self.entries[name] = []
            weight = layer.weight
            width = weight.shape[1] + (layer.bias is not None)  # [W | b] acts on [x, 1]
            self.probes[name] = torch.randn(width, 1, generator=generator).to(weight)
            self.handles.append(layer.register_forward_hook(self._recorder(name)))

    def _recorder(self, name: str) -> Any:
        def record(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            # under autocast (bf16, 16-mixed) Δ is half precision and 16-mixed's is scaled:
            # G is not Δᵀ X in the weight's dtype, so no factors (the weight form projects)
            if output.requires_grad and output.dtype == module.weight.dtype:
                entry = [inputs[0].detach(), None]
                self.entries[name].append(entry)
                output.register_hook(lambda grad: entry.__setitem__(1, grad.detach()))

        return record

    def clear(self) -> None:
        """Forget the previous step's factors."""
        for entries in self.entries.values():
            entries.clear()

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    def project_(self, name: str, layer: nn.Linear, u_in: torch.Tensor, v_out: torch.Tensor,
                 form: str) -> bool:
        """G - V Vᵀ G U Uᵀ on ``layer``'s gradient (``[∇W | ∇b]`` with a bias) through the
        step's factors, if it is c Δᵀ X and that costs less than the weight form ``form``;
        whether it did."""
        entries = self.entries.get(name)
        if not entries or any(delta is None for _, delta in entries):
            return False
        x = augmented(torch.cat([e[0] for e in entries]), layer)
        delta = torch.cat([e[1] for e in entries])
        biased = layer.bias is not None
        grad = layer_matrix(layer, grad=True) if biased else layer.weight.grad
        probe = self.probes[name]
        seen, factored = grad @ probe, delta.T @ (x @ probe)
        if not torch.allclose(seen, factored, rtol=1e-4, atol=1e-6):  # clipped (c < 1)?
            c = (seen * factored).sum() / (factored * factored).sum().clamp_min(1e-30)
            if not torch.allclose(seen, c * factored, rtol=1e-4, atol=1e-6):
                return False  # something else also edited the gradient: it is not c Δᵀ X
            delta = c * delta
        (out_dim, in_dim), k_in, k_out = grad.shape, u_in.shape[1], v_out.shape[1]
        if (factor_flops(len(x), out_dim, in_dim, k_out, k_in)
                >= dual_flops(out_dim, in_dim, k_out, k_in)[form]):
            return False
        subtract_dual_factors_(grad, x, delta, u_in, v_out)
        if biased:
            set_layer_matrix(layer, grad, grad=True)
        return True
