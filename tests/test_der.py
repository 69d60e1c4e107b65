"""der and derpp: reservoir offers, outputs stored at insertion and never changed after, the
loss terms against a direct computation, end-to-end runs and exact resume."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import Kill, class_incremental, load_dict

from comodal.config import ModalityConfig, RunConfig, TrainConfig, from_dict
from comodal.core.data import MultimodalDataset, gather_parts
from comodal.errors import ConfigError
from comodal.platform.run import build_trainer, identity, run
from comodal.platform.trainer import Trainer
from comodal.scenarios.registry import build_scenario
from comodal.scenarios.task import Scenario, Task
from comodal.strategies.base import Strategy
from comodal.strategies.buffers import ReplayBuffer
from comodal.strategies.der import DER, DERPP, DERConfig, DERPPConfig, distilled, squared_error


# ----------------------------------------------------------------------------- reservoir
def test_reservoir_offer_keeps_min_n_c_rows_each_with_probability_c_over_n() -> None:
    c, n, trials = 10, 50, 1000
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(n)
    for _ in range(trials):
        buffer = ReplayBuffer(c, "reservoir")
        for part in torch.arange(n).split([7, 3, 20, 1, 19]):  # per-step offers of any size
            slot = buffer.offer(0, part, -torch.ones_like(part), g)
            # the slot returned for each row holds it after the offer; -1: not kept, or
            # displaced by a later row of the same offer
            kept = slot >= 0
            assert torch.equal(buffer.index[slot[kept]], part[kept])
            assert set(part[~kept].tolist()).isdisjoint(buffer.index.tolist())
        assert len(buffer) == c and buffer.seen == n and len(set(buffer.index.tolist())) == c
        counts[buffer.index] += 1
    # each of the n rows is kept with probability c / n = 0.2 (std 0.013 over the trials)
    assert (counts / trials - c / n).abs().max() < 0.06
    small = ReplayBuffer(c, "reservoir")
    small.offer(1, torch.arange(4), torch.arange(4), g)
    assert len(small) == 4 and small.task.tolist() == [1] * 4
    assert small.label.tolist() == [0, 1, 2, 3]


# ----------------------------------------------------------------------------- loss terms
def test_squared_error_compares_only_the_columns_a_slot_was_stored_with() -> None:
    current = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.0, 1.0, -1.0, 2.0]])
    stored = torch.tensor([[0.0, 2.0, 99.0], [1.0, 1.0, 1.0]])  # row 0 padded past 2 columns
    width = torch.tensor([2, 3])
    expected = torch.tensor([1.0 + 0, 1.0 + 0 + 4])  # ‖f(x) - z‖², the paper's, not a mean
    assert torch.allclose(squared_error(current, stored, width), expected)


D = 4


def _rows(seed: int, n: int, modalities: str) -> MultimodalDataset:
    g = torch.Generator().manual_seed(seed)
    return MultimodalDataset(f"der{seed}", f"der-toy-{seed}-{n}",
                             {m: torch.randn(n, D, generator=g) for m in modalities},
                             labels=torch.randint(3, (n,), generator=g))


def _toy_trainer(tmp_path: Path, strategy: Strategy) -> Trainer:
    """A trainer set up on two pair tasks of other modality pairs, at the second task."""
    config = RunConfig(progress=False, train=TrainConfig(epochs=1, batch_size=8))
    config.data.cache_dir = str(tmp_path)
    config.model.joint_dim = D
    config.model.modalities = {m: ModalityConfig(encoder="features", dim=D) for m in "abc"}
    trainer = build_trainer(config, [strategy])
    trainer.setup(Scenario([Task("t0", ("a", "b"), _rows(0, 20, "ab"), _rows(1, 8, "ab")),
                            Task("t1", ("a", "c"), _rows(2, 20, "ac"), _rows(3, 8, "ac"))]))
    trainer.experience_index = 1
    return trainer


@pytest.mark.parametrize("derpp", [False, True])
def test_the_der_term_is_alpha_squared_distance_to_the_stored_outputs_and_derpp_adds_beta(
        tmp_path: Path, derpp: bool) -> None:
    strategy = (DERPP(DERPPConfig(size=12, batch_size=5, alpha=0.3, beta=0.7)) if derpp
                else DER(DERConfig(size=12, batch_size=5, alpha=0.3)))
    trainer = _toy_trainer(tmp_path, strategy)
    strategy.before_training_exp(trainer)
    g = torch.Generator().manual_seed(1)
    for t in (0, 1):  # a hand-filled buffer: rows of both tasks, arbitrary stored outputs
        slots = strategy.buffer.offer(t, torch.arange(6), torch.zeros(6, dtype=torch.long), g)
        strategy.store(slots, torch.randn(6, 2 * D, generator=g))
    tasks = trainer.scenario.tasks
    batch = gather_parts([(tasks[1].train, torch.arange(8))], lambda key, values: values)
    batch["task_id"] = 1
    trainer.mbatch = trainer.as_batch(batch)
    draws = torch.Generator()
    draws.set_state(trainer.generator.get_state())
    strategy.before_training_iteration(trainer)
    trainer.loss = torch.zeros(())
    strategy.before_backward(trainer)

    model, buffer = trainer.model, strategy.buffer

    def embeddings(slots: torch.Tensor) -> list[torch.Tensor]:
        """Each slot's two raw joint embeddings, computed from its row's features."""
        out = []
        for s in slots.tolist():
            task = tasks[int(buffer.task[s])]
            x = {m: task.train.columns[m][buffer.index[s]] for m in task.modalities}
            out.append(torch.stack([model.heads[m](x[m]) for m in task.modalities]))
        return out

    first = torch.randperm(len(buffer), generator=draws)[:5]
    expected = 0.3 * torch.stack([((z.flatten() - strategy.outputs[s]) ** 2).sum()
                                  for s, z in zip(first.tolist(), embeddings(first),
                                                  strict=True)]).mean()
    if derpp:
        second = torch.randperm(len(buffer), generator=draws)[:5]
        z = embeddings(second)
        terms = []
        for t in (0, 1):
            mine = [i for i, s in enumerate(second.tolist()) if buffer.task[s] == t]
            if mine:
                za, zb = (F.normalize(torch.stack([z[i][k] for i in mine]), dim=1) for k in (0, 1))
                terms.append(len(mine) / 5 * trainer.criterion(za, zb, model.scale))
        assert len(terms) == 2  # both tasks drawn: their losses weigh by their rows
        expected = expected + 0.7 * sum(terms)
    assert trainer.loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_options_are_checked() -> None:
    with pytest.raises(ConfigError, match="strategy_args.derpp.beta"):
        from_dict(DERPPConfig, {"beta": -1}, "strategy_args.derpp")
    with pytest.raises(ConfigError, match=r"strategy_args.der: give size"):
        from_dict(DERConfig, {"size": 0, "fraction": 0}, "strategy_args.der")
    with pytest.raises(ConfigError, match="policy"):
        from_dict(DERConfig, {"policy": "class"}, "strategy_args.der")


# ----------------------------------------------------------------------------- runs
class Watch(Strategy):
    """Stacked after ``der``: at every step, the model's outputs of the batch just before the
    update; after it, the slots that changed: each should hold a row of this step's batch with
    those outputs, and every other slot what it held when written."""

    name = "watch"

    def __init__(self, der: DER) -> None:
        super().__init__()
        self.der = der
        self.inserted: dict[int, torch.Tensor] = {}  # slot -> its outputs when written
        self.before = (torch.zeros(0, dtype=torch.long),) * 2
        self.kept = 0  # checks of a slot found as it was written
        self.written: list[bool] = []  # per write: it holds the step's pre-update outputs
        self.changed: list[tuple[int, int, int]] = []  # slots changed with no row written

    def before_update(self, strategy, **kwargs) -> None:  # noqa: ANN001
        with torch.no_grad():
            self.pre = distilled(strategy.forward(strategy.mbatch))

    def after_training_iteration(self, strategy, **kwargs) -> None:  # noqa: ANN001
        buffer, der = self.der.buffer, self.der
        rows = strategy.mbatch["index"].tolist()
        old_task, old_index = self.before
        for s in range(len(buffer)):
            t, i = int(buffer.task[s]), int(buffer.index[s])
            stored = der.outputs[s, : der.width[s]]
            same = s < len(old_task) and (t, i) == (int(old_task[s]), int(old_index[s]))
            if same and s in self.inserted and torch.equal(stored, self.inserted[s]):
                self.kept += 1
            elif t != strategy.experience_index or i not in rows:
                self.changed.append((s, t, i))
            else:
                self.written.append(torch.equal(stored, self.pre[rows.index(i)]))
                self.inserted[s] = stored.clone()
        self.before = (buffer.task.clone(), buffer.index.clone())


@pytest.fixture(scope="module")
def watched(tiny_template: dict, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    tmp = tmp_path_factory.mktemp("der-watch")
    config = copy.deepcopy(tiny_template)
    config["scenario"]["tasks"] = config["scenario"]["tasks"][:3]
    config["train"]["epochs"] = 2
    loaded = load_dict(config, tmp)
    der = DER(DERConfig(size=40))
    watch = Watch(der)
    trainer = build_trainer(loaded, [der, watch])
    matrices = trainer.fit(build_scenario(loaded))
    return trainer, der, watch, matrices


def test_a_fresh_slot_stores_the_models_outputs_for_its_row_before_the_update(
        watched: tuple) -> None:
    _, der, watch, _ = watched
    assert len(watch.written) >= 40 and all(watch.written)
    # every slot holds a pair's two joint embeddings (joint_dim 256)
    assert len(der.buffer) == 40 and der.width.tolist() == [2 * 256] * 40


def test_stored_outputs_never_change_while_the_models_outputs_move(watched: tuple) -> None:
    trainer, der, watch, matrices = watched
    assert watch.changed == [] and watch.kept > 10 * 40  # checked step after step
    for s, stored in watch.inserted.items():  # the surviving slots, at the end of the run
        assert torch.equal(der.outputs[s], stored), s
    old = (der.buffer.task == 0).nonzero().flatten()
    assert len(old) > 0
    task = trainer.scenario.tasks[0]
    batch = gather_parts([(task.train, der.buffer.index[old])], trainer._collate)
    batch["task_id"] = 0
    with torch.no_grad():
        now = distilled(trainer.forward(trainer.as_batch(batch)))
    drift = (now - der.outputs[old]).abs().mean(1)
    assert bool((drift > 1e-3).all())  # two tasks of training moved every old row's outputs
    assert torch.isfinite(matrices["recall@1"]).all()


@pytest.mark.parametrize("kind,name", [("pairs", "derpp"), ("classes", "der"),
                                       ("classes", "derpp")])
def test_end_to_end_runs(tiny: dict, tmp_path: Path, kind: str, name: str) -> None:
    config = tiny if kind == "pairs" else class_incremental(tiny)
    if kind == "pairs":  # the tasks the other runs here encoded already
        config["scenario"]["tasks"] = config["scenario"]["tasks"][:3]
    config["train"]["epochs"] = 1
    config["strategies"], config["strategy_args"] = [name], {name: {"size": 60}}
    config["out"] = str(tmp_path / "run")
    result = run(load_dict(config, tmp_path))
    metric = "recall@1" if kind == "pairs" else "accuracy"
    assert torch.isfinite(result.matrices[metric]).all()
    report = json.loads((result.out / "metrics.json").read_text())["strategies"][name]
    assert report["slots"] == 60 and report.get("beta") == (0.5 if name == "derpp" else None)
    # the reservoir spans the whole stream: every task keeps about its share of the slots
    assert len(report["slots_per_task"]) == len(result.task_names)
    assert min(report["slots_per_task"]) >= 5


def test_a_killed_der_run_resumes_to_the_uninterrupted_metrics(tiny: dict,
                                                               tmp_path: Path) -> None:
    tiny["scenario"]["tasks"] = tiny["scenario"]["tasks"][:3]
    tiny["train"]["epochs"] = 1
    config = load_dict(tiny, tmp_path)
    scenario = build_scenario(config)

    def trainer(kill_at: int | None) -> Trainer:
        return build_trainer(config, [DER(DERConfig(size=40)), Kill(kill_at)])

    whole = trainer(None)
    expected = whole.fit(scenario)
    checkpoints = tmp_path / "checkpoints"
    with pytest.raises(KeyboardInterrupt):
        trainer(2).fit(scenario, checkpoints, identity(config))
    resumed = trainer(None)
    got = resumed.fit(scenario, checkpoints, identity(config))
    for metric in expected:
        assert torch.equal(expected[metric], got[metric]), metric
    mine, theirs = whole.plugins[0].state_dict(), resumed.plugins[0].state_dict()
    assert torch.equal(mine["outputs"], theirs["outputs"])
    assert mine["buffer"]["seen"] == theirs["buffer"]["seen"] == 3 * 300
