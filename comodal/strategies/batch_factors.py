"""The batch-factor form of a dual-sided projection: a bias-free linear layer's gradient is
G = Δᵀ X (the step's inputs X, output gradients Δ), so G - V Vᵀ G U Uᵀ can go through X and Δ."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from comodal.strategies.projection import dual_flops


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
    """Each step's X and Δ of some bias-free linear layers, caught by hooks; valid while G is
    Δᵀ X (a penalty on the weights breaks that, which a fixed random probe per layer checks)."""

    def __init__(self, layers: dict[str, nn.Linear], seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.entries: dict[str, list[list]] = {}
        self.probes: dict[str, torch.Tensor] = {}
        self.handles: list[Any] = []
        for name, layer in layers.items():
            self.entries[name] = []
            weight = layer.weight
            self.probes[name] = torch.randn(weight.shape[1], 1, generator=generator).to(weight)
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
        """G - V Vᵀ G U Uᵀ on ``layer``'s gradient through the step's factors, if it is Δᵀ X
        and that costs less than the weight form ``form``; whether it did."""
        entries = self.entries.get(name)
        if not entries or any(delta is None for _, delta in entries):
            return False
        x = torch.cat([e[0] for e in entries])
        delta = torch.cat([e[1] for e in entries])
        grad = layer.weight.grad
        probe = self.probes[name]
        if not torch.allclose(grad @ probe, delta.T @ (x @ probe), rtol=1e-4, atol=1e-6):
            return False  # something else also edited the gradient: it is not Δᵀ X
        (out_dim, in_dim), k_in, k_out = layer.weight.shape, u_in.shape[1], v_out.shape[1]
        if (factor_flops(len(x), out_dim, in_dim, k_out, k_in)
                >= dual_flops(out_dim, in_dim, k_out, k_in)[form]):
            return False
        subtract_dual_factors_(grad, x, delta, u_in, v_out)
        return True
