"""cflat: the C-Flat gradient against a direct computation of the paper's formulas, radius 0 as
the base step bit for bit, stacks, its place in a stack, 16-mixed refused, and exact resume."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from helpers import Kill, class_incremental, load_dict
from torch.func import functional_call

from comodal.config import RunConfig
from comodal.errors import ConfigError
from comodal.platform.run import build_trainer, identity
from comodal.platform.trainer import Trainer
from comodal.scenarios.registry import build_scenario
from comodal.strategies.base import Strategy
from comodal.strategies.cflat import CFlat, CFlatConfig
from comodal.strategies.registry import build_strategies, validate_strategies

RHO, LAM, LR = 0.3, 0.5, 0.1


class HandBuilt:
    """The trainer's side of what cflat uses, on a small float64 model with batch norm and a
    cross-entropy loss on one fixed batch: ``compute_gradients`` (zero, forward, loss,
    backward) and ``clip_gradients`` (``train.clip_grad_norm``)."""

    def __init__(self, clip: float | None) -> None:
        g = torch.Generator().manual_seed(0)
        torch.manual_seed(0)
        self.model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6),
                                         torch.nn.Tanh(), torch.nn.Linear(6, 3)).double()
        self.x = torch.randn(10, 4, generator=g, dtype=torch.float64)
        self.y = torch.randint(0, 3, (10,), generator=g)
        self.train_cfg = SimpleNamespace(clip_grad_norm=clip, precision="32")
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=LR)
        self.loss, self.outputs, self.side_outputs = None, None, []
        self._mb_output, self._replaced, self.passes = None, False, 0

    def compute_gradients(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.side_outputs, self._mb_output, self._replaced = [], None, False
        self.outputs = self.model(self.x)
        self.loss = F.cross_entropy(self.outputs, self.y)
        self.loss.backward()
        self.passes += 1

    step_kept = Trainer.step_kept

    def clip_gradients(self) -> None:
        if self.train_cfg.clip_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.train_cfg.clip_grad_norm)


def direct_cflat(trainer: HandBuilt, theta: dict[str, torch.Tensor],
                 buffers: dict[str, torch.Tensor]) -> torch.Tensor:
    """C-Flat's gradient, flattened, straight from its formulas with torch.autograd (ε = 0):
    g₁ at θ + ρ ĝ₀, g₂ at θ + e₁ with e₁ = ρ (g₁ - g₀)^, g₃ at θ + e₁ + ρ ĝ₂; g₁ + λ (g₃ - g₂)."""
    names = list(theta)
    shapes = [theta[n].shape for n in names]
    flat = torch.cat([theta[n].reshape(-1) for n in names])

    def grad(w: torch.Tensor) -> torch.Tensor:
        w = w.detach().requires_grad_()
        point = dict(zip(names, w.split([math.prod(s) for s in shapes]), strict=True))
        point = {n: v.view(s) for (n, v), s in zip(point.items(), shapes, strict=True)}
        copies = {n: b.clone() for n, b in buffers.items()}  # batch norm updates its own
        out = functional_call(trainer.model, {**point, **copies}, (trainer.x,))
        return torch.autograd.grad(F.cross_entropy(out, trainer.y), w)[0]

    def unit(v: torch.Tensor) -> torch.Tensor:
        return v / v.norm()

    g0 = grad(flat)
    g1 = grad(flat + RHO * unit(g0))
    e1 = RHO * unit(g1 - g0)
    g2 = grad(flat + e1)
    g3 = grad(flat + e1 + RHO * unit(g2))
    return g1 + LAM * (g3 - g2)


@pytest.mark.parametrize("clip", [None, 0.05])
def test_one_step_writes_the_c_flat_gradient_and_sgd_steps_from_the_same_weights(
        clip: float | None) -> None:
    trainer = HandBuilt(clip)
    cflat = CFlat(CFlatConfig(rho=RHO, flatness_weight=LAM))
    trainer.compute_gradients()  # the training step's pass, then its clipping
    trainer.clip_gradients()
    theta = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    buffers = {n: b.clone() for n, b in trainer.model.named_buffers()}
    loss, outputs = trainer.loss, trainer.outputs
    cflat.after_backward(trainer)
    # three gradients at perturbed weights, and g₀ once more at θ when the step's was clipped
    assert trainer.passes == (4 if clip is None else 5)
    assert cflat.steps == 1
    for n, p in trainer.model.named_parameters():
        assert torch.equal(p, theta[n]), n  # put back exactly, not by subtraction
    for n, b in trainer.model.named_buffers():
        assert torch.equal(b, buffers[n]), n  # batch norm moved in the step's pass only
    assert trainer.loss is loss and trainer.outputs is outputs  # the step's own pass
    written = torch.cat([p.grad.reshape(-1) for p in trainer.model.parameters()])
    expected = direct_cflat(trainer, theta, buffers)
    if clip is not None:
        assert expected.norm() > 2 * clip  # so the clipping below is real
        expected = expected * clip / (expected.norm() + 1e-6)  # clip_grad_norm_'s factor
    torch.testing.assert_close(written, expected, rtol=1e-9, atol=1e-12)
    trainer.optimizer.step()
    for n, p in trainer.model.named_parameters():
        assert torch.equal(p, theta[n].add(p.grad, alpha=-LR)), n  # SGD: θ - lr g


def test_the_flatness_term_changes_the_gradient() -> None:
    """λ = 0 is SAM's gradient g₁; λ > 0 differs from it by λ (g₃ - g₂), which is not 0."""
    grads = {}
    for lam in (0.0, LAM):
        trainer = HandBuilt(None)
        trainer.compute_gradients()
        CFlat(CFlatConfig(rho=RHO, flatness_weight=lam)).after_backward(trainer)
        grads[lam] = torch.cat([p.grad.reshape(-1) for p in trainer.model.parameters()])
    assert (grads[LAM] - grads[0.0]).norm() > 1e-3 * grads[0.0].norm()


# ----------------------------------------------------------------------------- runs
def _pairs(tiny: dict, tmp_path: Path, stack: list[str], **args: dict) -> RunConfig:
    """The tiny pair config on its first two tasks (vision-text, then audio-text: the text
    head is shared), one epoch."""
    tiny["scenario"]["tasks"] = tiny["scenario"]["tasks"][:2]
    tiny["train"]["epochs"] = 1
    tiny["strategies"] = stack
    tiny["strategy_args"] = args
    return load_dict(tiny, tmp_path)


def _fit(config: RunConfig, *extra: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    trainer = build_trainer(config, [*build_strategies(config.strategies,
                                                       config.strategy_args), *extra])
    return trainer, trainer.fit(build_scenario(config))


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for metric in a:
        assert torch.equal(a[metric].nan_to_num(-1), b[metric].nan_to_num(-1)), metric


class Watch(Strategy):
    """After cflat in the stack: counts each step's passes (its ``before_backward`` runs in
    every one) and checks, before the optimizer steps, that the weights are those the step
    started from and that the loss is the step's first pass's."""

    name = "watch"

    def __init__(self) -> None:
        super().__init__()
        self.passes: list[int] = []
        self.restored: list[bool] = []

    def before_training_iteration(self, strategy: Any, **kwargs: Any) -> None:
        self.weights = [p.detach().clone() for p in strategy.model.parameters()]
        self.passes.append(0)

    def before_backward(self, strategy: Any, **kwargs: Any) -> None:
        if not self.passes[-1]:
            self.loss = strategy.loss
        self.passes[-1] += 1

    def before_update(self, strategy: Any, **kwargs: Any) -> None:
        same = all(torch.equal(a, b) for a, b in zip(self.weights, strategy.model.parameters(),
                                                     strict=True))
        self.restored.append(same and strategy.loss is self.loss)


@pytest.mark.parametrize("base", [["finetune"], ["dns"]])
def test_radius_zero_is_the_base_step_bit_for_bit(tiny: dict, tmp_path: Path,
                                                  base: list[str]) -> None:
    plain, plain_metrics = _fit(_pairs(tiny, tmp_path, base))
    stack = ["cflat"] + [n for n in base if n != "finetune"]
    watch = Watch()
    flat, flat_metrics = _fit(_pairs(tiny, tmp_path, stack, cflat={"rho": 0}), watch)
    assert watch.passes == [1] * 10  # no extra pass at all
    _same(plain_metrics, flat_metrics)
    assert plain.history == flat.history
    state = flat.model.state_dict()
    for key, value in plain.model.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert flat.plugins[0].results() == {"rho": 0.0, "flatness_weight": 0.2, "steps": 0}


@pytest.mark.parametrize("kind,stack", [("pairs", ["cflat", "dns"]),
                                        ("pairs", ["cflat", "er", "ewc"]),
                                        ("pairs", ["cflat", "derpp"]),
                                        ("pairs", ["cflat", "cila"]),
                                        ("pairs", ["cflat", "gem"]),
                                        ("classes", ["cflat", "er"]),
                                        # kd distils the trained conv encoder's output: the
                                        # teacher's, caught once, serves the four passes
                                        ("classes-conv", ["cflat", "coconut", "kd"])])
def test_stacks_train_end_to_end_with_every_step_flattened(tiny: dict, tmp_path: Path,
                                                           kind: str, stack: list[str]) -> None:
    watch = Watch()
    if kind.startswith("classes"):  # 3 tasks of 8 classes, 7 steps each
        config = class_incremental(tiny)
        config["train"]["epochs"], config["strategies"] = 1, stack
        if kind == "classes-conv":
            config["model"]["modalities"]["vision"] = {"encoder": "conv"}
        trainer, metrics = _fit(load_dict(config, tmp_path), watch)
    else:
        trainer, metrics = _fit(_pairs(tiny, tmp_path, stack), watch)
    steps = len(watch.passes)
    assert steps == len(trainer.history) * (5 if kind == "pairs" else 7)  # batches of 64
    assert all(torch.isfinite(m[1:]).all() for m in metrics.values())
    assert watch.passes == [4] * steps and all(watch.restored)
    assert trainer.plugins[0].results() == {"rho": 0.2, "flatness_weight": 0.2, "steps": steps}
    if kind == "pairs":
        recall = metrics["recall@10"]
        assert recall[1, 0] > recall[0, 0] + 0.03  # it descends: the first pair was learnt


# ----------------------------------------------------------------------------- refusals
def test_cflat_comes_first_in_a_stack() -> None:
    validate_strategies(["cflat", "er", "dns"], {})
    validate_strategies(["joint", "cflat"], {})
    for names in (["er", "cflat"], ["dns", "cflat"], ["joint", "er", "cflat"]):
        with pytest.raises(ConfigError, match="'cflat' must come first"):
            validate_strategies(names, {})
    for field in ("rho", "flatness_weight"):
        with pytest.raises(ConfigError, match=f"strategy_args.cflat.{field}"):
            validate_strategies(["cflat"], {"cflat": {field: -0.1}})


def test_16_mixed_is_refused_before_training(tiny: dict, tmp_path: Path) -> None:
    tiny["train"]["precision"] = "16-mixed"
    watch = Watch()
    with pytest.raises(ConfigError, match=r"cflat.*train\.precision 16-mixed"):
        _fit(_pairs(tiny, tmp_path, ["cflat"]), watch)
    assert watch.passes == []


# ----------------------------------------------------------------------------- resume
def test_a_killed_cflat_er_run_resumes_to_the_uninterrupted_metrics(tiny: dict,
                                                                     tmp_path: Path) -> None:
    config = _pairs(tiny, tmp_path, ["cflat", "er"])
    scenario = build_scenario(config)

    def trainer(kill_at: int | None):  # noqa: ANN202
        return build_trainer(config, [*build_strategies(config.strategies, {}), Kill(kill_at)])

    whole_trainer = trainer(None)
    whole = whole_trainer.fit(scenario)
    checkpoints = tmp_path / "checkpoints"
    with pytest.raises(KeyboardInterrupt):
        trainer(1).fit(scenario, checkpoints, identity(config))
    resumed_trainer = trainer(None)
    _same(whole, resumed_trainer.fit(scenario, checkpoints, identity(config)))
    assert resumed_trainer.plugins[0].results() == whole_trainer.plugins[0].results()
