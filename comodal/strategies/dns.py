"""``dns``: dual-sided null-space projection (Liu et al., "Continual Multimodal Contrastive
Learning", NeurIPS 2025).

Per modality m: C_m, the second moment of m's head inputs over past tasks that used m, and
C̃_m, the second moment of m's partners' projected embeddings, both count-weighted. Before a
task, P_m and P̃_m project onto their leading eigenvectors; every step each active head's
gradient becomes G - P̃ G P, so for an old input x in range(P) and an old partner embedding y
in range(P̃), yᵀ ΔW x = 0: old cross-modal scores do not move to first order.

Unlike the reference code, the moments come from the task's own pair, the thresholds are
scale-aware and reported, and ``mode: update`` projects the optimizer's actual parameter change
(AdamW's element-wise scaling would otherwise leave the protected subspace). By default C̃ is
rebuilt before each task from the partners' stored input moments through the partners' heads
as they are now: a partner head moved by a later task would otherwise leave the stored
embeddings stale (``partner_embeddings: snapshot`` keeps the paper's form).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from comodal.config import check_choice
from comodal.errors import ConfigError
from comodal.platform.trainer import overrides
from comodal.strategies.projecting import MODES, ProjectingStrategy
from comodal.strategies.projection import (
    FORMS,
    RULES,
    choose_form,
    dual_flops,
    input_moments,
    linear_layers,
    principal_basis,
    subtract_dual_,
    subtract_input_,
)

PARTNER = ("current", "snapshot")


class HeadBasis(NamedTuple):
    """A head's protected subspaces for the current task and the form that projects them."""

    u: torch.Tensor  # input side, [in, k]
    v: torch.Tensor  # output side, [out, k̃]
    form: str
    dense: tuple[torch.Tensor, torch.Tensor] | None  # (V Vᵀ, U Uᵀ) when the form is dense


@dataclass
class DNSConfig:
    # Defaults chosen on synth-pairs (examples/projection_study.py sweep; examples/README.md)
    mode: str = "update"  # grad: project G before the step (paper); update: project the step
    input_rule: str = "relative"  # energy (retained fraction) | relative (to the top eigenvalue)
    input_threshold: float = 1e-4
    output_rule: str = "relative"
    output_threshold: float = 1e-4
    form: str = "auto"  # auto picks the cheaper of dense and low-rank from the kept ranks
    # grad mode: project a head's gradient G = Δᵀ X through its batch factors when cheaper
    batch_form: bool = True
    modalities: list[str] | None = None  # heads to protect; default every head
    encoder_layers: bool = False  # also project every nn.Linear of trainable encoders (input side)
    keep_norms: bool = False  # C̃_m also absorbs m's own embeddings, so their norms hold too
    # current: C̃_m is rebuilt before each task from the partners' stored input moments through
    # the partners' heads as they are now; snapshot: the paper's embeddings at each task's end
    partner_embeddings: str = "current"

    def __post_init__(self) -> None:
        for field, valid in (("mode", MODES), ("form", FORMS), ("partner_embeddings", PARTNER),
                             ("input_rule", RULES), ("output_rule", RULES)):
            check_choice(f"strategy_args.dns.{field}", getattr(self, field), valid)
        for field in ("input_threshold", "output_threshold"):
            if not 0 < getattr(self, field) <= 1:
                raise ConfigError(f"strategy_args.dns.{field}: must be in (0, 1], "
                                  f"got {getattr(self, field)}")


class DNS(ProjectingStrategy):
    name = "dns"
    Config = DNSConfig

    def __init__(self, config: DNSConfig | None = None) -> None:
        super().__init__(config)
        self.moment_in: dict[str, torch.Tensor] = {}  # sums of x xᵀ of each head's inputs
        self.moment_out: dict[str, torch.Tensor] = {}  # sums of y yᵀ of partner embeddings
        self.partner_inputs: dict[str, torch.Tensor] = {}  # "m|p": sums of x_p x_pᵀ
        self.count: dict[str, int] = {}
        self.layer_moments: dict[str, torch.Tensor] = {}
        self.layer_count: dict[str, int] = {}
        self.bases: dict[str, HeadBasis] = {}
        self.layer_bases: dict[str, torch.Tensor] = {}
        self.ranks: list[dict[str, Any]] = []
        self._handles: list[Any] = []
        self.factor_projections = 0
        self._factors: dict[str, list[list]] = {}
        self._probes: dict[str, torch.Tensor] = {}

    def check(self, model: Any) -> None:
        for m in self.config.modalities or []:
            if m not in model.heads:
                raise ConfigError(f"strategy dns: modality {m!r} has no head to protect "
                                 f"(heads: {', '.join(model.heads)})")

    def protected(self, model: Any) -> list[str]:
        return list(self.config.modalities or model.heads)

    # ------------------------------------------------------------ projectors
    def before_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        cfg, model = self.config, strategy.model
        self.bases, report = {}, {}
        for m in self.protected(model):
            if self.count.get(m, 0) == 0:
                continue  # a modality never trained has P = P̃ = 0
            u = principal_basis(self.moment_in[m] / self.count[m], cfg.input_rule,
                                cfg.input_threshold)
            v = principal_basis(self.output_moment(model, m) / self.count[m], cfg.output_rule,
                                cfg.output_threshold)
            weight = model.heads[m].weight
            form = choose_form(weight.shape[0], weight.shape[1], v.shape[1], u.shape[1],
                               cfg.form)
            dense = (v @ v.T, u @ u.T) if form == "dense" else None  # built once per task
            self.bases[m] = HeadBasis(u, v, form, dense)
            report[m] = {"input": u.shape[1], "input_dim": weight.shape[1],
                         "output": v.shape[1], "output_dim": weight.shape[0], "form": form}
        self.layer_bases = {
            name: principal_basis(s / self.layer_count[name], cfg.input_rule, cfg.input_threshold)
            for name, s in self.layer_moments.items()
        }
        for name, u in self.layer_bases.items():
            report[name] = {"input": u.shape[1], "input_dim": u.shape[0]}  # bias row included
        index = strategy.experience_index  # a resumed task replaces its earlier entry
        self.ranks = [r for r in self.ranks if r["task"] != index]
        self.ranks.append({"task": index, "kept": report})
        self._record_factors(strategy)

    def _record_factors(self, strategy: Any) -> None:
        """Hook the protected heads to keep each step's inputs X and output gradients Δ. Only
        while nothing else adds to the loss before backward (a penalty on the weights would
        make the gradient more than Δᵀ X)."""
        self._release()
        others = [p for p in strategy.plugins if p is not self]
        if (self.config.mode != "grad" or not self.config.batch_form
                or any(overrides(p, "before_backward") for p in others)):
            return
        generator = torch.Generator().manual_seed(len(self.ranks))
        for m in self.bases:
            self._factors[m] = []
            weight = strategy.model.heads[m].weight
            # a fixed random vector per head and task, to check the factors against G
            self._probes[m] = torch.randn(weight.shape[1], 1, generator=generator).to(weight)
            hook = strategy.model.heads[m].register_forward_hook(self._recorder(m))
            self._handles.append(hook)

    def _recorder(self, m: str) -> Any:
        def record(module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            if output.requires_grad:
                entry = [inputs[0].detach(), None]
                self._factors[m].append(entry)
                output.register_hook(lambda grad: entry.__setitem__(1, grad.detach()))

        return record

    def _release(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles, self._factors, self._probes = [], {}, {}

    def before_training_iteration(self, strategy: Any, **kwargs: Any) -> None:
        for entries in self._factors.values():
            entries.clear()

    def project_from_factors(self, name: str, layer: torch.nn.Linear, basis: Any) -> bool:
        """G - P̃ G P for G = Δᵀ X through the batch factors, when cheaper than the weight forms:
        M = (Δ V)ᵀ (X U) is k̃ x k, so the correction V M Uᵀ has rank r = min(k̃, k, n) and costs
        r·d_out·d_in, plus thin products (about n·d·(k + k̃)), instead of about 2k·d²."""
        entries = self._factors.get(name)
        if not entries or any(delta is None for _, delta in entries):
            return False
        x = torch.cat([e[0] for e in entries])
        delta = torch.cat([e[1] for e in entries])
        grad = layer.weight.grad
        probe = self._probes[name]
        if not torch.allclose(grad @ probe, delta.T @ (x @ probe), rtol=1e-4, atol=1e-6):
            return False  # something else also edited the gradient: it is not Δᵀ X
        (out_dim, in_dim), n = layer.weight.shape, len(x)
        k_in, k_out = basis.u.shape[1], basis.v.shape[1]
        thin = n * out_dim * k_out + n * in_dim * k_in
        if min(k_in, k_out) < n:  # through the small core M
            cost = thin + n * k_out * k_in + min(k_in * out_dim * k_out, k_out * in_dim * k_in) \
                + min(k_in, k_out) * out_dim * in_dim
        else:  # through the n batch rows
            cost = 2 * thin + n * out_dim * in_dim
        if cost >= dual_flops(out_dim, in_dim, k_out, k_in)[basis.form]:
            return False
        self.projections += 1
        self.factor_projections += 1
        if k_in and k_out:
            dv, xu = delta @ basis.v, x @ basis.u
            if min(k_in, k_out) < n:
                core = dv.T @ xu
                if k_in <= k_out:
                    grad.addmm_(basis.v @ core, basis.u.T, alpha=-1)
                else:
                    grad.addmm_(basis.v, core @ basis.u.T, alpha=-1)
            else:
                grad.addmm_((dv @ basis.v.T).T, xu @ basis.u.T, alpha=-1)
        return True

    @torch.no_grad()
    def output_moment(self, model: Any, m: str) -> torch.Tensor:
        """Sum of y yᵀ over the old embeddings y that m's head must stay orthogonal to."""
        if self.config.partner_embeddings == "snapshot":
            return self.moment_out[m]
        total = 0
        for key, moment in self.partner_inputs.items():
            owner, partner = key.split("|")
            if owner == m:
                w = model.heads[partner].weight
                total = total + w @ moment @ w.T
        return total

    def targets(self, strategy: Any) -> list[tuple[str, torch.nn.Linear, Any]]:
        """(name, layer, basis) to project this step: heads of the batch's pair (dual-sided)
        and their encoders' linear layers (input side)."""
        pair = strategy.pair(strategy.mbatch)
        model = strategy.model
        out = [(m, model.heads[m], self.bases[m]) for m in pair if m in self.bases]
        for m in pair:
            if m in model.encoders:
                for name, layer in linear_layers(model.encoders[m], f"encoders.{m}.").items():
                    if name in self.layer_bases:
                        out.append((name, layer, self.layer_bases[name]))
        return out

    def subtract_(self, target: torch.Tensor, source: torch.Tensor, basis: Any) -> None:
        if isinstance(basis, HeadBasis):
            subtract_dual_(target, source, basis.u, basis.v, basis.form, basis.dense)
        else:
            subtract_input_(target, source, basis)

    # ------------------------------------------------------------ memory
    @torch.no_grad()
    def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        """Absorb this task's moments, from the task's own pair (A, B): C_A, C_B from the
        inputs; C̃_B from A's embeddings and C̃_A from B's, as the heads are now."""
        self._release()
        index = strategy.experience_index
        a, b = strategy.scenario.tasks[index].modalities
        model = strategy.model
        was_training = model.training
        model.eval()
        batches = [strategy.to_device(batch) for batch in strategy.ordered_loader(index)]
        snapshot = self.config.partner_embeddings == "snapshot"
        for batch in batches:
            x = {m: model.backbone(batch[m], m) for m in (a, b)}
            xx = {m: x[m].T @ x[m] for m in (a, b)}
            z = {m: model.heads[m](x[m]) for m in (a, b)} if snapshot else {}
            for m, partner in ((a, b), (b, a)):
                self._add(self.moment_in, m, xx[m])
                self._add(self.partner_inputs, f"{m}|{partner}", xx[partner])
                if self.config.keep_norms:
                    self._add(self.partner_inputs, f"{m}|{m}", xx[m])
                if snapshot:  # the paper's C̃: embeddings as they are at the task's end
                    for owner in (partner, m) if self.config.keep_norms else (partner,):
                        self._add(self.moment_out, m, z[owner].T @ z[owner])
                self.count[m] = self.count.get(m, 0) + len(x[m])
        if self.config.encoder_layers:
            layers = {}
            for m in (a, b):
                if m in model.encoders:
                    layers.update(linear_layers(model.encoders[m], f"encoders.{m}."))
            moments = input_moments(layers, lambda batch: [model.backbone(batch[m], m)
                                                           for m in (a, b)], batches)
            for name, (s, n) in moments.items():
                self._add(self.layer_moments, name, s)
                self.layer_count[name] = self.layer_count.get(name, 0) + n
        model.train(was_training)

    @staticmethod
    def _add(store: dict[str, torch.Tensor], key: str, value: torch.Tensor) -> None:
        store[key] = value.detach().clone() if key not in store else store[key] + value

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs (tensors and plain containers only)."""
        state = {"moment_in": self.moment_in, "moment_out": self.moment_out,
                 "partner_inputs": self.partner_inputs, "count": self.count,
                 "layer_moments": self.layer_moments, "layer_count": self.layer_count,
                 "ranks": self.ranks}
        return {key: copy.copy(value) for key, value in state.items()}  # not the live dicts

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)

    def results(self) -> dict[str, Any]:
        cfg = self.config
        return {"mode": cfg.mode, "form": cfg.form, "partner_embeddings": cfg.partner_embeddings,
                "input_threshold": {"rule": cfg.input_rule, "value": cfg.input_threshold},
                "output_threshold": {"rule": cfg.output_rule, "value": cfg.output_threshold},
                "kept_ranks": self.ranks}
