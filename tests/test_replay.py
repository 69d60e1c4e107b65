"""Replay buffers, er, coconut, kd and relation_kd: selection rules, loss formulas, teachers,
stack validation and the class-incremental stream they are for."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from helpers import class_incremental, load_dict

from comodal.config import from_dict
from comodal.errors import ConfigError
from comodal.platform.losses import NSPT
from comodal.platform.model import MultimodalEncoder
from comodal.platform.run import RunResult, build_trainer, run
from comodal.platform.trainer import ClassifyOutput
from comodal.scenarios.registry import build_scenario, class_groups
from comodal.strategies.buffers import ReplayBuffer, herding_order, mean_order
from comodal.strategies.coconut import COCONUT
from comodal.strategies.distill import KD, KDConfig, RelationKD
from comodal.strategies.registry import build_strategies
from comodal.strategies.replay import ER, ERConfig

ROOT = Path(__file__).resolve().parents[1]


def _ci_config(tiny: dict, tmp_path: Path, strategies: list[str], **args: dict) -> dict:
    config = class_incremental(tiny)
    config["train"].update(epochs=10, lr=0.005)
    config["strategies"] = strategies
    config["strategy_args"] = args
    config["out"] = str(tmp_path / "-".join(strategies))
    return config


# ----------------------------------------------------------------------------- buffers
def test_class_balanced_buffer_keeps_its_size_and_balance_after_every_task() -> None:
    buffer = ReplayBuffer(capacity=20, policy="class", selection="random")
    g = torch.Generator().manual_seed(0)
    for task, classes in enumerate([[0, 1], [2, 3, 4], [5, 6]]):
        labels = torch.tensor(classes).repeat_interleave(30)
        buffer.add_task(task, labels, None, g)
        counts = torch.bincount(buffer.label).tolist()
        seen = [counts[c] for c in range(max(classes) + 1)]
        assert len(buffer) == 20 and max(seen) - min(seen) <= 1, (task, seen)
        # every slot points at a row of its task with that row's label
        for t, i, y in zip(buffer.task.tolist(), buffer.index.tolist(), buffer.label.tolist(),
                           strict=True):
            assert y == [[0, 1], [2, 3, 4], [5, 6]][t][i // 30]


def test_experience_balanced_and_reservoir_buffers_respect_the_capacity() -> None:
    g = torch.Generator().manual_seed(0)
    experience = ReplayBuffer(capacity=12, policy="experience")
    reservoir = ReplayBuffer(capacity=12, policy="reservoir")
    for task in range(3):
        labels = torch.zeros(40, dtype=torch.long)
        experience.add_task(task, labels, None, g)
        reservoir.add_task(task, labels, None, g)
        assert len(experience) == len(reservoir) == 12
        assert torch.bincount(experience.task).tolist() == [12 // (task + 1)] * (task + 1)
    assert reservoir.seen == 120 and set(reservoir.task.tolist()) <= {0, 1, 2}


def test_shrinking_a_class_keeps_its_highest_priority_rows() -> None:
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(30, 4, generator=g)
    buffer = ReplayBuffer(capacity=10, policy="class", selection="herding")
    buffer.add_task(0, torch.zeros(30, dtype=torch.long), lambda: feats, g)
    first = buffer.index.tolist()
    assert first == herding_order(feats, 10).tolist()
    buffer.add_task(1, torch.ones(30, dtype=torch.long), lambda: feats, g)
    assert buffer.index[buffer.task == 0].tolist() == first[:5]


def test_herding_picks_the_row_closest_to_the_mean_first_then_corrects_the_running_mean() -> None:
    feats = torch.tensor([[4.0, 0.0], [1.0, 0.1], [-2.0, 0.0], [0.0, 3.0], [0.0, -3.0]])
    mean = feats.mean(0)
    order = herding_order(feats, 3).tolist()
    assert order[0] == int((feats - mean).norm(dim=1).argmin())
    # the second pick makes the mean of the two picks closest to the class mean
    rest = [i for i in range(5) if i != order[0]]
    gaps = {i: float((mean - (feats[order[0]] + feats[i]) / 2).norm()) for i in rest}
    assert order[1] == min(gaps, key=gaps.get)
    assert mean_order(feats)[0] == order[0]


def test_buffer_state_round_trips(tmp_path: Path) -> None:
    buffer = ReplayBuffer(capacity=8, policy="class")
    buffer.add_task(0, torch.arange(4).repeat(5), None, torch.Generator().manual_seed(1))
    torch.save(buffer.state_dict(), tmp_path / "b.pt")
    fresh = ReplayBuffer(capacity=8, policy="class")
    fresh.load_state_dict(torch.load(tmp_path / "b.pt", weights_only=True))
    assert torch.equal(fresh.index, buffer.index) and torch.equal(fresh.label, buffer.label)


# ----------------------------------------------------------------------------- losses
def test_nspt_equals_the_hand_written_formula() -> None:
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    labels = torch.tensor([0, 1, 0, 2, 1, 0])
    anchors = torch.tensor([False, False, False, True, True, True])
    tau = 0.5
    for negatives in ("student", "teacher"):
        sn, tn = F.normalize(s, dim=1), F.normalize(t, dim=1)
        un = sn if negatives == "student" else tn
        total, count = 0.0, 0
        for i in range(6):
            if not anchors[i]:
                continue
            neg = sum(math.exp(float(sn[i] @ un[n]) / tau) for n in range(6)
                      if labels[n] != labels[i])
            pos = [p for p in range(6) if labels[p] == labels[i]]
            terms = [math.log(math.exp(float(sn[i] @ tn[p]) / tau)
                              / (math.exp(float(sn[i] @ tn[p]) / tau) + neg)) for p in pos]
            total += -sum(terms) / len(pos)
            count += 1
        expected = total / count
        got = NSPT(tau, negatives)(s, t, labels, anchors).item()
        assert got == pytest.approx(expected, rel=1e-5), negatives


def _kd_strategy(rehearsal: torch.Tensor) -> tuple[SimpleNamespace, ClassifyOutput]:
    """A trainer stand-in holding one classify batch: 4 classes now, 2 in the teacher."""
    g = torch.Generator().manual_seed(0)
    n = len(rehearsal)
    student = ClassifyOutput(torch.randn(n, 4, generator=g).requires_grad_(),
                             torch.randn(n, 3, generator=g).requires_grad_())
    teacher = ClassifyOutput(torch.randn(n, 2, generator=g), torch.randn(n, 3, generator=g))
    strategy = SimpleNamespace(
        mbatch={"rehearsal": rehearsal, "label": torch.zeros(n, dtype=torch.long)},
        outputs=student, loss=torch.zeros(()),
        model=SimpleNamespace(class_ids=torch.arange(4)),
        teacher=SimpleNamespace(class_ids=torch.arange(2)), teacher_output=lambda batch: teacher,
    )
    return strategy, student


@pytest.mark.parametrize("scope", ["feature", "prediction"])
def test_rehearsal_only_distillation_touches_only_rehearsal_rows(scope: str) -> None:
    rehearsal = torch.tensor([False, False, True, False, True])
    strategy, student = _kd_strategy(rehearsal)
    kd = KD(KDConfig(**{"feature": "off", "prediction": "off", scope: "rehearsal"}))
    kd.before_backward(strategy)
    strategy.loss.backward()
    grad = (student.features if scope == "feature" else student.logits).grad
    assert grad[~rehearsal].abs().sum() == 0
    assert grad[rehearsal].abs().sum() > 0
    if scope == "prediction":  # only the old classes' logits are distilled
        assert grad[:, 2:].abs().sum() == 0
    # weight: alpha = sqrt(n_rehearsal / n_batch)
    rows = rehearsal
    if scope == "feature":
        term = F.mse_loss(student.features[rows], strategy.teacher_output(None).features[rows])
        assert strategy.loss.item() == pytest.approx(math.sqrt(2 / 5) * term.item(), rel=1e-6)


def test_whole_batch_distillation_uses_the_class_ratio_weight() -> None:
    strategy, student = _kd_strategy(torch.zeros(5, dtype=torch.bool))
    kd = KD(KDConfig(feature="batch", prediction="off"))
    kd.before_backward(strategy)
    term = F.mse_loss(student.features, strategy.teacher_output(None).features)
    assert strategy.loss.item() == pytest.approx(math.log(1 + 2 / 4) * term.item(), rel=1e-6)


# ----------------------------------------------------------------------------- validation
@pytest.mark.parametrize("strategies,args,message", [
    (["er", "coconut"], {}, "each keep a replay buffer"),
    (["kd"], {}, "needs a replay strategy"),
    (["gem", "der"], {}, "gem and der each keep a replay buffer"),
    (["co2l", "agem"], {}, "co2l and agem each keep a replay buffer"),
    (["der", "kd"], {}, "needs a replay strategy"),  # der's memory is not in the batch
    (["gem", "kd"], {}, "needs a replay strategy"),
    (["coconut"], {}, "works on classify and sequence tasks"),
    (["er"], {"er": {"policy": "reservoir", "selection": "herding"}}, "reservoir"),
    (["er"], {"er": {"size": 0, "fraction": 0}}, "give size"),
])
def test_bad_stacks_are_clear_errors(tiny: dict, strategies: list, args: dict,
                                     message: str, tmp_path: Path) -> None:
    tiny["strategies"], tiny["strategy_args"] = strategies, args
    with pytest.raises(ConfigError, match=message):
        load_dict(tiny, tmp_path)


def test_pair_strategies_are_refused_on_a_class_incremental_stream(tiny: dict,
                                                                   tmp_path: Path) -> None:
    for name in ("relation_kd", "dns"):
        with pytest.raises(ConfigError, match=f"'{name}' works on pair tasks"):
            load_dict(_ci_config(tiny, tmp_path, [name]), tmp_path)


def test_class_groups_follow_the_order_and_increments() -> None:
    assert class_groups(5, [2]) == [[0, 1], [2, 3], [4]]
    assert class_groups(5, [1, 4], [4, 3, 2, 1, 0]) == [[4], [3, 2, 1, 0]]
    assert class_groups(5, [3, 1]) == [[0, 1, 2], [3], [4]]  # the last increment repeats
    with pytest.raises(ConfigError, match="adds up to 6"):
        class_groups(5, [3, 3], None)
    with pytest.raises(ConfigError, match="class 7"):
        class_groups(5, [5], [0, 1, 2, 3, 7])


def test_classifier_grows_and_keeps_old_rows() -> None:
    model = MultimodalEncoder({"audio": 4}, joint_dim=4)
    model.grow([3, 1])
    old = model.classifier.weight.detach().clone()
    model.grow([1, 0])
    assert model.class_ids.tolist() == [3, 1, 0]
    assert torch.equal(model.classifier.weight[:2], old)
    assert model.class_rows(torch.tensor([0, 3])).tolist() == [2, 0]


# ----------------------------------------------------------------------------- runs
def test_stacked_strategies_run_their_hooks_in_config_order(tiny: dict, tmp_path: Path) -> None:
    tiny["strategies"] = ["er", "relation_kd"]
    config = load_dict(tiny, tmp_path)
    trainer = build_trainer(config)
    er, rkd = trainer.plugins
    assert isinstance(er, ER) and isinstance(rkd, RelationKD)
    assert trainer._hooks["before_backward"] == [er.before_backward, rkd.before_backward]
    assert trainer._hooks["after_training_exp"] == [  # Avalanche's clock counts last
        er.after_training_exp, rkd.after_training_exp, trainer.clock.after_training_exp]
    assert trainer._hooks["before_training"] == []  # the teacher is the trainer's


class Recorder(RelationKD):
    """relation_kd that also records what each step saw."""

    def __init__(self) -> None:
        super().__init__()
        self.steps: list[dict] = []

    def before_backward(self, strategy, **kwargs) -> None:  # noqa: ANN001
        self.steps.append({"task": strategy.experience_index,
                           "rehearsal": int(strategy.mbatch.get("rehearsal", torch.zeros(0)).sum()),
                           "side": [b["task_id"] for b in strategy.mbatch.get("replay", [])],
                           "loss_before": float(strategy.loss.detach())})
        super().before_backward(strategy, **kwargs)
        self.steps[-1]["loss_after"] = float(strategy.loss.detach())


def test_replay_on_pairs_appends_same_pair_rows_and_side_batches_the_others(
        tiny: dict, tmp_path: Path) -> None:
    tiny["train"]["epochs"] = 1
    config = load_dict(tiny, tmp_path)
    er = ER(from_dict(ERConfig, {"size": 40}))
    recorder = Recorder()
    trainer = build_trainer(config, [er, recorder])
    trainer.fit(build_scenario(config))
    by_task = {t: [s for s in recorder.steps if s["task"] == t] for t in range(4)}
    assert all(s["rehearsal"] == 0 and not s["side"] for s in by_task[0])
    # task 2 (kitchen audio-text) replays toys vision-text rows as a side batch
    assert all(s["side"] == [0] for s in by_task[1])
    # task 4 (gems vision-text) shares its pair with task 1: those rows join the batch
    assert all(s["rehearsal"] > 0 and 0 not in s["side"] for s in by_task[3])
    # relation_kd adds a term once there is a teacher and a pair it had learned (zero at a
    # task's first step, where the student still is the teacher)
    for t in (1, 3):
        gaps = [s["loss_after"] - s["loss_before"] for s in by_task[t]]
        assert gaps[0] == pytest.approx(0, abs=1e-6) and min(gaps) >= -1e-6 and max(gaps) > 0
    assert all(s["loss_after"] == s["loss_before"] for s in by_task[0])
    assert len(er.buffer) == 40


class TeacherWatch(KD):
    """kd that checks the teacher is frozen and bitwise unchanged through the task."""

    def before_training_exp(self, strategy, **kwargs) -> None:  # noqa: ANN001
        teacher = strategy.teacher
        self.start = None if teacher is None else copy.deepcopy(teacher.state_dict())
        if teacher is not None:  # the model before this task's classes were grown
            assert len(teacher.class_ids) < len(strategy.model.class_ids)
            assert torch.equal(teacher.class_ids,
                               strategy.model.class_ids[: len(teacher.class_ids)])

    def after_training_exp(self, strategy, **kwargs) -> None:  # noqa: ANN001
        if strategy.teacher is not None:
            assert not any(p.requires_grad for p in strategy.teacher.parameters())
            for key, value in strategy.teacher.state_dict().items():
                assert torch.equal(value, self.start[key]), key
            self.checked = getattr(self, "checked", 0) + 1


@pytest.fixture(scope="module")
def ci_runs(tiny_template: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = {}
    tmp = tmp_path_factory.mktemp("ci")
    for names in (["finetune"], ["er"], ["coconut", "kd"]):
        config = load_dict(_ci_config(tiny_template, tmp, names), tmp)
        out["+".join(names)] = run(config)
    return out


def test_class_incremental_finetune_forgets_and_replay_keeps_more(ci_runs: dict) -> None:
    ft: RunResult = ci_runs["finetune"]
    acc = ft.matrices["accuracy"]
    assert acc.shape == (4, 3) and acc[0].sum() == 0  # no class known before training
    assert acc[1, 0] > 0.4 and acc[3, 0] < 0.05  # learnt, then forgotten
    for name in ("er", "coconut+kd"):
        assert ci_runs[name].summary["accuracy"]["acc"] > ft.summary["accuracy"]["acc"] + 0.1


def test_teacher_is_frozen_and_unchanged_through_each_task(tiny: dict, tmp_path: Path) -> None:
    config = load_dict(_ci_config(tiny, tmp_path, ["coconut", "kd"]), tmp_path)
    config.train.epochs = 1
    coconut, watch = build_strategies(["coconut"], {})[0], TeacherWatch()
    trainer = build_trainer(config, [coconut, watch])
    trainer.fit(build_scenario(config))
    assert watch.checked == 2 and isinstance(coconut, COCONUT)


@pytest.mark.parametrize("stack", [["er", "dns"], ["joint", "er"], ["er", "gpm"]])
def test_replay_stacks_with_other_strategies_on_pairs(tiny: dict, tmp_path: Path,
                                                      stack: list[str]) -> None:
    tiny["train"]["epochs"] = 1
    tiny["strategies"], tiny["out"] = stack, str(tmp_path / "run")
    tiny["strategy_args"] = {"er": {"size": 30}}
    result = run(load_dict(tiny, tmp_path))
    assert torch.isfinite(result.matrices["recall@1"]).all()


def test_a_class_balanced_buffer_on_unlabelled_pairs_fails_before_training(tmp_path: Path) -> None:
    from comodal.config import ModalityConfig, RunConfig
    from comodal.core.data import MultimodalDataset
    from comodal.scenarios.task import Scenario, Task

    def rows(seed: int) -> MultimodalDataset:
        g = torch.Generator().manual_seed(seed)
        return MultimodalDataset("plain", f"plain-{seed}", {"a": torch.randn(16, 8, generator=g),
                                                           "b": torch.randn(16, 8, generator=g)})

    config = RunConfig(progress=False)
    config.data.cache_dir = str(tmp_path)
    config.model.joint_dim = 8
    config.model.modalities = {m: ModalityConfig(encoder="features", dim=8) for m in "ab"}
    trainer = build_trainer(config, [ER()])
    with pytest.raises(ConfigError, match="task 'unlabelled' has no labels"):
        trainer.fit(Scenario([Task("unlabelled", ("a", "b"), rows(0), rows(1))]))
    assert trainer.history == []


def test_stacked_distillers_share_one_teacher_forward_per_step(
        tiny: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from comodal.platform.trainer import Trainer

    config = class_incremental(tiny)
    config["train"]["epochs"] = 1
    config["strategies"] = ["coconut", "kd"]
    loaded = load_dict(config, tmp_path)
    trainer = build_trainer(loaded)
    events: list[str] = []
    forward = Trainer.forward

    def counted(self: Trainer, batch: dict, model: object = None) -> object:
        if model is not None and model is self.teacher:
            events.append("teacher")
        return forward(self, batch, model)

    monkeypatch.setattr(Trainer, "forward", counted)
    step = Trainer.training_step
    monkeypatch.setattr(Trainer, "training_step",
                        lambda self: (events.append("step"), step(self))[1])
    trainer.fit(build_scenario(loaded))
    per_step = [sum(1 for e in chunk.split() if e == "teacher")
                for chunk in " ".join(events).split("step")[1:]]
    assert max(per_step) == 1 and sum(per_step) > 0  # coconut's NSPT and kd read one forward
