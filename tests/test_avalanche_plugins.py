"""Stock Avalanche 0.6 plugins, unchanged, on comodal's trainer: each case checks that the
plugin ran and did what it is for (a penalty that changes the final weights, a memory that
fills, a schedule the learning rate follows, a stop, logged metrics equal to comodal's), on
a class-incremental stream and on a pair stream; plugins that cannot apply are refused before
training."""

from __future__ import annotations

import copy
import csv
import math
import re
import warnings
from pathlib import Path

import pytest
import torch
from helpers import class_incremental

from comodal.config import RunConfig, from_dict
from comodal.errors import ConfigError
from comodal.platform.run import build_trainer
from comodal.platform.trainer import Trainer
from comodal.scenarios.registry import build_scenario

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from avalanche.core import SupervisedPlugin
    from avalanche.evaluation.metrics import (
        accuracy_metrics,
        forgetting_metrics,
        loss_metrics,
    )
    from avalanche.logging import CSVLogger, InteractiveLogger, TensorboardLogger
    from avalanche.training.plugins import (
        AGEMPlugin,
        EarlyStoppingPlugin,
        EvaluationPlugin,
        EWCPlugin,
        GDumbPlugin,
        GEMPlugin,
        LRSchedulerPlugin,
        LwFPlugin,
        MASPlugin,
        ReplayPlugin,
        SynapticIntelligencePlugin,
    )

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def pair_config(tiny_template: dict) -> RunConfig:
    config = copy.deepcopy(tiny_template)
    config["scenario"]["tasks"] = config["scenario"]["tasks"][:2]
    config["train"]["epochs"] = 2
    return from_dict(RunConfig, config)


@pytest.fixture(scope="module")
def ci_config(tiny_template: dict) -> RunConfig:
    config = class_incremental(tiny_template)
    config["scenario"]["class_incremental"].update(
        {"order": [0, 5, 10, 15, 20, 3, 8, 13], "subset": True, "increments": [4]})
    config["train"]["epochs"] = 2
    return from_dict(RunConfig, config)


def fit(config: RunConfig, *plugins: object, scheduled: object = None) -> Trainer:
    trainer = build_trainer(config, list(plugins))
    if scheduled is not None:
        trainer.attach(scheduled(trainer))
    trainer.fit(build_scenario(config))
    return trainer


def weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in trainer.model.state_dict().items()}


@pytest.fixture(scope="module")
def pair_baseline(pair_config: RunConfig) -> dict[str, torch.Tensor]:
    return weights(fit(pair_config))


@pytest.fixture(scope="module")
def ci_baseline(ci_config: RunConfig) -> dict[str, torch.Tensor]:
    return weights(fit(ci_config))


def changed(trainer: Trainer, baseline: dict[str, torch.Tensor]) -> bool:
    after = trainer.model.state_dict()
    return any(not torch.equal(after[k], v) for k, v in baseline.items() if k in after)


@pytest.fixture(params=["pair", "classify"])
def stream(request: pytest.FixtureRequest) -> tuple[str, RunConfig, dict]:
    kind = request.param
    config = request.getfixturevalue("pair_config" if kind == "pair" else "ci_config")
    baseline = request.getfixturevalue("pair_baseline" if kind == "pair" else "ci_baseline")
    return kind, config, baseline


IMPORTANCES = {  # each regulariser, and where it keeps its parameter importances
    "ewc": (lambda: EWCPlugin(ewc_lambda=1e4), lambda p: p.importances[0]),
    "si": (lambda: SynapticIntelligencePlugin(si_lambda=1e3), lambda p: p.ewc_data[1]),
    "mas": (lambda: MASPlugin(lambda_reg=10.0), lambda p: p.importance),
}


@pytest.mark.parametrize("name", list(IMPORTANCES))
def test_regularisers_weigh_the_parameters_and_change_the_weights(stream: tuple,
                                                                  name: str) -> None:
    """SI's importances are 0 on the CPU without the trainer's fresh-storage update."""
    _, config, baseline = stream
    make, importances = IMPORTANCES[name]
    plugin = make()
    trainer = fit(config, plugin)
    assert sum(float(v.data.abs().sum()) for v in importances(plugin).values()) > 0
    assert changed(trainer, baseline)


def test_gem_keeps_a_memory_per_task_and_projects(stream: tuple) -> None:
    _, config, baseline = stream
    plugin = GEMPlugin(patterns_per_experience=32, memory_strength=0.5)
    trainer = fit(config, plugin)
    assert sorted(plugin.memory_x) == [0, 1]
    assert len(plugin.memory_x[0]) == 32 and len(plugin.memory_y[0]) == 32
    assert changed(trainer, baseline)


def test_agem_fills_its_buffers_and_projects(stream: tuple) -> None:
    _, config, baseline = stream
    plugin = AGEMPlugin(patterns_per_experience=32, sample_size=16)
    trainer = fit(config, plugin)
    assert [len(b) for b in plugin.buffers] == [32, 32]
    assert plugin.reference_gradients.abs().sum() > 0
    assert changed(trainer, baseline)


def test_lr_scheduler_plugin_schedules_the_trainers_optimizer(stream: tuple) -> None:
    _, config, _ = stream
    trainer = fit(config, scheduled=lambda t: LRSchedulerPlugin(
        torch.optim.lr_scheduler.StepLR(t.optimizer, step_size=1, gamma=0.5)))
    lrs = [h["lr"] for h in trainer.history]
    lr = config.train.lr
    # one step per epoch, the rate and the schedule reset at each task's end
    assert lrs == pytest.approx([lr, lr / 2] * len(trainer.scenario.tasks))


def test_early_stopping_stops_a_task(stream: tuple) -> None:
    _, config, _ = stream
    config = copy.deepcopy(config)
    config.train.epochs, config.eval.every_epochs = 4, 1
    evaluator = EvaluationPlugin(loss_metrics(stream=True), loggers=[])
    # no change can beat a margin of 1e9: each task stops `patience` epochs after its first
    # reading of the metric (the evaluation before the task), restoring the weights it had then
    stopper = EarlyStoppingPlugin(patience=2, val_stream_name="test_stream",
                                  metric_name="Loss_Stream", mode="max", margin=1e9)
    trainer = fit(config, stopper, evaluator)
    epochs = [sum(h["task"] == t for h in trainer.history) for t in range(2)]
    assert epochs == [2, 2]


def test_evaluation_plugin_logs_comodal_numbers(stream: tuple, tmp_path) -> None:  # noqa: ANN001
    kind, config, _ = stream
    metrics = [loss_metrics(epoch=True, experience=True, stream=True)]
    if kind == "classify":
        metrics += [accuracy_metrics(epoch=True, experience=True, stream=True),
                    forgetting_metrics(experience=True, stream=True)]
    evaluator = EvaluationPlugin(
        *metrics, loggers=[TensorboardLogger(tmp_path / "tb"), CSVLogger(tmp_path / "csv"),
                           InteractiveLogger()])
    trainer = build_trainer(config, [evaluator])
    matrices = trainer.fit(build_scenario(config))
    logged = {k: v[1] for k, v in evaluator.get_all_metrics().items()}
    stream_losses = [v for k, v in logged.items()
                     if k.startswith("Loss_Stream/eval_phase/test_stream/Task")]
    assert stream_losses and all(len(v) == 3 for v in stream_losses)  # 3 evaluations
    first_task = logged["Loss_Exp/eval_phase/test_stream/Task000/Exp000"]
    if kind == "pair":
        assert first_task[1] < first_task[0]  # training the first task lowers its test loss
    else:  # no class of it learned yet: no row to score
        assert first_task[0] == 0 and first_task[1] > 0
    train = logged["Loss_Epoch/train_phase/train_stream/Task000"][: config.train.epochs]
    assert train[-1] < train[0]
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    if kind == "classify":
        for t in range(2):
            accs = logged[f"Top1_Acc_Exp/eval_phase/test_stream/Task000/Exp00{t}"]
            assert accs == pytest.approx(matrices["accuracy"][:, t].tolist(), abs=1e-6)
        assert "StreamForgetting/eval_phase/test_stream" in logged
        with open(tmp_path / "csv" / "eval_results.csv") as f:
            rows = list(csv.DictReader(f))
        assert len(rows) == 3 * 2 and float(rows[-1]["eval_accuracy"]) == pytest.approx(
            float(matrices["accuracy"][-1, 1]), abs=1e-4)


def test_lwf_distils_old_logits(ci_config: RunConfig, ci_baseline: dict) -> None:
    plugin = LwFPlugin(alpha=1.0, temperature=2.0)
    trainer = fit(ci_config, plugin)
    assert plugin.lwf.prev_classes_by_task[0] == set(range(8))
    assert changed(trainer, ci_baseline)


def test_replay_plugin_fills_its_buffer_and_trains_on_it(ci_config: RunConfig,
                                                         ci_baseline: dict) -> None:
    plugin = ReplayPlugin(mem_size=40)
    trainer = fit(ci_config, plugin)
    assert len(plugin.storage_policy.buffer) == 40
    assert changed(trainer, ci_baseline)


def test_gdumb_trains_from_scratch_on_its_buffer(ci_config: RunConfig) -> None:
    plugin = GDumbPlugin(mem_size=40)
    trainer = build_trainer(ci_config, [plugin])
    initial = weights(trainer)
    trainer.fit(build_scenario(ci_config))
    assert len(plugin.storage_policy.buffer) == 40
    assert len(trainer.adapted_dataset) == 40  # the last task trained on the buffer alone
    assert len(trainer.history) == 2 * ci_config.train.epochs
    assert trainer.model is not plugin.init_model  # each task trains a copy of the first model
    kept = plugin.init_model.state_dict()
    assert all(torch.equal(kept[k], v) for k, v in initial.items() if k in kept)


@pytest.mark.parametrize("plugin", [LwFPlugin(), ReplayPlugin(mem_size=10),
                                    GDumbPlugin(mem_size=10)], ids=type)
def test_plugins_that_cannot_apply_to_pair_tasks_are_refused_before_training(
    pair_config: RunConfig, plugin: object,
) -> None:
    trainer = build_trainer(pair_config, [plugin])
    with pytest.raises(ConfigError, match=f"{type(plugin).__name__}.*cannot run on pair tasks"):
        trainer.setup(build_scenario(pair_config))
    assert not trainer.history


def test_accuracy_metrics_on_pair_tasks_and_two_schedulers_are_refused(
    pair_config: RunConfig,
) -> None:
    evaluator = EvaluationPlugin(accuracy_metrics(stream=True), loggers=[])
    trainer = build_trainer(pair_config, [evaluator])
    with pytest.raises(ConfigError, match="scores class predictions, and pair tasks have none"):
        trainer.setup(build_scenario(pair_config))
    config = copy.deepcopy(pair_config)
    config.train.scheduler.name = "cosine"
    trainer = build_trainer(config, [])
    trainer.attach(LRSchedulerPlugin(
        torch.optim.lr_scheduler.StepLR(trainer.optimizer, step_size=1)))
    with pytest.raises(ConfigError, match="would both set the learning rate"):
        trainer.setup(build_scenario(config))


def test_early_stopping_without_periodic_evaluation_is_refused(pair_config: RunConfig) -> None:
    stopper = EarlyStoppingPlugin(patience=1, val_stream_name="test_stream")
    trainer = build_trainer(pair_config, [stopper])
    with pytest.raises(ConfigError, match="EvaluationPlugin.*eval.every_epochs"):
        trainer.setup(build_scenario(pair_config))


class MomentCount(SupervisedPlugin):
    """Records how many parameters carry optimizer moments as each task starts."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: list[int] = []

    def before_training_exp(self, strategy, **kwargs) -> None:  # noqa: ANN001
        self.counts.append(len(strategy.optimizer.state))


@pytest.mark.parametrize("keep", [False, True])
def test_one_optimizer_for_the_run_with_moments_kept_on_request(pair_config: RunConfig,
                                                               keep: bool) -> None:
    config = copy.deepcopy(pair_config)
    config.train.keep_optimizer = keep
    probe = MomentCount()
    trainer = build_trainer(config, [probe])
    optimizer = trainer.optimizer
    trainer.fit(build_scenario(config))
    assert trainer.optimizer is optimizer
    assert probe.counts[0] == 0 and (probe.counts[1] > 0) == keep


def test_the_configured_schedule_restarts_at_every_task(pair_config: RunConfig) -> None:
    config = copy.deepcopy(pair_config)
    config.train.scheduler.name = "step"
    config.train.scheduler.gamma = 0.5
    trainer = fit(config)
    lr = config.train.lr
    assert [h["lr"] for h in trainer.history] == pytest.approx([lr, lr / 2] * 2)


def test_readme_plugin_example_runs(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    (api,) = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    (code,) = re.findall(r"```python avalanche-plugins\n(.*?)```", text, flags=re.S)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(api, "README.md", "exec"), namespace)  # noqa: S102
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102
    trainer = namespace["trainer"]
    assert [h["lr"] for h in trainer.history][4:6] == pytest.approx([0.01, 0.005])
    assert namespace["evaluator"].get_last_metrics()
    assert list((tmp_path / "runs" / "avalanche-tb").glob("events.out.tfevents.*"))
    assert (namespace["matrices"]["recall@1"][1:].diagonal() > 0.5).all()


class FlatLogits(SupervisedPlugin):
    """Replaces the step's output, as Avalanche plugins may in after_forward: zero logits."""

    def after_forward(self, strategy, **kwargs) -> None:  # noqa: ANN001
        strategy.mb_output = strategy.mb_output * 0.0


def test_a_replaced_mb_output_is_what_the_step_trains_on(ci_config: RunConfig) -> None:
    trainer = build_trainer(ci_config, [FlatLogits()])
    initial = weights(trainer)
    trainer.fit(build_scenario(ci_config))
    # zero logits over the 4, then 8, classes seen: the loss is log(classes), no gradient moves
    # a weight (the classifier's rows are grown, so only the others are compared)
    classes = [4] * ci_config.train.epochs + [8] * ci_config.train.epochs
    assert [h["loss"] for h in trainer.history] == pytest.approx(
        [math.log(c) for c in classes], rel=1e-6)
    after = trainer.model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in initial.items() if k != "class_ids")


def test_periodic_evaluation_runs_after_every_epoch_but_a_tasks_last(
    pair_config: RunConfig,
) -> None:
    config = copy.deepcopy(pair_config)
    config.eval.every_epochs = 1
    evaluator = EvaluationPlugin(loss_metrics(stream=True), loggers=[])
    fit(config, evaluator)
    (losses,) = [v[1] for k, v in evaluator.get_all_metrics().items()
                 if k.startswith("Loss_Stream/eval_phase/test_stream")]
    # before training; then per task of 2 epochs: after epoch 1, and after the task
    assert len(losses) == 1 + 2 * 2
