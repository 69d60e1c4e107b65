"""Checkpoints and exact resume, the comparison command, its tables, plots and report, and
bring-your-own-features datasets."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import yaml

from comodal.config import load_config
from comodal.platform.run import build_trainer, identity
from comodal.scenarios.registry import build_scenario
from comodal.strategies.base import Strategy
from comodal.strategies.registry import build_strategies


def _load(config: dict, tmp_path: Path):  # noqa: ANN202
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return load_config(path)


class Kill(Strategy):
    """Stops the run when task ``at`` is about to start (a simulated kill)."""

    name = "kill"

    def __init__(self, at: int | None) -> None:
        super().__init__()
        self.at = at

    def before_training_exp(self, strategy, **kwargs) -> None:  # noqa: ANN001
        if strategy.experience_index == self.at:
            raise KeyboardInterrupt


def _ci(tiny: dict) -> dict:
    config = copy.deepcopy(tiny)
    config["model"]["modalities"] = {"vision": {"encoder": "image-stats"},
                                     "text": {"encoder": "hf"}}
    config["scenario"] = {"class_incremental": {"dataset": "synth-pairs/all",
                                                "modalities": ["vision", "text"],
                                                "increments": [8]}}
    return config


@pytest.mark.parametrize("kind,stack", [("pairs", ["er", "dns"]), ("classes", ["coconut", "kd"])])
def test_a_run_killed_after_a_task_resumes_to_the_uninterrupted_metrics(
        tiny: dict, tmp_path: Path, kind: str, stack: list[str]) -> None:
    base = tiny if kind == "pairs" else _ci(tiny)
    base["train"]["epochs"] = 2
    base["strategies"] = stack
    config = _load(base, tmp_path)
    scenario = build_scenario(config)

    def trainer(kill_at: int | None):  # noqa: ANN202
        return build_trainer(config, [*build_strategies(stack, {}), Kill(kill_at)])

    whole = trainer(None).fit(scenario)
    checkpoints = tmp_path / "checkpoints"
    with pytest.raises(KeyboardInterrupt):
        trainer(2).fit(scenario, checkpoints, identity(config))
    assert sorted(p.name for p in checkpoints.iterdir()) == ["after_task_1.pt", "after_task_2.pt"]
    resumed_trainer = trainer(None)
    resumed = resumed_trainer.fit(scenario, checkpoints, identity(config))
    assert resumed_trainer.history[0]["task"] == 0  # the history of the first tasks came back
    assert whole.keys() == resumed.keys()
    for metric in whole:
        assert torch.equal(torch.nan_to_num(whole[metric], -1),
                           torch.nan_to_num(resumed[metric], -1)), metric


def test_a_checkpoint_of_another_config_is_refused(tiny: dict, tmp_path: Path) -> None:
    from comodal.errors import ConfigError

    tiny["train"]["epochs"] = 1
    config = _load(tiny, tmp_path)
    build_trainer(config).fit(build_scenario(config), tmp_path / "ck", identity(config))
    config.train.lr = 0.5
    with pytest.raises(ConfigError, match="another config"):
        build_trainer(config).fit(build_scenario(config), tmp_path / "ck", identity(config))
