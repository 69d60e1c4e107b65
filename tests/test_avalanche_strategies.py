"""The other direction: Avalanche's own strategies (Naive, Replay, EWC, LwF), unchanged, train
on a comodal class-incremental stream through ``comodal.avalanche.for_avalanche``."""

from __future__ import annotations

import copy
import re
import warnings
from pathlib import Path

import pytest
import torch
from helpers import class_incremental

from comodal.avalanche import for_avalanche
from comodal.config import RunConfig, from_dict

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from avalanche.evaluation.metrics import accuracy_metrics, loss_metrics
    from avalanche.training import EWC, LwF, Naive, Replay
    from avalanche.training.plugins import EvaluationPlugin

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def config(tiny_template: dict) -> RunConfig:
    config = class_incremental(tiny_template)
    config["scenario"]["class_incremental"].update(
        {"order": [0, 5, 10, 15, 20, 3, 8, 13], "subset": True, "increments": [4]})
    return from_dict(RunConfig, config)


def test_experiences_carry_what_avalanche_reads(config: RunConfig) -> None:
    setup = for_avalanche(config)
    first, second = setup.benchmark.train_stream
    assert first.task_labels == [0] and second.task_label == 0
    assert first.classes_in_this_experience == [0, 1, 2, 3]
    assert second.classes_in_this_experience == [4, 5, 6, 7]
    assert second.previous_classes == [0, 1, 2, 3] and first.future_classes == [4, 5, 6, 7]
    assert first.classes_seen_so_far == [0, 1, 2, 3]
    assert second.classes_seen_so_far == list(range(8))
    assert setup.model.class_ids.tolist() == [0, 5, 10, 15, 20, 3, 8, 13]  # all, from the start
    data = second.dataset
    assert set(data.targets.uniques) == {4, 5, 6, 7}
    assert set(data.targets_task_labels.uniques) == {0}
    # classes are numbered in arrival order: class 3 of synth-pairs is the 6th to arrive
    labels = second.task.train.labels
    assert all(data.targets[i] == [0, 5, 10, 15, 20, 3, 8, 13].index(int(labels[i]))
               for i in range(0, len(data), 17))


STRATEGIES = {
    "naive": lambda **kw: Naive(**kw),
    "replay": lambda **kw: Replay(mem_size=40, **kw),
    "ewc": lambda **kw: EWC(ewc_lambda=100.0, **kw),
    "lwf": lambda **kw: LwF(alpha=1.0, temperature=2.0, **kw),
}


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_stock_strategies_train_on_a_comodal_stream(config: RunConfig, name: str) -> None:
    setup = for_avalanche(copy.deepcopy(config))
    evaluator = EvaluationPlugin(accuracy_metrics(experience=True),
                                 loss_metrics(epoch=True), loggers=[])
    strategy = STRATEGIES[name](
        model=setup.model, optimizer=torch.optim.Adam(setup.model.parameters(), lr=1e-2),
        criterion=setup.criterion, train_mb_size=32, train_epochs=3, eval_mb_size=64,
        evaluator=evaluator)
    first = setup.benchmark.train_stream[0]
    strategy.train(first)
    losses = evaluator.get_all_metrics()["Loss_Epoch/train_phase/train_stream/Task000"][1]
    assert losses[-1] < losses[0]  # the loss goes down on dict batches
    results = strategy.eval([setup.benchmark.test_stream[0]])
    assert results["Top1_Acc_Exp/eval_phase/test_stream/Task000/Exp000"] > 0.5  # 4 classes
    strategy.train(setup.benchmark.train_stream[1])
    if name == "replay":
        assert len(strategy.plugins[0].storage_policy.buffer) == 40
    if name == "ewc":
        assert sum(float(v.data.abs().sum())
                   for v in strategy.plugins[0].importances[0].values()) > 0
    if name == "lwf":
        assert strategy.plugins[0].lwf.prev_classes_by_task[0] == set(range(8))


def test_readme_strategy_example_runs(tmp_path, monkeypatch, cache_dir) -> None:  # noqa: ANN001
    root = Path(__file__).resolve().parents[1]
    (code,) = re.findall(r"```python avalanche-strategies\n(.*?)```",
                         (root / "README.md").read_text(), flags=re.S)
    (tmp_path / "examples").symlink_to(root / "examples")
    (tmp_path / ".comodal_cache").symlink_to(cache_dir)  # the tiny configs' corpus and features
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102
    accuracy = namespace["results"]["Top1_Acc_Stream/eval_phase/test_stream/Task000"]
    assert accuracy > 0.5  # 8 classes learned of the 24 the head holds
    assert len(namespace["strategy"].plugins[0].storage_policy.buffer) == 100
