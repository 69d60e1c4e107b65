"""A scenario is an Avalanche benchmark, and stock Avalanche plugins attach to the trainer."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.utils.data import DataLoader

from comodal.config import RunConfig, from_dict
from comodal.platform.modalities import build_modalities, collate_samples
from comodal.platform.run import build_trainer
from comodal.platform.trainer import EVAL_HOOKS, TRAIN_HOOKS
from comodal.scenarios.registry import build_scenario

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from avalanche.core import SupervisedPlugin


@pytest.fixture()
def two_tasks(tiny: dict) -> RunConfig:
    tiny["scenario"]["tasks"] = tiny["scenario"]["tasks"][:2]
    tiny["train"]["epochs"] = 2
    return from_dict(RunConfig, tiny)


def test_streams_iterate_with_dict_batches(two_tasks: RunConfig) -> None:
    scenario = build_scenario(two_tasks)
    modalities = build_modalities(two_tasks.model.modalities)
    bm = scenario.benchmark(collate_fn=lambda s: collate_samples(s, modalities))
    assert len(bm.train_stream) == 2 and len(bm.test_stream) == 2
    for i, (train, test) in enumerate(zip(bm.train_stream, bm.test_stream, strict=True)):
        assert train.current_experience == i and train.task is scenario.tasks[i]
        assert test.modalities == scenario.tasks[i].modalities
        loader = DataLoader(train.dataset, batch_size=8, collate_fn=train.dataset.collate_fn)
        batch, y, t = next(iter(loader))
        assert y.tolist() == [i] * 8 and t.tolist() == [i] * 8  # pair tasks: task index
        assert len(batch) == 8 and batch.modalities == scenario.tasks[i].modalities
        assert batch["vision"].shape == (8, 3, 32, 32)
        assert batch["audio"]["wave"].shape[0] == 8
        assert batch["text"]["input_ids"].shape[0] == 8
        assert batch["label"].dtype == torch.long and len(batch["concept"]) == 8


class Recorder(SupervisedPlugin):
    """A stock Avalanche plugin that records every callback it receives."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []


for _hook in TRAIN_HOOKS + EVAL_HOOKS:
    setattr(Recorder, _hook,
            lambda self, strategy, _h=_hook, **kw: self.calls.append(_h))


class ZeroLoss(SupervisedPlugin):
    """Edits the loss before backward, as distillation plugins do."""

    def before_backward(self, strategy, **kwargs) -> None:  # noqa: ANN001
        strategy.loss = strategy.loss * 0.0


def test_supervised_plugin_receives_the_callbacks_in_avalanche_order(
    two_tasks: RunConfig,
) -> None:
    recorder = Recorder()
    trainer = build_trainer(two_tasks, [recorder])
    trainer.fit(build_scenario(two_tasks))
    calls = recorder.calls
    batches = -(-two_tasks.data.synth_pairs.train_size // two_tasks.train.batch_size)
    assert calls.count("before_training_exp") == 2
    assert calls.count("after_training_exp") == 2
    assert calls.count("before_training_epoch") == 2 * 2
    assert calls.count("before_backward") == 2 * 2 * batches
    assert calls.count("before_eval") == 3  # before the first task and after each task
    assert calls.count("after_eval_exp") == 3 * 2
    step = calls.index("before_training_iteration")
    assert calls[step:step + 10] == [
        "before_training_iteration", "before_forward", "after_forward", "before_backward",
        "after_backward", "before_update", "after_update", "after_training_iteration",
        "before_training_iteration", "before_forward",
    ]
    first = calls.index("before_training")
    assert calls[first:first + 4] == [
        "before_training", "before_train_dataset_adaptation", "after_train_dataset_adaptation",
        "before_training_exp",
    ]


def test_only_overridden_hooks_are_called_and_plugins_edit_the_loss(
    two_tasks: RunConfig,
) -> None:
    trainer = build_trainer(two_tasks, [ZeroLoss()])
    called = {h: [f.__self__ for f in fns if f.__self__ is not trainer.clock]
              for h, fns in trainer._hooks.items()}
    assert [h for h, owners in called.items() if owners] == ["before_backward"]
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.setup(build_scenario(two_tasks))
    trainer.train_experience(trainer.benchmark.train_stream[0])
    after = trainer.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


class HalfData(SupervisedPlugin):
    """Replaces the adapted dataset, as replay plugins do, and adds a term to the loss."""

    def __init__(self) -> None:
        super().__init__()
        self.steps = 0

    def after_train_dataset_adaptation(self, strategy, **kwargs) -> None:  # noqa: ANN001
        data = strategy.adapted_dataset
        strategy.adapted_dataset = data.subset(range(len(data) // 2))

    def before_forward(self, strategy, **kwargs) -> None:  # noqa: ANN001
        strategy.loss = strategy.loss + 1000.0

    def after_forward(self, strategy, **kwargs) -> None:  # noqa: ANN001
        self.steps += 1


def test_plugins_adapt_the_dataset_and_their_loss_terms_survive(two_tasks: RunConfig) -> None:
    plugin = HalfData()
    trainer = build_trainer(two_tasks, [plugin])
    trainer.setup(build_scenario(two_tasks))
    trainer.train_experience(trainer.benchmark.train_stream[0])
    half = two_tasks.data.synth_pairs.train_size // 2
    assert plugin.steps == two_tasks.train.epochs * -(-half // two_tasks.train.batch_size)
    assert trainer.history[-1]["loss"] > 1000.0


def test_a_trainer_fits_once(two_tasks: RunConfig) -> None:
    trainer = build_trainer(two_tasks, [])
    trainer.setup(build_scenario(two_tasks))
    with pytest.raises(RuntimeError, match="already been fit"):
        trainer.setup(build_scenario(two_tasks))


def test_the_evaluator_and_the_clock_are_called_after_the_other_plugins(
    two_tasks: RunConfig,
) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from avalanche.training.plugins import EvaluationPlugin, EWCPlugin
    evaluator, ewc = EvaluationPlugin(loggers=[]), EWCPlugin(ewc_lambda=1.0)
    trainer = build_trainer(two_tasks, [evaluator, ewc])
    assert trainer.evaluator is evaluator
    hooks = trainer._hooks["after_training_exp"]
    assert len(hooks) == 3  # EWC's, the evaluator's (it answers every callback), the clock's
    assert hooks[0].__self__ is ewc and hooks[-1].__self__ is trainer.clock


def test_a_batch_is_rows_to_avalanche(two_tasks: RunConfig) -> None:
    scenario = build_scenario(two_tasks)
    modalities = build_modalities(two_tasks.model.modalities)
    bm = scenario.benchmark(collate_fn=lambda s: collate_samples(s, modalities))
    data = bm.train_stream[0].dataset
    first, y, _ = data.collate_fn([data[i] for i in range(6)])
    second, _, _ = data.collate_fn([data[i] for i in range(6, 10)])
    assert len(first) == first.size(0) == 6 and y.tolist() == [0] * 6
    head = first[:2]
    assert len(head) == 2 and head["index"].tolist() == [0, 1]
    assert torch.equal(head["vision"], first["vision"][:2])
    joined = torch.cat((first, second), dim=0)
    assert len(joined) == 10 and joined["index"].tolist() == list(range(10))
    assert joined.modalities == first.modalities and joined.clone() is joined
    mixed, y, t = data.collate_fn([data[0], bm.train_stream[1].dataset[0]])
    assert mixed.kind == "mixed" and [len(part) for _, part in mixed.parts] == [1, 1]
    assert y.tolist() == [0, 1] and t.tolist() == [0, 1]


def test_the_avalanche_criterion_is_the_task_loss() -> None:
    from comodal.platform.avalanche_view import AvalancheCriterion
    from comodal.platform.losses import InfoNCE

    scale = torch.tensor(10.0)
    unit = staticmethod(lambda z: torch.nn.functional.normalize(z, dim=-1))  # cosine scoring
    model = type("M", (), {"scale": scale, "scored": unit})()
    infonce = InfoNCE()
    criterion = AvalancheCriterion(lambda: model, infonce)
    g = torch.Generator().manual_seed(0)
    out = torch.randn(6, 2, 4, generator=g)
    tasks = torch.tensor([0, 0, 1, 1, 1, 0])
    z = torch.nn.functional.normalize(out, dim=-1)
    a, b = tasks == 0, tasks == 1
    expected = (0.5 * infonce(z[a, 0], z[a, 1], scale)
                + 0.5 * infonce(z[b, 0], z[b, 1], scale))
    assert criterion(out, tasks) == pytest.approx(float(expected), rel=1e-6)
    logits = torch.randn(4, 3, generator=g)
    rows = torch.tensor([2, -1, 0, -1])  # -1: a class not learned yet, left out
    known = torch.nn.functional.cross_entropy(logits[[0, 2]], rows[[0, 2]])
    assert criterion(logits, rows) == pytest.approx(float(known))
    assert float(criterion(logits, torch.full((4,), -1))) == 0.0


class Probe(SupervisedPlugin):
    """Checks, at a training step, that Avalanche's view agrees with the model."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[bool] = []

    def after_forward(self, strategy, **kwargs) -> None:  # noqa: ANN001
        with torch.no_grad():
            again = strategy.model(strategy.mb_x)
        y, t = strategy.mb_y, strategy.mb_task_id
        self.seen.append(torch.allclose(strategy.mb_output, again, atol=1e-6)
                         and strategy.mb_output.shape == (len(strategy.mb_x), 2, 256)
                         and bool((y == strategy.experience_index).all())
                         and bool((t == strategy.experience_index).all())
                         and strategy.is_training and not strategy.is_eval)


def test_avalanche_attributes_agree_with_the_model(two_tasks: RunConfig) -> None:
    probe = Probe()
    trainer = build_trainer(two_tasks, [probe])
    trainer.setup(build_scenario(two_tasks))
    assert trainer.current_eval_stream == list(trainer.benchmark.test_stream)
    assert trainer.eval_mb_size == two_tasks.eval.batch_size and trainer.is_eval
    assert trainer.train_epochs == two_tasks.train.epochs
    trainer.train_experience(trainer.benchmark.train_stream[1])
    assert probe.seen and all(probe.seen)
    assert trainer.clock.train_exp_epochs == two_tasks.train.epochs
