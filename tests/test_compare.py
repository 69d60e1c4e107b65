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


@pytest.fixture(scope="module")
def comparison(tiny_template: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from comodal.cli import main

    tmp = tmp_path_factory.mktemp("compare")
    config = copy.deepcopy(tiny_template)
    config["train"]["epochs"] = 1
    (tmp / "config.yaml").write_text(yaml.safe_dump(config))
    out = tmp / "cmp"
    assert main(["compare", str(tmp / "config.yaml"), "--strategies", "finetune,er+relation_kd",
                 "--seeds", "2", "--out", str(out)]) == 0
    return out


def test_compare_writes_every_run_table_and_plot(comparison: Path) -> None:
    for stack in ("finetune", "er+relation_kd"):
        for seed in (0, 1):
            assert (comparison / stack / f"seed{seed}" / "metrics.json").is_file()
    for name in ("matrices", "stream", "stability_plasticity"):
        assert (comparison / "plots" / f"{name}.png").stat().st_size > 10_000
    assert list((comparison / "tb").iterdir())


def test_a_repeated_compare_trains_nothing(comparison: Path, capsys) -> None:  # noqa: ANN001
    from comodal.cli import main

    stamp = (comparison / "finetune" / "seed0" / "metrics.json").stat().st_mtime_ns
    plan = yaml.safe_load((comparison / "compare.json").read_text())
    assert main(["compare", str(comparison.parent / "config.yaml"), "--strategies",
                 ",".join(plan["strategies"]), "--seeds", "2", "--out", str(comparison)]) == 0
    assert "0 runs trained, 4 already finished" in capsys.readouterr().out
    assert (comparison / "finetune" / "seed0" / "metrics.json").stat().st_mtime_ns == stamp


def test_the_table_equals_a_direct_computation_from_the_runs(comparison: Path) -> None:
    import csv
    import json
    import statistics

    rows = {r["strategy"]: r for r in csv.DictReader((comparison / "summary.csv").open())}
    for stack in ("finetune", "er+relation_kd"):
        values = [json.loads((comparison / stack / f"seed{s}" / "metrics.json").read_text())
                  ["summary"]["recall@1"]["bwt"] for s in (0, 1)]
        assert float(rows[stack]["R@1 BWT mean"]) == pytest.approx(statistics.fmean(values),
                                                                   abs=1e-6)
        assert float(rows[stack]["R@1 BWT std"]) == pytest.approx(statistics.stdev(values),
                                                                  abs=1e-6)
    text = (comparison / "summary.md").read_text()
    assert text.count("**") >= 2 * 8  # a best value marked in every column
    assert "relation_kd.weight = 1.0" in text  # the options of each row


def test_report_reproduces_the_same_table(comparison: Path) -> None:
    from comodal.cli import main

    before = (comparison / "summary.md").read_text(), (comparison / "summary.csv").read_text()
    (comparison / "summary.md").unlink()
    assert main(["report", str(comparison)]) == 0
    assert ((comparison / "summary.md").read_text(),
            (comparison / "summary.csv").read_text()) == before


def test_bad_compare_input_is_a_clear_error(comparison: Path, capsys) -> None:  # noqa: ANN001
    from comodal.cli import main

    config = str(comparison.parent / "config.yaml")
    assert main(["compare", config, "--strategies", "finetune,nope"]) == 2
    assert "unknown strategy 'nope'" in capsys.readouterr().err
    assert main(["report", str(comparison.parent / "missing")]) == 2
    assert "no finished runs" in capsys.readouterr().err
