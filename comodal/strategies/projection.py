"""Subspace maths shared by the gradient-projection strategies (DNS, GPM): bases kept by a
scale-aware (or the CMCL code's absolute) threshold and their unions, one- and two-sided
projections in dense or low-rank form, and input second moments of linear layers collected
through forward hooks."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from comodal.platform import distributed

RULES = ("energy", "relative", "absolute")
FORMS = ("auto", "dense", "lowrank")


def kept_rank(eigenvalues: torch.Tensor, rule: str, threshold: float,
              eps: float | None = None) -> int:
    """How many leading eigenvalues (sorted descending) to keep.

    ``energy``: the fewest whose sum reaches ``threshold`` of the total (retained energy);
    ``relative``: those at least ``threshold`` times the largest. Both are invariant to the
    scale of the features. ``absolute`` (the CMCL reference code's cut): those above
    ``threshold`` and above the round-off floor ``eps`` x largest x dimension (numpy's
    ``matrix_rank`` tolerance; ``eps`` defaults to the eigenvalues' dtype's), so that a cut at
    0 keeps the moment's rank, not the directions that are zero up to round-off."""
    lam = eigenvalues.clamp(min=0)
    total = lam.sum()
    if total <= 0:
        return 0
    if rule == "energy":
        reached = (lam.cumsum(0) / total) >= threshold - 1e-12
        return int(reached.float().argmax()) + 1 if reached.any() else len(lam)
    if rule == "relative":
        return int((lam >= threshold * lam[0]).sum())
    if rule == "absolute":
        eps = torch.finfo(eigenvalues.dtype).eps if eps is None else eps
        return int((lam > max(threshold, eps * float(lam[0]) * len(lam))).sum())
    raise ValueError(f"unknown threshold rule {rule!r} (valid: {', '.join(RULES)})")


def principal_basis(moment: torch.Tensor, rule: str, threshold: float) -> torch.Tensor:
    """Orthonormal basis ``[d, k]`` of the leading eigenvectors of a second-moment matrix
    (decomposed in float64; the round-off floor is that of the moment's own dtype)."""
    eigenvalues, eigenvectors = torch.linalg.eigh(moment.double())
    order = eigenvalues.argsort(descending=True)
    k = kept_rank(eigenvalues[order], rule, threshold, torch.finfo(moment.dtype).eps)
    return eigenvectors[:, order[:k]].to(moment.dtype)


def union_basis(*bases: torch.Tensor, tol: float = 1e-6) -> torch.Tensor:
    """Orthonormal basis of the span of several orthonormal bases ``[d, k_i]``: the left
    singular vectors of their concatenation with singular value above ``tol`` (a direction
    within about ``tol`` radians of the others' span adds nothing)."""
    if len(bases) == 1:
        return bases[0]
    stacked = torch.cat(bases, dim=1)
    if stacked.shape[1] == 0:
        return stacked
    u, s, _ = torch.linalg.svd(stacked.double(), full_matrices=False)
    return u[:, s > tol].to(stacked.dtype)


def dual_flops(out_dim: int, in_dim: int, k_out: int, k_in: int) -> dict[str, int]:
    """Multiply-adds of G - P_out G P_in in dense form and of G - V (Vᵀ G U) Uᵀ in low-rank form."""
    dense = out_dim * out_dim * in_dim + out_dim * in_dim * in_dim
    lowrank = k_out * out_dim * in_dim + k_out * in_dim * k_in + out_dim * k_out * k_in \
        + out_dim * k_in * in_dim
    return {"dense": dense, "lowrank": lowrank}


def choose_form(out_dim: int, in_dim: int, k_out: int, k_in: int, form: str = "auto") -> str:
    """``dense`` or ``lowrank``: ``auto`` picks the one with fewer multiply-adds."""
    if form != "auto":
        return form
    cost = dual_flops(out_dim, in_dim, k_out, k_in)
    return "lowrank" if cost["lowrank"] <= cost["dense"] else "dense"


def subtract_dual_(
    target: torch.Tensor, source: torch.Tensor, u_in: torch.Tensor, v_out: torch.Tensor,
    form: str, dense: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> None:
    """``target -= P_out source P_in`` in place (``source`` may be ``target``), with no
    d x d temporary in the low-rank form."""
    if u_in.shape[1] == 0 or v_out.shape[1] == 0:
        return
    if form == "lowrank":
        target.addmm_(v_out @ ((v_out.T @ source) @ u_in), u_in.T, alpha=-1)
    else:
        p_out, p_in = dense if dense is not None else (v_out @ v_out.T, u_in @ u_in.T)
        target.sub_(p_out @ source @ p_in)


def project_dual(
    grad: torch.Tensor, u_in: torch.Tensor, v_out: torch.Tensor, form: str = "auto",
    dense: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """``G - P_out G P_in`` with ``P_in = U Uᵀ`` and ``P_out = V Vᵀ``: the part of ``G`` that
    moves no score ``yᵀ G x`` with x in span(U) and y in span(V).

    ``dense`` may pass precomputed ``(P_out, P_in)``; ``auto`` picks the cheaper form."""
    out = grad.clone()
    form = choose_form(grad.shape[0], grad.shape[1], v_out.shape[1], u_in.shape[1], form)
    subtract_dual_(out, grad, u_in, v_out, form, dense)
    return out


def subtract_input_(target: torch.Tensor, source: torch.Tensor, u_in: torch.Tensor) -> None:
    """``target -= source U Uᵀ`` in place (GPM's projection when ``source`` is ``target``)."""
    if u_in.shape[1]:
        target.addmm_(source @ u_in, u_in.T, alpha=-1)


def augmented(x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    """``[x, 1]``, the input ``[W | b]`` acts on, for a layer with a bias; ``x`` without one."""
    if layer.bias is None:
        return x
    return torch.cat([x, x.new_ones(*x.shape[:-1], 1)], dim=-1)


def layer_matrix(layer: nn.Linear, grad: bool = False) -> torch.Tensor:
    """``[W | b]``: the layer as one matrix acting on ``[x, 1]`` (its weight alone if no bias),
    so that protecting the span of old augmented inputs also covers the bias."""
    w = layer.weight.grad if grad else layer.weight
    if layer.bias is None:
        return w.detach().clone()
    b = layer.bias.grad if grad else layer.bias
    return torch.cat([w.detach(), b.detach()[:, None]], dim=1)


@torch.no_grad()
def set_layer_matrix(layer: nn.Linear, matrix: torch.Tensor, grad: bool = False) -> None:
    """Write ``[W | b]`` back into the layer's parameters (or their gradients)."""
    w = layer.weight.grad if grad else layer.weight
    w.copy_(matrix[:, : layer.in_features])
    if layer.bias is not None:
        (layer.bias.grad if grad else layer.bias).copy_(matrix[:, -1])


def linear_layers(module: nn.Module, prefix: str = "") -> dict[str, nn.Linear]:
    """Every ``nn.Linear`` inside ``module`` by qualified name."""
    return {
        f"{prefix}{name}": m for name, m in module.named_modules() if isinstance(m, nn.Linear)
    }


@torch.no_grad()
def input_moments(
    layers: dict[str, nn.Linear], run: Any, batches: Iterable[Any]
) -> dict[str, tuple[torch.Tensor, int]]:
    """Sum of x xᵀ over every input row each layer sees while ``run(batch)`` is called on each
    batch (x augmented with a 1 for layers with a bias), and the row count (leading dimensions
    of the input are flattened)."""
    sums: dict[str, list] = {name: [None, 0] for name in layers}

    def hook(name: str):
        def record(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: Any) -> None:
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).double()
            if module.bias is not None:  # the bias acts on a constant 1
                x = torch.cat([x, x.new_ones(len(x), 1)], dim=1)
            acc = sums[name]
            acc[0] = x.T @ x if acc[0] is None else acc[0] + x.T @ x
            acc[1] += x.shape[0]

        return record

    handles = [layer.register_forward_hook(hook(name)) for name, layer in layers.items()]
    try:
        for batch in batches:
            run(batch)
    finally:
        for handle in handles:
            handle.remove()
    found = {name: acc for name, acc in sums.items() if acc[0] is not None}
    world = distributed.current()
    if world is not None:  # each rank's layers saw its share of the rows: sum over ranks
        for acc in found.values():
            acc[0] = world.sum_(acc[0])
            acc[1] = world.total(acc[1])
    return {name: (s.float(), n) for name, (s, n) in found.items()}
