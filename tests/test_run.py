"""End to end on the embedded corpus: learnable, forgets under finetuning, joint is the upper
bound, reproducible, and the run directory holds what a researcher needs."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import yaml

from comodal.cli import main
from comodal.config import RunConfig, from_dict
from comodal.platform.run import RunResult, run

CHANCE = 1 / 120  # R@1 with a 120-item test pool


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, tiny_template: dict) -> dict[str, RunResult]:
    base = copy.deepcopy(tiny_template)
    base["train"]["epochs"] = 6
    out = {}
    for name in ("finetune", "joint", "finetune-again"):
        config = copy.deepcopy(base)
        config["strategies"] = [name.split("-")[0]]
        config["out"] = str(tmp_path_factory.mktemp(name))
        out[name] = run(from_dict(RunConfig, config))
    return out


def test_every_task_is_learned_far_above_chance(runs: dict[str, RunResult]) -> None:
    r1 = runs["joint"].matrices["recall@1"]
    assert r1.shape == (5, 4)
    assert (r1[0] < 5 * CHANCE).all()  # before training: near chance
    assert (r1[-1] > 5 * CHANCE).all(), r1[-1]


def test_finetuning_forgets_and_joint_is_the_upper_bound(runs: dict[str, RunResult]) -> None:
    finetune, joint = runs["finetune"].summary["recall@1"], runs["joint"].summary["recall@1"]
    assert finetune["bwt"] < -0.05
    assert finetune["forgetting"] > 0.05
    assert joint["acc"] > finetune["acc"] + 0.03


def test_training_loss_goes_down_within_each_task(runs: dict[str, RunResult]) -> None:
    history = json.loads((runs["finetune"].out / "metrics.json").read_text())["history"]
    for task in range(4):
        losses = [h["loss"] for h in history if h["task"] == task]
        assert len(losses) == 6 and losses[-1] < losses[0]


def test_same_config_and_seed_give_the_same_metrics(runs: dict[str, RunResult]) -> None:
    a, b = runs["finetune"].matrices, runs["finetune-again"].matrices
    assert a.keys() == b.keys()
    for metric in a:
        assert torch.equal(a[metric].nan_to_num(-1), b[metric].nan_to_num(-1)), metric


def test_run_directory_contents(runs: dict[str, RunResult]) -> None:
    out = runs["finetune"].out
    assert yaml.safe_load((out / "config.yaml").read_text())["strategies"] == ["finetune"]
    csv = (out / "matrices" / "recall@1.csv").read_text().splitlines()
    assert csv[0].startswith("after,1:toys:vision-text") and csv[1].startswith("before,")
    assert len(csv) == 6
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["summary"]["recall@1"]) == {
        "acc", "avg_inc_acc", "bwt", "fwt", "forgetting", "plasticity"}
    assert torch.allclose(torch.tensor(metrics["matrices"]["recall@1"]),
                          runs["finetune"].matrices["recall@1"], atol=1e-6)
    assert "recall@1_ab" in metrics["matrices"] and "zeroshot" in metrics["matrices"]
    assert list((out / "tb").glob("events.out.tfevents.*"))


def test_tensorboard_has_a_scalar_per_task_and_metric(runs: dict[str, RunResult]) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(runs["finetune"].out / "tb"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert "eval/recall@1/2:kitchen:audio-text" in tags
    assert "summary/recall@1/bwt" in tags
    steps = [e.step for e in events.Scalars("eval/recall@1/1:toys:vision-text")]
    assert steps == [0, 1, 2, 3, 4]


def test_cli_prints_matrix_and_summaries_side_by_side(
    runs: dict[str, RunResult], capsys: pytest.CaptureFixture
) -> None:
    assert main(["summarize", str(runs["finetune"].out), str(runs["joint"].out)]) == 0
    text = capsys.readouterr().out
    assert "recall@1" in text and "bwt" in text and "forgetting" in text
    names = runs["finetune"].out.name, runs["joint"].out.name
    assert any(all(n in line for n in names) for line in text.splitlines())
