"""``dns``: dual-sided null-space projection (Liu et al., "Continual Multimodal Contrastive
Learning", NeurIPS 2025).

Per modality m: C_m, the second moment of m's head inputs over past tasks that used m, and
C̃_m, the second moment of m's partners' projected embeddings, both count-weighted. Before a
task, P_m and P̃_m project onto their leading eigenvectors; every step each active head's
gradient becomes G - P̃ G P, so for an old input x in range(P) and an old partner embedding y
in range(P̃), yᵀ ΔW x = 0: old cross-modal scores do not move to first order. The scores are
the raw bilinear ones, (W_A x_A)ᵀ(W_B x_B), which ``model.score: dot`` trains and evaluates;
under cosine scoring a norm change the projection allows still moves rankings. A head with a
bias is ``[W | b]`` acting on ``[x, 1]``: its input moments are of the augmented inputs, and
the projection applies to ``[W | b]`` (``layer_matrix``).

Unlike the reference code, the moments come from the task's own pair, the thresholds are
scale-aware and reported, and ``mode: update`` projects the optimizer's actual parameter change
(AdamW's element-wise scaling would otherwise leave the protected subspace). By default C̃ is
rebuilt before each task from the partners' stored input moments through the partners' heads
as they are now: a partner head moved by a later task would otherwise leave the stored
embeddings stale (``partner_embeddings: snapshot`` keeps the paper's form). ``preset: paper``
is the reference code's setting: grad mode, absolute cuts (input 0.1, output 0) and snapshot
partner embeddings.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from comodal.config import check_choice
from comodal.errors import ConfigError
from comodal.platform import distributed
from comodal.platform.trainer import overrides
from comodal.strategies.batch_factors import BatchFactors
from comodal.strategies.projecting import MODES, ProjectingStrategy
from comodal.strategies.projection import (
    FORMS,
    RULES,
    augmented,
    choose_form,
    input_moments,
    layer_matrix,
    linear_layers,
    principal_basis,
    subtract_dual_,
    subtract_input_,
    union_basis,
)

PARTNER = ("current", "snapshot")
# The options a preset sets, and their values without one. Options given beside a preset
# override it, as a preset is only a starting point.
DEFAULTS = {"mode": "update", "input_rule": "relative", "input_threshold": 1e-4,
            "output_rule": "relative", "output_threshold": 1e-4, "partner_embeddings": "current"}
PRESETS = {
    # the CMCL reference code: gradient projection, absolute cuts, embeddings at each task's end
    "paper": {"mode": "grad", "input_rule": "absolute", "input_threshold": 0.1,
              "output_rule": "absolute", "output_threshold": 0.0,
              "partner_embeddings": "snapshot"},
}


class HeadBasis(NamedTuple):
    """A head's protected subspaces for the current task and the form that projects them."""

    u: torch.Tensor  # input side, [in, k] ([in + 1, k] for a head with a bias)
    v: torch.Tensor  # output side, [out, k̃]
    form: str
    dense: tuple[torch.Tensor, torch.Tensor] | None  # (V Vᵀ, U Uᵀ) when the form is dense


@dataclass
class DNSConfig:
    # None: the preset's value, else DEFAULTS (chosen on synth-pairs: examples/projection_study.py
    # sweep; examples/README.md)
    preset: str | None = None  # paper: the reference code's setting (PRESETS)
    mode: str | None = None  # grad: project G before the step (paper); update: project the step
    # energy (retained fraction) | relative (to the top eigenvalue) | absolute (the paper's)
    input_rule: str | None = None
    input_threshold: float | None = None
    output_rule: str | None = None
    output_threshold: float | None = None
    form: str = "auto"  # auto picks the cheaper of dense and low-rank from the kept ranks
    # grad mode: project a head's gradient G = Δᵀ X through its batch factors when cheaper
    batch_form: bool = True
    modalities: list[str] | None = None  # heads to protect; default every head
    encoder_layers: bool = False  # also project every nn.Linear of trainable encoders (input side)
    # P̃_m also spans m's own old embeddings, so their norms hold too: the own and the partner
    # moments are cut each on its own and P̃_m projects onto the union of the two bases
    keep_norms: bool = False
    # current: C̃_m is rebuilt before each task from the partners' stored input moments through
    # the partners' heads as they are now; snapshot: the paper's embeddings at each task's end
    partner_embeddings: str | None = None

    def __post_init__(self) -> None:
        if self.preset is not None:
            check_choice("strategy_args.dns.preset", self.preset, PRESETS)
        for field, value in PRESETS.get(self.preset, DEFAULTS).items():
            if getattr(self, field) is None:
                setattr(self, field, value)
        for field, valid in (("mode", MODES), ("form", FORMS), ("partner_embeddings", PARTNER),
                             ("input_rule", RULES), ("output_rule", RULES)):
            check_choice(f"strategy_args.dns.{field}", getattr(self, field), valid)
        for side in ("input", "output"):
            rule, value = getattr(self, f"{side}_rule"), getattr(self, f"{side}_threshold")
            if rule == "absolute" and not 0 <= value < math.inf:
                raise ConfigError(f"strategy_args.dns.{side}_threshold: the absolute rule keeps "
                                  f"eigenvalues above a finite value >= 0, got {value}")
            if rule != "absolute" and not 0 < value <= 1:
                raise ConfigError(f"strategy_args.dns.{side}_threshold: must be in (0, 1] for "
                                  f"the {rule} rule (or set {side}_rule: absolute), got {value}")


class DNS(ProjectingStrategy):
    name = "dns"
    across_ranks = "reduced"  # moments summed over the ranks' rows
    Config = DNSConfig

    def __init__(self, config: DNSConfig | None = None) -> None:
        super().__init__(config)
        self.moment_in: dict[str, torch.Tensor] = {}  # sums of x xᵀ of each head's inputs
        self.moment_out: dict[str, torch.Tensor] = {}  # sums of y yᵀ of partner embeddings
        self.moment_self: dict[str, torch.Tensor] = {}  # snapshot and keep_norms: own embeddings
        self.partner_inputs: dict[str, torch.Tensor] = {}  # "m|p": sums of x_p x_pᵀ
        self.count: dict[str, int] = {}
        self.layer_moments: dict[str, torch.Tensor] = {}
        self.layer_count: dict[str, int] = {}
        self.bases: dict[str, HeadBasis] = {}
        self.layer_bases: dict[str, torch.Tensor] = {}
        self.ranks: list[dict[str, Any]] = []
        self.factors: BatchFactors | None = None  # grad mode: each step's X and Δ of the heads
        self.factor_projections = 0

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
            v = union_basis(*(principal_basis(s / self.count[m], cfg.output_rule,
                                              cfg.output_threshold)
                              for s in self.output_moments(model, m)))
            out_dim, in_dim = v.shape[0], u.shape[0]  # in_dim counts a bias column
            form = choose_form(out_dim, in_dim, v.shape[1], u.shape[1], cfg.form)
            dense = (v @ v.T, u @ u.T) if form == "dense" else None  # built once per task
            self.bases[m] = HeadBasis(u, v, form, dense)
            report[m] = {"input": u.shape[1], "input_dim": in_dim,
                         "output": v.shape[1], "output_dim": out_dim, "form": form}
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
        """Keep each step's batch factors of the protected heads (grad mode), unless another
        plugin adds to the loss before backward (a penalty on the weights: G is not Δᵀ X) or
        one before it in the stack edits the gradient (``cflat``, ``gem``: nor is it then)."""
        self._release()
        others = [p for p in strategy.plugins if p is not self]
        before = strategy.plugins[:strategy.plugins.index(self)]
        if (self.config.mode == "grad" and self.config.batch_form
                and distributed.current() is None  # a rank's factors hold its rows only
                and not any(overrides(p, "before_backward") for p in others)
                and not any(overrides(p, "after_backward") for p in before)):
            heads = {m: strategy.model.heads[m] for m in self.bases}
            self.factors = BatchFactors(heads, seed=len(self.ranks))

    def _release(self) -> None:
        if self.factors is not None:
            self.factors.remove()
        self.factors = None

    def before_training_iteration(self, strategy: Any, **kwargs: Any) -> None:
        if self.factors is not None:
            self.factors.clear()

    def project_from_factors(self, name: str, layer: torch.nn.Linear, basis: Any) -> bool:
        if not isinstance(basis, HeadBasis) or self.factors is None \
                or not self.factors.project_(name, layer, basis.u, basis.v, basis.form):
            return False  # factors are kept for the heads only (encoder layers: one-sided)
        self.projections += 1
        self.factor_projections += 1
        return True

    @torch.no_grad()
    def output_moments(self, model: Any, m: str) -> list[torch.Tensor]:
        """Sums of y yᵀ over the old embeddings y that m's head must stay orthogonal to: its
        partners', and with ``keep_norms`` its own, each to be cut on its own (one cut of their
        sum would drop the directions of whichever is smaller in scale)."""
        keep_norms = self.config.keep_norms
        if self.config.partner_embeddings == "snapshot":
            return [self.moment_out[m]] + ([self.moment_self[m]] if keep_norms else [])
        partners = 0
        for key, moment in self.partner_inputs.items():
            owner, partner = key.split("|")
            if owner == m and partner != m:
                w = layer_matrix(model.heads[partner])  # [W | b] on [x, 1] moments
                partners = partners + w @ moment @ w.T
        w = layer_matrix(model.heads[m])
        return [partners] + ([w @ self.moment_in[m] @ w.T] if keep_norms else [])

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
        inputs; C̃_B from A's embeddings and C̃_A from B's, as the heads are now; in one pass
        over the task's data in eval mode."""
        self._release()
        index = strategy.experience_index
        a, b = strategy.scenario.tasks[index].modalities
        model, cfg = strategy.model, self.config
        snapshot = cfg.partner_embeddings == "snapshot"
        layers = {}
        for m in (a, b) if cfg.encoder_layers else ():
            if m in model.encoders:
                layers.update(linear_layers(model.encoders[m], f"encoders.{m}."))

        new: dict[str, dict[str, torch.Tensor]] = {
            "moment_in": {}, "partner_inputs": {}, "moment_out": {}, "moment_self": {}}
        rows = [0]

        def absorb(batch: dict[str, Any]) -> None:
            batch = distributed.local_batch(batch, (a, b))  # under torchrun: this rank's rows
            x = {m: model.backbone(batch[m], m) for m in (a, b)}
            aug = {m: augmented(x[m], model.heads[m]) for m in (a, b)}  # [x, 1] with a bias
            xx = {m: aug[m].T @ aug[m] for m in (a, b)}
            z = {m: model.heads[m](x[m]) for m in (a, b)} if snapshot else {}
            for m, partner in ((a, b), (b, a)):
                self._add(new["moment_in"], m, xx[m])
                self._add(new["partner_inputs"], f"{m}|{partner}", xx[partner])
                if snapshot:  # the paper's C̃: embeddings as they are at the task's end
                    self._add(new["moment_out"], m, z[partner].T @ z[partner])
                    if cfg.keep_norms:
                        self._add(new["moment_self"], m, z[m].T @ z[m])
            rows[0] += len(x[a])

        # the encoders' layers see their inputs while absorb runs the backbones
        moments = input_moments(layers, absorb, strategy.statistics_pass(index))
        world = distributed.current()
        for store, found in new.items():
            for key, value in found.items():
                self._add(getattr(self, store), key, value if world is None else world.sum_(value))
        n = rows[0] if world is None else world.total(rows[0])
        for m in (a, b):
            self.count[m] = self.count.get(m, 0) + n
        for name, (s, n) in moments.items():
            self._add(self.layer_moments, name, s)
            self.layer_count[name] = self.layer_count.get(name, 0) + n

    @staticmethod
    def _add(store: dict[str, torch.Tensor], key: str, value: torch.Tensor) -> None:
        store[key] = value.detach().clone() if key not in store else store[key] + value

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs (tensors and plain containers only)."""
        state = {"moment_in": self.moment_in, "moment_out": self.moment_out,
                 "moment_self": self.moment_self, "partner_inputs": self.partner_inputs,
                 "count": self.count,
                 "layer_moments": self.layer_moments, "layer_count": self.layer_count,
                 "ranks": self.ranks}
        return {key: copy.copy(value) for key, value in state.items()}  # not the live dicts

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)

    def results(self) -> dict[str, Any]:
        cfg = self.config
        return {"preset": cfg.preset, "mode": cfg.mode, "form": cfg.form,
                "partner_embeddings": cfg.partner_embeddings,
                "input_threshold": {"rule": cfg.input_rule, "value": cfg.input_threshold},
                "output_threshold": {"rule": cfg.output_rule, "value": cfg.output_threshold},
                "kept_ranks": self.ranks}
