"""Checkpoints and exact resume, the comparison command, its tables, plots and report, and
bring-your-own-features datasets."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from helpers import Kill, class_incremental, load_dict

from comodal.config import load_config
from comodal.platform.run import build_trainer, identity
from comodal.scenarios.registry import build_scenario
from comodal.strategies.registry import build_strategies

KEPT = {"keep_optimizer": True, "scheduler": {"name": "cosine", "warmup_epochs": 0.5}}


@pytest.mark.parametrize("kind,stack,train", [
    ("pairs", ["er", "dns"], {}), ("classes", ["coconut", "kd"], {}),
    ("pairs", ["finetune"], KEPT),  # the optimizer's moments come back too
])
def test_a_run_killed_after_a_task_resumes_to_the_uninterrupted_metrics(
        tiny: dict, tmp_path: Path, kind: str, stack: list[str], train: dict) -> None:
    base = tiny if kind == "pairs" else class_incremental(tiny)
    base["train"].update(epochs=2, **train)
    base["strategies"] = stack
    config = load_dict(base, tmp_path)
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
    config = load_dict(tiny, tmp_path)
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


def _finetune_compare(tiny: dict, tmp_path: Path, tasks: int) -> tuple[list[str], Path, Path]:
    """``compare`` argv of one finetune seed over the first ``tasks`` tasks at one epoch, the
    comparison directory and its run directory."""
    tiny["scenario"]["tasks"] = tiny["scenario"]["tasks"][:tasks]
    tiny["train"]["epochs"] = 1
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(tiny))
    out = tmp_path / "cmp"
    argv = ["compare", str(tmp_path / "config.yaml"), "--strategies", "finetune", "--seeds", "1",
            "--out", str(out)]
    return argv, out, out / "finetune" / "seed0"


def test_a_finished_run_of_another_config_is_refused_then_rerun_on_request(
        tiny: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from comodal.cli import main

    argv, out, run = _finetune_compare(tiny, tmp_path, tasks=1)
    assert main(argv) == 0
    stamp, plan = (run / "metrics.json").stat().st_mtime_ns, (out / "compare.json").read_text()
    capsys.readouterr()
    assert main([*argv, "--set", "train.epochs=2"]) == 2
    err = capsys.readouterr().err
    assert f"{run}: made with another config (train.epochs: 1 -> 2)" in err
    assert "--rerun" in err
    assert (run / "metrics.json").stat().st_mtime_ns == stamp  # nothing trained
    assert (out / "compare.json").read_text() == plan  # nor the plan rewritten
    assert main([*argv, "--set", "train.epochs=2", "--rerun"]) == 0
    assert "1 runs trained, 0 already finished" in capsys.readouterr().out
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["epochs"] == 2
    history = json.loads((run / "metrics.json").read_text())["history"]
    assert [h["epoch"] for h in history] == [0, 1]  # retrained from scratch with two epochs
    assert main([*argv, "--set", "train.epochs=2"]) == 0  # the same config reuses the run
    assert "0 runs trained, 1 already finished" in capsys.readouterr().out


def test_a_partial_comparison_is_reported_as_partial(
        comparison: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import shutil

    from comodal.cli import main

    partial = tmp_path / "cmp"
    shutil.copytree(comparison, partial)
    shutil.rmtree(partial / "er+relation_kd" / "seed1")
    assert main(["report", str(partial)]) == 0
    err = capsys.readouterr().err
    assert "comodal: warning: 1 planned runs have not finished" in err
    assert "er+relation_kd seed1" in err
    text = (partial / "summary.md").read_text()
    assert "Not finished, left out: er+relation_kd seed1." in text
    assert "best in its column among entries with all 2 seeds" in text
    row = next(line for line in text.splitlines() if line.startswith("| er+relation_kd |"))
    acc = json.loads((partial / "er+relation_kd" / "seed0" / "metrics.json").read_text())[
        "summary"]["recall@1"]["acc"]
    assert f"| {acc:.3f} (1 seed) |" in row  # one seed: no std, and never "± 0.000"
    assert "±" not in row and "**" not in row  # fewer seeds than asked never wins bold
    finetune = next(line for line in text.splitlines() if line.startswith("| finetune |"))
    assert finetune.count("**") >= 2 * 6


def test_bad_compare_input_is_a_clear_error(comparison: Path, capsys) -> None:  # noqa: ANN001
    from comodal.cli import main

    config = str(comparison.parent / "config.yaml")
    assert main(["compare", config, "--strategies", "finetune,nope"]) == 2
    assert "unknown strategy 'nope'" in capsys.readouterr().err
    assert main(["report", str(comparison.parent / "missing")]) == 2
    assert "no finished runs" in capsys.readouterr().err


# ----------------------------------------------------------------------------- own features
def _write_features(root: Path, n: int = 240, d: int = 16) -> dict:
    """An index CSV and three modalities of embeddings of shared latents (ids a0, a1, ...)."""
    import numpy as np
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    latent = torch.randn(n, d, generator=g)
    ids = [f"a{i}" for i in range(n)]
    rows = ["id,split,label"] + [f"{ids[i]},{'train' if i % 4 else 'test'},{i % 3}"
                                 for i in range(n)]
    (root / "index.csv").write_text("\n".join(rows) + "\n")
    views = {m: latent @ torch.randn(d, d, generator=g) + 0.1 * torch.randn(n, d, generator=g)
             for m in ("vision", "audio", "text")}
    np.save(root / "vision.npy", views["vision"].numpy())
    np.save(root / "audio.npy", views["audio"].numpy())
    (root / "audio.npy.ids").write_text("\n".join(ids) + "\n")
    save_file({"embeddings": views["text"]}, str(root / "text.safetensors"),
              metadata={"ids": json.dumps(ids)})
    return {"index": str(root / "index.csv"),
            "modalities": {m: str(root / f"{m}.{'safetensors' if m == 'text' else 'npy'}")
                           for m in ("vision", "audio", "text")}}


def _byo_config(tmp_path: Path, features: dict) -> dict:
    return {
        "strategies": ["finetune"], "progress": False, "out": str(tmp_path / "run"),
        "data": {"cache_dir": str(tmp_path / "cache"), "features": {"mine": features}},
        "model": {"joint_dim": 16, "modalities": {
            m: {"encoder": "features", "dim": 16} for m in ("vision", "audio", "text")}},
        "scenario": {"tasks": [{"dataset": "features/mine", "modalities": ["vision", "text"]},
                               {"dataset": "features/mine", "modalities": ["audio", "text"]}]},
        "train": {"epochs": 20, "lr": 0.01, "batch_size": 32},
    }


def test_own_features_run_a_two_task_scenario(tmp_path: Path) -> None:
    from comodal.platform.run import run

    features = _write_features(tmp_path)
    result = run(load_dict(_byo_config(tmp_path, features), tmp_path))
    r1 = result.matrices["recall@1"]
    assert r1.shape == (3, 2)
    assert r1[1, 0] > 0.2 and r1[2, 1] > 0.2  # 60 test items: chance is 0.017
    assert result.task_names == ["1:mine:vision-text", "2:mine:audio-text"]


@pytest.mark.parametrize("damage,message", [
    ("rows", "has 200 rows but .* lists 240 items"),
    ("ids", "row 3 has id 'x' where .* has 'a3'"),
    ("safetensors-ids", "row 0 has id 'b0' where .* has 'a0'"),
    ("split", "split 'dev' is not one of train, test"),
])
def test_own_features_with_mismatched_rows_or_ids_are_clear_errors(
        tmp_path: Path, damage: str, message: str) -> None:
    import numpy as np
    from safetensors.torch import save_file

    from comodal.errors import DataError
    from comodal.platform.run import run

    features = _write_features(tmp_path)
    if damage == "rows":
        np.save(tmp_path / "vision.npy", np.zeros((200, 16), dtype=np.float32))
    elif damage == "ids":
        ids = (tmp_path / "audio.npy.ids").read_text().split("\n")
        ids[3] = "x"
        (tmp_path / "audio.npy.ids").write_text("\n".join(ids))
    elif damage == "safetensors-ids":
        save_file({"embeddings": torch.zeros(240, 16)}, str(tmp_path / "text.safetensors"),
                  metadata={"ids": json.dumps([f"b{i}" for i in range(240)])})
    else:
        text = (tmp_path / "index.csv").read_text().replace("a5,train", "a5,dev")
        (tmp_path / "index.csv").write_text(text)
    with pytest.raises(DataError, match=message):
        run(load_dict(_byo_config(tmp_path, features), tmp_path))


def test_a_plan_gives_each_stack_its_own_options(tiny: dict, tmp_path: Path) -> None:
    from comodal.errors import ConfigError
    from comodal.platform.compare import plan

    tiny["strategy_args"] = {"er": {"size": 10}, "relation_kd": {"weight": 2.0}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tiny))
    config = load_config(path, check=False)  # finetune alone would refuse these options
    runs = plan(config, ["finetune", "er+relation_kd"], 2, tmp_path / "out")
    assert [(r.stack, r.seed) for r in runs] == [("finetune", 0), ("finetune", 1),
                                                 ("er+relation_kd", 0), ("er+relation_kd", 1)]
    assert runs[0].config.strategy_args == {}
    assert runs[2].config.strategy_args == tiny["strategy_args"]
    assert runs[3].out == tmp_path / "out" / "er+relation_kd" / "seed1"
    with pytest.raises(ConfigError, match="strategy_args.relation_kd: 'relation_kd' is in no"):
        plan(config, ["finetune", "er"], 1, tmp_path / "out")


def test_an_entry_carries_its_own_strategy_options(tiny: dict, tmp_path: Path) -> None:
    from comodal.errors import ConfigError
    from comodal.platform.compare import parse_stacks, plan

    tiny["strategy_args"] = {"er": {"size": 10, "policy": "experience"}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tiny))
    config = load_config(path, check=False)
    stacks = parse_stacks("dns, dns(preset=paper,mode=update), er(size=20)+relation_kd(weight=0.5)")
    assert parse_stacks("cflat(rho=1.0e+3)+er") == ["cflat(rho=1.0e+3)+er"]
    assert stacks == ["dns", "dns(preset=paper,mode=update)",
                      "er(size=20)+relation_kd(weight=0.5)"]
    runs = plan(config, stacks, 1, tmp_path / "out")
    assert runs[0].config.strategy_args == {}
    assert runs[1].config.strategies == ["dns"]
    assert runs[1].config.strategy_args == {"dns": {"preset": "paper", "mode": "update"}}
    # the entry's options override the config's, which its other options keep
    assert runs[2].config.strategy_args == {"er": {"size": 20, "policy": "experience"},
                                            "relation_kd": {"weight": 0.5}}
    assert runs[2].out == tmp_path / "out" / "er(size=20)+relation_kd(weight=0.5)" / "seed0"
    (bigger,) = plan(config, ["cflat(rho=1.0e+3)+er"], 1, tmp_path / "out")
    assert bigger.config.strategy_args["cflat"] == {"rho": 1000.0}
    for bad, message in (("dns(preset)", "'preset' is not option=value"),
                         ("dns(preset=paper", "balanced parentheses"),
                         ("dns[preset=paper]", "is not a strategy name"),
                         ("dns(nope=1)", "--strategies 'dns\\(nope=1\\)': strategy_args.dns")):
        with pytest.raises(ConfigError, match=message):
            plan(config, parse_stacks(bad + ",er"), 1, tmp_path / "out")


def test_cmcl_columns_are_the_papers_and_equal_the_runs_summaries(comparison: Path) -> None:
    import csv
    import json

    from comodal.cli import main
    from comodal.errors import DataError
    from comodal.platform import report

    assert main(["report", str(comparison), "--columns", "cmcl"]) == 0
    header = (comparison / "summary.md").read_text().splitlines()[0]
    assert header == ("| strategy | seeds | zero-shot Acc | zero-shot BWT | R@1 | R@5 | R@10 "
                      "| R@10 BWT |")
    rows = {r["strategy"]: r for r in csv.DictReader((comparison / "summary.csv").open())}
    for column, metric, key in (("zero-shot BWT", "zeroshot", "bwt"), ("R@5", "recall@5", "acc"),
                                ("R@10 BWT", "recall@10", "bwt")):
        values = [json.loads((comparison / "finetune" / f"seed{s}" / "metrics.json")
                             .read_text())["summary"][metric][key] for s in (0, 1)]
        assert float(rows["finetune"][f"{column} mean"]) == pytest.approx(sum(values) / 2,
                                                                          abs=1e-6)
    # without --columns, report uses the columns compare was given (saved in compare.json)
    plan_path = comparison / "compare.json"
    plan = json.loads(plan_path.read_text())
    assert plan["columns"] == "default"
    try:
        plan_path.write_text(json.dumps({**plan, "columns": "cmcl"}))
        assert main(["report", str(comparison)]) == 0
        assert (comparison / "summary.md").read_text().splitlines()[0] == header
    finally:
        plan_path.write_text(json.dumps(plan))
    assert main(["report", str(comparison)]) == 0  # back to the default columns
    assert "R@1 Plasticity" in (comparison / "summary.md").read_text().splitlines()[0]
    runs = report.load_runs(comparison)
    for rs in runs.values():
        for r in rs:
            del r["summary"]["zeroshot"]
    with pytest.raises(DataError, match="--columns cmcl: the CMCL table needs zeroshot"):
        report.markdown(runs, kind="cmcl")


def test_results_and_checkpoints_of_an_older_comodal_are_never_reused_or_mixed(
        tiny: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from comodal.cli import main

    argv, out, run = _finetune_compare(tiny, tmp_path, tasks=2)
    assert main(argv) == 0
    shutil.copytree(run, out / "copy" / "seed0")  # a run of the current format beside it
    metrics = json.loads((run / "metrics.json").read_text())
    del metrics["results_format"]  # as comodal wrote it before formats were recorded
    (run / "metrics.json").write_text(json.dumps(metrics))
    capsys.readouterr()
    assert main(["report", str(out)]) == 2
    assert "finetune/seed0: written by an older comodal (results format 1" in \
        capsys.readouterr().err
    assert main(["summarize", str(run), str(out / "copy" / "seed0")]) == 2
    assert main(argv) == 2
    assert "results_format: 1 -> 2" in capsys.readouterr().err

    # an interrupted run whose checkpoint an older comodal wrote: refused up front, and by --resume
    (run / "metrics.json").unlink()
    path = run / "checkpoints" / "after_task_1.pt"
    state = torch.load(path, weights_only=True)
    state["config"] = state["config"].replace("results_format: 2\n", "")
    torch.save(state, path)
    (run / "checkpoints" / "after_task_2.pt").unlink()
    assert main(argv) == 2
    assert "results_format: (unset) -> 2" in capsys.readouterr().err
    assert main(["run", str(tmp_path / "config.yaml"), "--out", str(run), "--resume"]) == 2
    assert "results_format: (unset) -> 2" in capsys.readouterr().err
    assert main([*argv, "--rerun"]) == 0
    assert json.loads((run / "metrics.json").read_text())["results_format"] == 2


def test_the_readme_cmcl_table_command_plans_every_entry(tmp_path: Path) -> None:
    """The README's CMCL comparison (examples/cmcl_stream.yaml): eight pair tasks of changing
    modality pairs, and every entry of its command a valid run."""
    import re

    from comodal.platform.compare import parse_stacks, plan

    root = Path(__file__).resolve().parents[1]
    command = re.search(r"comodal compare examples/cmcl_stream\.yaml .*?--strategies '([^']+)'",
                        (root / "README.md").read_text(), re.S)
    config = load_config(root / "examples" / "cmcl_stream.yaml", check=False)
    pairs = [tuple(t.modalities) for t in config.scenario.tasks]
    assert len(pairs) == 8 and len({frozenset(p) for p in pairs}) == 3
    runs = plan(config, parse_stacks(command.group(1)), 3, tmp_path)
    stacks = {r.stack for r in runs}
    assert {"gem", "agem", "der", "derpp", "co2l", "cflat", "cila", "dns(preset=paper)"} <= stacks
    assert len(runs) == 3 * len(stacks) == 48
