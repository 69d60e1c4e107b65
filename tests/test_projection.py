"""Gradient-projection strategies checked by their invariants: DNS keeps old cross-modal
scores (raw bilinear ones, those dot scoring evaluates, with bias-free and biased heads), GPM
keeps old head outputs, the low-rank, dense and batch-factor forms agree, and EWC's penalty is
the formula."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from comodal.config import ModalityConfig, RunConfig, TrainConfig
from comodal.core.data import BatchLoader, MultimodalDataset
from comodal.errors import ConfigError
from comodal.platform.run import build_trainer
from comodal.scenarios.task import Scenario, Task
from comodal.strategies.dns import DNS, DNSConfig
from comodal.strategies.ewc import EWC, EWCConfig
from comodal.strategies.finetune import Finetune
from comodal.strategies.gpm import GPM, GPMConfig, grow_basis
from comodal.strategies.projection import kept_rank, principal_basis, project_dual

D = 8  # feature width of every modality and of the joint space


def _orthonormal(d: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(d, k, generator=g, dtype=torch.float64))[0]


def test_low_rank_and_dense_forms_agree() -> None:
    g = torch.Generator().manual_seed(0)
    grad = torch.randn(64, 48, generator=g, dtype=torch.float64)
    for k_in, k_out in ((5, 7), (12, 16), (48, 64), (0, 3)):
        u, v = _orthonormal(48, k_in, 1), _orthonormal(64, k_out, 2)
        dense = project_dual(grad, u, v, form="dense")
        low = project_dual(grad, u, v, form="lowrank")
        assert torch.allclose(dense, low, atol=1e-5)
        assert torch.allclose(v.T @ dense @ u, torch.zeros(k_out, k_in, dtype=torch.float64),
                              atol=1e-10)


def test_thresholds_are_scale_aware() -> None:
    lam = torch.tensor([8.0, 1.0, 0.5, 0.3, 0.2])  # total 10
    assert kept_rank(lam, "energy", 0.8) == 1
    assert kept_rank(lam, "energy", 0.9) == 2
    assert kept_rank(lam, "energy", 0.99) == 5
    assert kept_rank(lam, "relative", 0.1) == 2
    assert kept_rank(lam * 1e-4, "relative", 0.1) == 2  # same rank whatever the feature scale
    assert kept_rank(torch.zeros(3), "energy", 0.9) == 0
    moment = torch.diag(torch.tensor([4.0, 0.0, 1.0]))
    basis = principal_basis(moment, "energy", 0.7)
    assert basis.shape == (3, 1) and basis[0, 0].abs() == 1


def test_gpm_keeps_its_old_basis_and_adds_what_reaches_the_threshold() -> None:
    first = grow_basis(None, torch.diag(torch.tensor([5.0, 3.0, 1.0, 1.0])), 0.7)
    assert first.shape[1] == 2  # 8/10 >= 0.7
    second = grow_basis(first, torch.diag(torch.tensor([0.0, 0.0, 4.0, 1.0])), 0.7)
    assert torch.equal(second[:, :2], first) and second.shape[1] == 3
    assert second[2, 2].abs() == 1  # the new direction is the third axis


# ------------------------------------------------------------------ trainer-level invariants
def _pairs(seed: int, n: int, rank: int | None, d: int = D) -> MultimodalDataset:
    """Three modalities; with ``rank`` the features lie in a rank-``rank`` subspace (old data
    that leaves room to learn), otherwise they are full-rank."""
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(n, rank or d, generator=g)
    columns = {}
    for i, m in enumerate(("a", "b", "c")):
        mix = torch.randn(rank or d, d, generator=torch.Generator().manual_seed(100 + i))
        columns[m] = latent @ mix + (0 if rank else 0.1 * torch.randn(n, d, generator=g))
    return MultimodalDataset(f"toy{seed}", f"toy-{seed}-{n}-{rank}", columns)


def _config(tmp_path: Path, optimizer: str, lr: float, batch: int, epochs: int,
            d: int = D, device: str = "cpu", precision: str = "32", clip: float | None = None,
            **model: Any) -> RunConfig:
    """A toy run's config; ``model`` sets fields of ``config.model`` (score, head_bias, ...)."""
    config = RunConfig(progress=False, device=device,
                       train=TrainConfig(epochs=epochs, batch_size=batch, lr=lr,
                                         optimizer=optimizer, precision=precision,
                                         clip_grad_norm=clip))
    config.data.cache_dir = str(tmp_path)
    config.model.joint_dim = d
    config.model.learnable_temperature = False
    config.model.modalities = {m: ModalityConfig(encoder="features", dim=d) for m in "abc"}
    for key, value in model.items():
        setattr(config.model, key, value)
    return config


def _scenario(first: tuple[str, str], second: tuple[str, str], step_batch: int) -> Scenario:
    return Scenario([
        Task("old", first, _pairs(0, 256, rank=3), _pairs(1, 64, rank=3)),
        Task("new", second, _pairs(2, step_batch, rank=None), _pairs(3, 64, rank=None)),
    ])


def _old_scores(trainer, pair: tuple[str, str]) -> torch.Tensor:  # noqa: ANN001
    """The old task's raw bilinear scores (W_a x_a + b_a)ᵀ(W_b x_b + b_b), the quantity DNS
    keeps."""
    batch = trainer.to_device(trainer._gather_all(trainer.scenario.tasks[0].test))
    with torch.no_grad():
        za, zb = (trainer.model.encode(batch, m, normalize=False) for m in pair)
    return za @ zb.T


def _evaluated_scores(trainer, pair: tuple[str, str]) -> torch.Tensor:  # noqa: ANN001
    """The old task's scores as its evaluation ranks by them: the dot products of what
    ``Trainer.embed`` gives retrieval (the model's scored embeddings)."""
    trainer.dataloader = BatchLoader(trainer.scenario.tasks[0].test, trainer._collate,
                                     trainer.eval_mb_size, 0, shuffle=False)
    z = trainer.embed(0)
    return z[pair[0]] @ z[pair[1]].T


def _score_drift(tmp_path: Path, plugin, optimizer: str, lr: float,  # noqa: ANN001
                 steps: int = 1, device: str = "cpu", precision: str = "32",
                 scores=_old_scores, clip: float | None = None,  # noqa: ANN001
                 **model: Any) -> float:
    """Relative Frobenius change of the old pair's score matrix (``scores``) over ``steps``
    steps of task 2 (on ``device``, training at ``precision``; the scores are taken in
    float32); ``model`` sets fields of ``config.model``."""
    config = _config(tmp_path, optimizer, lr, batch=32, epochs=1, device=device,
                     precision=precision, clip=clip, **model)
    trainer = build_trainer(config, [plugin])
    trainer.setup(_scenario(("a", "b"), ("a", "c"), step_batch=32))
    first, second = trainer.benchmark.train_stream
    trainer.train_cfg.lr = 0.05
    trainer.train_epochs = 20
    trainer.train_experience(first)
    before = scores(trainer, ("a", "b"))
    trainer.train_cfg.lr, trainer.train_epochs = lr, steps
    trainer.train_experience(second)  # 32 rows, batch 32: one step per epoch
    after = scores(trainer, ("a", "b"))
    return ((after - before).norm() / before.norm()).item()


KEEP_ALL = {"input_rule": "relative", "input_threshold": 1e-6,
            "output_rule": "relative", "output_threshold": 1e-6}


@pytest.mark.parametrize("bias", [False, True])
def test_dns_keeps_old_scores_under_sgd_while_finetuning_moves_them(tmp_path: Path,
                                                                    bias: bool) -> None:
    """With ``head_bias`` the heads are [W | b] on [x, 1]: the old inputs' augmented span
    has one more direction (the bias's), and the old scores include the biases."""
    dns = DNS(DNSConfig(mode="grad", **KEEP_ALL))
    kept = _score_drift(tmp_path, dns, "sgd", lr=0.01, head_bias=bias)
    moved = _score_drift(tmp_path, Finetune(), "sgd", lr=0.01, head_bias=bias)
    assert kept < 1e-4
    assert moved > 100 * max(kept, 1e-7)
    assert dns.projections > 0
    assert dns.ranks[-1]["kept"]["a"] == {"input": 3 + bias, "input_dim": D + bias,
                                          "output": 3 + bias, "output_dim": D, "form": "lowrank"}


@pytest.mark.parametrize(("bias", "mode", "optimizer", "lr"),
                         [(False, "grad", "sgd", 0.01), (True, "update", "adamw", 1e-3)])
def test_dns_keeps_the_evaluated_dot_scores_while_finetuning_moves_them(
        tmp_path: Path, bias: bool, mode: str, optimizer: str, lr: float) -> None:
    """``score: dot`` (the CMCL setting: raw dot products, temperature 1, one direction):
    retrieval ranks by the raw bilinear scores DNS keeps, so the evaluated scores of the old
    pair stay put after a projected step, biased heads included."""
    setting = {"score": "dot", "temperature": 1.0, "head_bias": bias,
               "scores": _evaluated_scores}
    dns = DNS(DNSConfig(mode=mode, **KEEP_ALL))
    kept = _score_drift(tmp_path, dns, optimizer, lr=lr, **setting)
    moved = _score_drift(tmp_path, Finetune(), optimizer, lr=lr, **setting)
    assert kept < 1e-4
    assert moved > 100 * max(kept, 1e-7)
    assert dns.projections > 0


def test_update_mode_keeps_old_scores_under_adamw(tmp_path: Path) -> None:
    kept = _score_drift(tmp_path, DNS(DNSConfig(mode="update", **KEEP_ALL)), "adamw", lr=1e-3)
    grad_mode = _score_drift(tmp_path, DNS(DNSConfig(mode="grad", **KEEP_ALL)), "adamw", lr=1e-3)
    moved = _score_drift(tmp_path, Finetune(), "adamw", lr=1e-3)
    assert kept < 1e-4
    assert moved > 100 * max(kept, 1e-7)
    assert grad_mode > 10 * max(kept, 1e-7)  # AdamW's scaling leaves the subspace in grad mode


@pytest.mark.parametrize("bias", [False, True])
def test_gpm_keeps_old_head_outputs(tmp_path: Path, bias: bool) -> None:
    gpm = GPM(GPMConfig(threshold=0.999999, max_threshold=1.0))
    kept = _score_drift(tmp_path, gpm, "sgd", lr=0.01, head_bias=bias)
    assert kept < 1e-4
    assert gpm.ranks[0]["kept"]["heads.a"] == 3 + bias  # [x, 1]: the bias direction too


def test_dns_moments_come_from_the_tasks_own_pair(tmp_path: Path) -> None:
    """On a three-modality dataset with pair (first, third), the reference code's mistake
    (moments of the dataset's first two modalities) would fill in the second modality."""
    dns = DNS(DNSConfig(partner_embeddings="snapshot"))
    trainer = build_trainer(_config(tmp_path, "sgd", 0.01, batch=32, epochs=1), [dns])
    trainer.setup(_scenario(("a", "c"), ("a", "b"), step_batch=32))
    trainer.train_experience(trainer.benchmark.train_stream[0])
    assert set(dns.count) == {"a", "c"} and "b" not in dns.moment_in
    data = trainer.scenario.tasks[0].train
    xa, xc = data.columns["a"], data.columns["c"]
    with torch.no_grad():
        za = trainer.model.heads["a"](xa)
    assert torch.allclose(dns.moment_in["c"], xc.T @ xc, rtol=1e-4, atol=1e-3)
    assert torch.allclose(dns.moment_out["c"], za.T @ za, rtol=1e-4, atol=1e-3)
    assert dns.count["a"] == len(data)


def test_projection_changes_the_gradient_when_there_is_something_to_protect(
    tmp_path: Path,
) -> None:
    dns = DNS(DNSConfig(mode="grad", **KEEP_ALL))
    trainer = build_trainer(_config(tmp_path, "sgd", 0.01, batch=32, epochs=1), [dns])
    trainer.setup(_scenario(("a", "b"), ("a", "c"), step_batch=32))
    first, second = trainer.benchmark.train_stream
    trainer.train_experience(first)
    trainer.experience_index = 1
    dns.before_training_exp(trainer)
    trainer.mbatch = trainer._gather_all(trainer.scenario.tasks[1].train)
    trainer.mbatch["task_id"] = 1
    za, zc = (trainer.model.encode(trainer.mbatch, m) for m in ("a", "c"))
    trainer.criterion(za, zc, trainer.model.scale).backward()
    grad = trainer.model.heads["a"].weight.grad.clone()
    dns.after_backward(trainer)
    projected = trainer.model.heads["a"].weight.grad
    u, v = dns.bases["a"].u, dns.bases["a"].v
    assert not torch.allclose(grad, projected)
    assert (v.T @ grad @ u).norm() > 1e-3
    assert (v.T @ projected @ u).norm() < 1e-5
    assert "c" not in dns.bases  # never trained: nothing to protect


def test_ewc_penalty_is_the_formula_and_limits_drift(tmp_path: Path) -> None:
    ewc = EWC(EWCConfig(ewc_lambda=1e4))  # a converged InfoNCE has a Fisher of about 1e-3
    drift = _score_drift(tmp_path, ewc, "sgd", lr=0.01, steps=50)
    assert ewc.anchors and all((f >= 0).all() for _, f in ewc.anchors[0].values())
    moved = _score_drift(tmp_path, Finetune(), "sgd", lr=0.01, steps=50)
    assert drift < 0.6 * moved  # the penalty pulls back only once θ has left θ*
    model = torch.nn.Linear(2, 1, bias=False)
    ewc2 = EWC(EWCConfig(ewc_lambda=4.0))
    ewc2.anchors = [{"weight": (torch.tensor([[1.0, 2.0]]), torch.tensor([[0.5, 3.0]]))}]
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[2.0, 0.0]]))
    assert ewc2.penalty(model).item() == pytest.approx(4.0 / 2 * (0.5 * 1 + 3.0 * 4))


def test_protecting_what_does_not_exist_is_a_clear_error(tmp_path: Path) -> None:
    config = _config(tmp_path, "sgd", 0.01, batch=32, epochs=1)
    with pytest.raises(ConfigError, match="modality 'smell' has no head"):
        build_trainer(config, [DNS(DNSConfig(modalities=["smell"]))])
    config.model.modalities["a"] = ModalityConfig(encoder="features", dim=D)
    with pytest.raises(ConfigError, match="layer 'heads' is ModuleDict, not an nn.Linear"):
        build_trainer(config, [GPM(GPMConfig(layers=["heads"]))])
    with pytest.raises(ConfigError, match="strategy_args.dns.mode: unknown value 'both'"):
        DNSConfig(mode="both")


def test_dns_projects_linear_layers_of_trainable_encoders(tmp_path: Path) -> None:
    dns = DNS(DNSConfig(mode="grad", encoder_layers=True, **KEEP_ALL))
    trainer = build_trainer(_config(tmp_path, "sgd", 0.01, batch=32, epochs=2), [dns])
    encoder = torch.nn.Sequential(torch.nn.Linear(D, D), torch.nn.Tanh())
    trainer.model.encoders["a"] = encoder
    trainer.setup(_scenario(("a", "b"), ("a", "c"), step_batch=32))
    first, second = trainer.benchmark.train_stream
    trainer.train_experience(first)
    assert set(dns.layer_moments) == {"encoders.a.0"}
    before = encoder(trainer.scenario.tasks[0].test.columns["a"]).detach()
    trainer.train_cfg.lr = 0.01
    trainer.train_experience(second)
    assert dns.ranks[-1]["kept"]["encoders.a.0"]["input"] == 4  # 3 + the bias direction
    after = encoder(trainer.scenario.tasks[0].test.columns["a"]).detach()
    assert ((after - before).norm() / before.norm()).item() < 1e-4


def test_strategy_state_is_plain_tensors_and_round_trips(tmp_path: Path) -> None:
    dns, gpm, ewc = DNS(), GPM(), EWC()
    trainer = build_trainer(_config(tmp_path, "adamw", 0.01, batch=32, epochs=1),
                            [dns, gpm, ewc])
    assert trainer._hooks["after_backward"] == [dns.after_backward, gpm.after_backward]
    assert trainer._hooks["before_backward"] == [ewc.before_backward]
    trainer.fit(_scenario(("a", "b"), ("a", "c"), step_batch=32))
    for plugin, fresh in ((dns, DNS()), (gpm, GPM()), (ewc, EWC())):
        path = tmp_path / f"{plugin.name}.pt"
        torch.save(plugin.state_dict(), path)
        fresh.load_state_dict(torch.load(path, weights_only=True))
        for key, value in plugin.state_dict().items():
            assert str(fresh.state_dict()[key]) == str(value), (plugin.name, key)


def test_dense_form_keeps_old_scores_too(tmp_path: Path) -> None:
    dns = DNS(DNSConfig(mode="update", form="dense", **KEEP_ALL))
    assert _score_drift(tmp_path, dns, "adamw", lr=1e-3) < 1e-4
    assert dns.ranks[-1]["kept"]["a"]["form"] == "dense"
    assert dns.bases["a"].dense is not None  # projectors built once per task


@pytest.mark.parametrize("rank,batch,bias,clip", [(40, 8, False, None), (4, 16, False, None),
                                                  (40, 8, True, 1e-3)])
def test_batch_rank_form_equals_the_low_rank_projection(tmp_path: Path, rank: int, batch: int,
                                                        bias: bool, clip: float | None) -> None:
    """Old data of rank 40 (4) in 64 dimensions and steps of 8 (16) rows: the batch form is
    cheaper, through the batch rows (through the rank-4 core). It projects [∇W | ∇b] of a
    biased head through [X, 1], and a clipped gradient c Δᵀ X through c Δ."""
    weights = []
    for batch_form in (True, False):
        dns = DNS(DNSConfig(mode="grad", batch_form=batch_form, **KEEP_ALL))
        trainer = build_trainer(_config(tmp_path, "sgd", 0.01, batch=batch, epochs=2, d=64,
                                        clip=clip, head_bias=bias), [dns])
        trainer.setup(Scenario([
            Task("old", ("a", "b"), _pairs(0, 256, rank, 64), _pairs(1, 64, rank, 64)),
            Task("new", ("a", "c"), _pairs(2, 32, None, 64), _pairs(3, 64, None, 64)),
        ]))
        for exp in trainer.benchmark.train_stream:
            trainer.train_experience(exp)
        assert (dns.factor_projections > 0) == batch_form
        assert dns.ranks[-1]["kept"]["a"]["input"] == rank + bias
        head = trainer.model.heads["a"]
        weights.append(torch.cat([head.weight.detach()]
                                 + ([head.bias.detach()[:, None]] if bias else []), dim=1))
    assert torch.allclose(weights[0], weights[1], atol=1e-5)


def test_batch_rank_form_is_off_when_another_plugin_edits_the_loss(tmp_path: Path) -> None:
    dns = DNS(DNSConfig(mode="grad", **KEEP_ALL))
    trainer = build_trainer(_config(tmp_path, "sgd", 0.01, batch=32, epochs=1), [dns, EWC()])
    trainer.setup(_scenario(("a", "b"), ("a", "c"), step_batch=32))
    trainer.train_experience(trainer.benchmark.train_stream[0])
    trainer.experience_index = 1
    dns.before_training_exp(trainer)
    assert dns.factors is None


class PenaltyOnHead(Finetune):
    """Adds a loss term on a head's weights after the forward pass."""

    def after_forward(self, strategy, **kwargs) -> None:  # noqa: ANN001
        strategy.loss = strategy.loss + 10.0 * strategy.model.heads["a"].weight.square().sum()


def test_batch_rank_form_falls_back_when_the_gradient_is_not_its_factors(tmp_path: Path) -> None:
    dns = DNS(DNSConfig(mode="grad", **KEEP_ALL))
    trainer = build_trainer(_config(tmp_path, "sgd", 0.01, batch=8, epochs=1, d=64),
                            [PenaltyOnHead(), dns])
    trainer.setup(Scenario([
        Task("old", ("a", "b"), _pairs(0, 256, 40, 64), _pairs(1, 64, 40, 64)),
        Task("new", ("a", "c"), _pairs(2, 8, None, 64), _pairs(3, 64, None, 64)),
    ]))
    first, second = trainer.benchmark.train_stream
    trainer.train_experience(first)
    before = _old_scores(trainer, ("a", "b"))
    trainer.train_experience(second)
    after = _old_scores(trainer, ("a", "b"))
    assert dns.factor_projections == 0 and dns.projections > 0
    assert ((after - before).norm() / before.norm()).item() < 1e-4


def test_gpm_basis_stays_orthonormal_at_full_threshold() -> None:
    g = torch.Generator().manual_seed(8)
    basis = None
    for rank in (3, 4):
        x = torch.randn(50, rank, generator=g, dtype=torch.float64) @ torch.randn(
            rank, 8, generator=g, dtype=torch.float64)
        basis = grow_basis(basis, x.T @ x / 50, 1.0)
    assert basis.shape[1] <= 7
    assert torch.allclose(basis.T @ basis, torch.eye(basis.shape[1], dtype=torch.float64),
                          atol=1e-8)
