"""gem and agem: the projected gradient against independently computed memory gradients (GEM:
the primal QP solved by enumerating active sets; A-GEM: its closed form), untouched gradients
without a conflict, and tiny runs on pair and class-incremental streams, killed and resumed."""

from __future__ import annotations

import copy
import itertools
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import Kill, class_incremental, load_dict

from comodal.config import ModalityConfig, RunConfig, from_dict
from comodal.core.data import MultimodalDataset
from comodal.errors import ConfigError
from comodal.platform.run import build_trainer, identity
from comodal.platform.trainer import Trainer
from comodal.scenarios.registry import build_scenario
from comodal.scenarios.task import Scenario, Task
from comodal.strategies.agem import AGEM, AGEMConfig
from comodal.strategies.gem import GEM, GEMConfig, MemoryGradients

PAIRS = [("a", "b"), ("b", "c"), ("a", "c"), ("a", "b")]


# ----------------------------------------------------------------------------- hand-built
def _task(i: int, kind: str) -> Task:
    def rows(seed: int, n: int) -> MultimodalDataset:
        g = torch.Generator().manual_seed(seed)
        labels = torch.arange(2 * i, 2 * i + 2).repeat(n // 2)
        return MultimodalDataset(f"t{i}", f"gem-test-{kind}-{seed}",
                                 {m: torch.randn(n, 8, generator=g) for m in "abc"}, labels)

    modalities = ("a",) if kind == "classify" else PAIRS[i]
    return Task(f"t{i}", modalities, rows(10 * i, 12), rows(10 * i + 1, 4), kind=kind,
                classes=[2 * i, 2 * i + 1] if kind == "classify" else None)


def _trainer(plugin: MemoryGradients, kind: str, tmp_path: Path) -> Trainer:
    """A real trainer at the step of task 3 of 4, the plugin's memory filled after tasks 0-2
    by its own ``after_training_exp``, the model moved off its initialisation."""
    config = RunConfig(progress=False)
    config.data.cache_dir = str(tmp_path)
    config.model.joint_dim = 8
    config.model.modalities = {m: ModalityConfig(encoder="features", dim=8) for m in "abc"}
    trainer = build_trainer(config, [plugin])
    trainer.setup(Scenario([_task(i, kind) for i in range(4)]))
    trainer.grow_classes(range(4))
    with torch.no_grad():
        for p in trainer.model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    for t in range(4):
        trainer.experience_index = t
        plugin.before_training_exp(trainer)
        if t < 3:
            plugin.after_training_exp(trainer)
    trainer.model.train()
    return trainer


def _params(trainer: Trainer) -> list[torch.nn.Parameter]:
    return [p for p in trainer.model.parameters() if p.requires_grad]


def _task_gradient(trainer: Trainer, rows_by_task: dict[int, torch.Tensor]) -> torch.Tensor:
    """The gradient of Σ_k n_k/N · loss_k over the memory rows of each task k, written out:
    symmetric InfoNCE over a pair's two embeddings, cross-entropy over every class grown."""
    model, params = trainer.model, _params(trainer)
    total = sum(len(r) for r in rows_by_task.values())
    loss = 0.0
    for k, rows in rows_by_task.items():
        task = trainer.scenario.tasks[k]
        batch = {m: task.train.columns[m][rows] for m in task.modalities}
        if task.kind == "classify":
            logits = model.classify(model.encode(batch, "a", normalize=False))
            term = F.cross_entropy(logits, model.class_rows(task.train.labels[rows]))
        else:
            za, zb = (model.encode(batch, m) for m in task.modalities)
            logits = model.scale * za @ zb.T
            target = torch.arange(len(rows))
            term = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        loss = loss + len(rows) / total * term
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1)
                      for g, p in zip(grads, params, strict=True)]).double()


def _memory(trainer: Trainer, plugin: MemoryGradients) -> torch.Tensor:
    """One row per past task: its memory loss's gradient (every memory row of it)."""
    buffer = plugin.buffer
    return torch.stack([_task_gradient(trainer, {k: buffer.index[buffer.task == k]})
                        for k in range(3)])


def _set_grad(trainer: Trainer, flat: torch.Tensor) -> None:
    params = _params(trainer)
    for p, part in zip(params, flat.float().split([p.numel() for p in params]), strict=True):
        p.grad = part.view_as(p).clone()


def _grad(trainer: Trainer) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in _params(trainer)]).double()


def _cosines(memory: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """cos(g_k, g) of each memory gradient g_k with g (float32 gradients: compared at 1e-6)."""
    return memory @ g / (memory.norm(dim=1) * g.norm())


def _primal(g: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
    """argmin ||x - g||² s.t. memory @ x >= 0, by enumerating active sets A: x = g + G_Aᵀλ
    with G_A x = 0, kept where λ >= 0 and every constraint holds (the KKT point)."""
    found = []
    for size in range(len(memory) + 1):
        for active in itertools.combinations(range(len(memory)), size):
            ga = memory[list(active)]
            lam = torch.linalg.solve(ga @ ga.T, -ga @ g) if size else g.new_zeros(0)
            x = g + ga.T @ lam
            if bool((lam >= -1e-12).all()) and bool((memory @ x >= -1e-9).all()):
                found.append(x)
    return min(found, key=lambda x: float((x - g).norm()))


@pytest.mark.parametrize("kind", ["pair", "classify"])
def test_gem_projection_solves_the_primal_qp_on_real_memory_gradients(
        kind: str, tmp_path: Path) -> None:
    gem = GEM(from_dict(GEMConfig, {"size": 18, "margin": 0.0, "eps": 1e-9}))
    trainer = _trainer(gem, kind, tmp_path)
    memory = _memory(trainer, gem)
    torch.manual_seed(0)
    # against task 0's and task 1's gradients, along task 2's: some constraints bind
    g = torch.randn(memory.shape[1], dtype=torch.float64) * memory.norm(dim=1).mean() * 0.3
    g = g - 1.5 * memory[0] - 0.8 * memory[1] + 0.5 * memory[2]
    _set_grad(trainer, g)
    g = _grad(trainer)  # as float32 holds it
    assert (memory @ g < 0).sum() >= 1
    gem.after_backward(trainer)
    projected = _grad(trainer)
    assert (_cosines(memory, projected) >= -1e-6).all(), _cosines(memory, projected)
    torch.testing.assert_close(projected, _primal(g, memory), rtol=1e-5, atol=1e-5)
    assert gem.projected == [0, 0, 0, 1] and gem.steps == [0, 0, 0, 1]


def test_gem_margin_keeps_every_constraint_and_adds_memory_gradients(tmp_path: Path) -> None:
    gem = GEM(from_dict(GEMConfig, {"size": 18, "eps": 1e-9}))  # margin 0.5, GEM's default
    trainer = _trainer(gem, "pair", tmp_path)
    memory = _memory(trainer, gem)
    g = -memory[0] + 0.2 * memory[1]
    _set_grad(trainer, g)
    g = _grad(trainer)
    gem.after_backward(trainer)
    projected = _grad(trainer)
    assert (_cosines(memory, projected) >= -1e-6).all()
    # g̃ - g = Gᵀv with every v_k >= margin: solve for v by least squares
    v = torch.linalg.lstsq(memory.T, (projected - g).unsqueeze(1)).solution.flatten()
    assert (v >= 0.5 - 1e-4).all(), v


@pytest.mark.parametrize("cls,config", [(GEM, GEMConfig), (AGEM, AGEMConfig)])
def test_a_gradient_without_conflict_is_left_bit_for_bit(cls: type, config: type,
                                                         tmp_path: Path) -> None:
    plugin = cls(from_dict(config, {"size": 18}))
    trainer = _trainer(plugin, "pair", tmp_path)
    memory = _memory(trainer, plugin)
    # G g = 1 for every past task (and so for any weighted sum of them)
    g = memory.T @ torch.linalg.solve(memory @ memory.T, torch.ones(3, dtype=torch.float64))
    _set_grad(trainer, g)
    trainer.model.heads["c"].weight.grad = None  # a missing gradient stays missing
    before = [None if p.grad is None else p.grad.clone() for p in _params(trainer)]
    plugin.after_backward(trainer)
    for p, old in zip(_params(trainer), before, strict=True):
        assert (p.grad is None) if old is None else torch.equal(p.grad, old)
    assert plugin.projected[3] == 0 and plugin.steps[3] == 1


def test_agem_projects_out_the_reference_gradient_when_they_conflict(tmp_path: Path) -> None:
    # every slot drawn (memory_batch >= 19), unequal shares per task, so the weights matter
    agem = AGEM(from_dict(AGEMConfig, {"size": 19}))
    trainer = _trainer(agem, "pair", tmp_path)
    buffer = agem.buffer
    assert torch.bincount(buffer.task).tolist() == [7, 6, 6]
    reference = _task_gradient(trainer, {k: buffer.index[buffer.task == k] for k in range(3)})
    torch.manual_seed(1)
    g = torch.randn(len(reference), dtype=torch.float64) * reference.norm() * 0.1 - reference
    _set_grad(trainer, g)
    g = _grad(trainer)
    assert g @ reference < 0
    agem.after_backward(trainer)
    projected = _grad(trainer)
    expected = g - (g @ reference) / (reference @ reference) * reference
    torch.testing.assert_close(projected, expected, rtol=1e-5, atol=1e-6)
    assert abs(float(projected @ reference)) < 1e-5 * float(g.norm() * reference.norm())
    assert agem.projected[3] == 1


def test_bad_options_are_clear_errors() -> None:
    with pytest.raises(ConfigError, match=r"strategy_args\.gem\.eps: must be > 0"):
        from_dict(GEMConfig, {"eps": 0}, "strategy_args.gem")
    with pytest.raises(ConfigError, match=r"strategy_args\.agem\.memory_batch: must be >= 1"):
        from_dict(AGEMConfig, {"memory_batch": 0}, "strategy_args.agem")
    with pytest.raises(ConfigError, match=r"strategy_args\.gem\.policy"):
        from_dict(GEMConfig, {"policy": "fifo"}, "strategy_args.gem")


# ----------------------------------------------------------------------------- runs
def _fit(config: object, plugin: MemoryGradients, kill_at: int | None = None,
         checkpoints: Path | None = None) -> dict[str, torch.Tensor]:
    trainer = build_trainer(config, [plugin, Kill(kill_at)])
    return trainer.fit(build_scenario(config), checkpoints, identity(config))


def test_gem_on_pairs_resumes_to_the_uninterrupted_run_and_agem_runs(tiny: dict,
                                                                     tmp_path: Path) -> None:
    tiny["train"]["epochs"] = 1
    tiny["scenario"]["tasks"] = tiny["scenario"]["tasks"][:3]
    config = load_dict(tiny, tmp_path)
    steps = -(-300 // 64)  # batches per task

    whole_gem = GEM(from_dict(GEMConfig, {"size": 30}))
    whole = _fit(config, whole_gem)
    assert whole_gem.steps == [0, steps, steps] and sum(whole_gem.projected) > 0
    assert torch.bincount(whole_gem.buffer.task).tolist() == [10, 10, 10]
    checkpoints = tmp_path / "checkpoints"
    with pytest.raises(KeyboardInterrupt):
        _fit(config, GEM(from_dict(GEMConfig, {"size": 30})), 2, checkpoints)
    resumed_gem = GEM(from_dict(GEMConfig, {"size": 30}))
    resumed = _fit(config, resumed_gem, None, checkpoints)
    for metric in whole:
        assert torch.equal(whole[metric].nan_to_num(-1), resumed[metric].nan_to_num(-1)), metric
    assert resumed_gem.results() == whole_gem.results()

    agem = AGEM(from_dict(AGEMConfig, {"size": 30}))
    recalls = _fit(config, agem)["recall@1"]
    assert torch.isfinite(recalls).all()
    assert agem.steps == [0, steps, steps] and sum(agem.projected) > 0


def test_gem_keeps_old_classes_on_a_class_incremental_stream(tiny: dict, tmp_path: Path) -> None:
    base = class_incremental(tiny)
    base["train"].update(epochs=2, lr=0.005)
    final = {}
    for plugin in (None, GEM(from_dict(GEMConfig, {"size": 24})),
                   AGEM(from_dict(AGEMConfig, {"size": 24}))):
        config = load_dict(copy.deepcopy(base), tmp_path)
        trainer = build_trainer(config, [] if plugin is None else [plugin])
        accuracy = trainer.fit(build_scenario(config))["accuracy"]
        assert torch.isfinite(accuracy).all()
        final[plugin.name if plugin else "finetune"] = accuracy[-1, :-1].mean().item()
        if plugin is not None:
            assert plugin.steps[0] == 0 and min(plugin.steps[1:]) > 0
            assert sum(plugin.projected) > 0
    # finetune forgets the old classes; GEM's constraints keep some of them
    assert final["finetune"] < 0.05 and final["gem"] > final["finetune"] + 0.1, final
