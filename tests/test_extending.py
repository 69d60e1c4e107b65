"""Plugins and user code: ``plugins:`` built afresh for every run after the strategies,
``imports:`` registering strategies and datasets, entry points of installed packages, and
checkpoints, ``--resume``, ``compare`` and ``report`` of such runs."""

from __future__ import annotations

import contextlib
import copy
import importlib
import importlib.metadata
import json
import re
import sys
import tomllib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from helpers import load_dict

import comodal
from comodal import entry_points
from comodal.build import build_plugins, check, check_resume, stateless_plugins
from comodal.cli import main
from comodal.config import RunConfig, from_dict, load_config
from comodal.errors import ConfigError
from comodal.platform import compare
from comodal.platform.run import build_trainer, run
from comodal.scenarios import registry as datasets
from comodal.strategies import registry as strategies
from comodal.strategies.base import Strategy

EWC = "avalanche.training.plugins.EWCPlugin"
README = Path(__file__).resolve().parents[1] / "README.md"

# A user's module: a strategy, a dataset and two plugins. ``CALLS`` records who ran at each
# training step, in order.
LAB = '''
from dataclasses import dataclass

import torch

from avalanche.core import SupervisedPlugin
from comodal import (DatasetSpec, MultimodalDataset, Splits, Strategy, register_dataset,
                     register_strategy)

CALLS = []


@dataclass
class CountingOptions:
    every: int = 1


@register_strategy
class Counting(Strategy):
    name = "{strategy}"
    Config = CountingOptions
    kinds = ("pair",)

    def __init__(self, config=None):
        super().__init__(config)
        self.steps = 0

    def before_backward(self, strategy, **kwargs):
        self.steps += 1
        CALLS.append("strategy")

    def state_dict(self):
        return {{"steps": self.steps}}

    def load_state_dict(self, state):
        self.steps = state["steps"]

    def results(self):
        return {{"steps": self.steps}}


class Recorder(SupervisedPlugin):
    built = []

    def __init__(self, tag="plugin"):
        super().__init__()
        self.tag, self.steps = tag, 0
        Recorder.built.append(self)

    def before_backward(self, strategy, **kwargs):
        self.steps += 1
        CALLS.append(self.tag)

    def state_dict(self):
        return {{"steps": self.steps}}

    def load_state_dict(self, state):
        self.steps = state["steps"]


class Forgetful(SupervisedPlugin):
    """Keeps state (its step count) but has no state_dict, as EWCPlugin."""

    def __init__(self):
        super().__init__()
        self.steps = 0

    def before_backward(self, strategy, **kwargs):
        self.steps += 1


def build(data, progress):
    g = torch.Generator().manual_seed(0)

    def split(which, n):
        vision = torch.randn(n, 8, generator=g)
        text = vision + 0.1 * torch.randn(n, 8, generator=g)
        return MultimodalDataset("{dataset}", "{dataset}-" + which,
                                 {{"vision": vision, "text": text}})

    return Splits(split("train", 96), split("test", 48))


register_dataset(DatasetSpec("{dataset}", ("vision", "text"), build))
'''


@pytest.fixture()
def registries(monkeypatch: pytest.MonkeyPatch) -> None:
    """Registrations and loaded entry points of a test are undone after it."""
    datasets.dataset_names()  # the built-in datasets, before copying
    monkeypatch.setattr(strategies, "STRATEGIES", dict(strategies.STRATEGIES))
    monkeypatch.setattr(datasets, "_DATASETS", dict(datasets._DATASETS))
    monkeypatch.setattr(entry_points, "_LOADED", set())


@contextlib.contextmanager
def _module(directory: Path, monkeypatch: pytest.MonkeyPatch, source: str,
            prefix: str) -> Iterator[str]:
    """``source`` as a new module importable from ``directory``, forgotten afterwards."""
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    directory.mkdir(exist_ok=True)
    (directory / f"{name}.py").write_text(source)
    monkeypatch.syspath_prepend(str(directory))
    try:
        yield name
    finally:
        sys.modules.pop(name, None)


@pytest.fixture()
def lab(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        registries: None) -> Iterator[SimpleNamespace]:
    """The lab module (not imported yet), with the names it registers."""
    suffix = uuid.uuid4().hex[:6]
    names = {"strategy": f"counting_{suffix}", "dataset": f"lab/toy-{suffix}"}
    source = LAB.format(**names)
    with _module(tmp_path / "code", monkeypatch, source, "lab") as module:
        yield SimpleNamespace(module=module, **names)


def _lab_config(lab: SimpleNamespace, tmp_path: Path, **fields: object) -> dict:
    """Two tasks of the lab's dataset on feature encoders, one epoch each: seconds to run."""
    config = {
        "progress": False, "imports": [lab.module], "strategies": [lab.strategy],
        "data": {"cache_dir": str(tmp_path / "cache")},
        "model": {"joint_dim": 16, "modalities": {
            "vision": {"encoder": "features", "dim": 8},
            "text": {"encoder": "features", "dim": 8}}},
        "scenario": {"tasks": [
            {"dataset": lab.dataset, "modalities": ["vision", "text"], "name": "a"},
            {"dataset": lab.dataset, "modalities": ["text", "vision"], "name": "b"}]},
        "train": {"epochs": 1, "batch_size": 32},
        "eval": {"pool_draws": 1},
    }
    config.update(fields)
    return config


def _write(config: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


# ---------------------------------------------------------------------------- end to end
def test_an_imported_strategy_runs_on_the_tiny_corpus(tiny: dict, lab: SimpleNamespace,
                                                      tmp_path: Path) -> None:
    tiny["scenario"]["tasks"] = tiny["scenario"]["tasks"][:2]
    tiny["train"]["epochs"] = 1
    tiny.update(imports=[lab.module], strategies=[lab.strategy], out=str(tmp_path / "run"))
    config = load_config(_write(tiny, tmp_path / "c.yaml"))  # no registry consulted yet
    assert lab.module not in sys.modules
    result = run(config)  # imports the lab module, which registers the strategy
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["tasks"] == result.task_names and len(result.task_names) == 2
    assert metrics["strategies"][lab.strategy]["steps"] > 0


def test_plugins_follow_the_strategies_and_are_checkpointed_by_position(
        lab: SimpleNamespace, tmp_path: Path) -> None:
    out = tmp_path / "run"
    plugin = {"class": f"{lab.module}.Recorder", "args": {"tag": "plugin"}}
    path = _write(_lab_config(lab, tmp_path, plugins=[plugin], out=str(out)), tmp_path / "c.yaml")
    run(load_config(path))
    module = sys.modules[lab.module]
    steps = module.Recorder.built[-1].steps
    assert steps > 0 and module.CALLS == ["strategy", "plugin"] * steps  # plugin after strategy
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["strategies"][lab.strategy]["steps"] == steps
    assert yaml.safe_load((out / "config.yaml").read_text())["plugins"] == [plugin]
    assert any((out / "tb").iterdir())
    state = torch.load(out / "checkpoints" / "after_task_2.pt", weights_only=True)
    assert state["strategies"][:2] == [{"steps": steps}, {"steps": steps}]  # by position

    built = len(module.Recorder.built)
    run(load_config(path), resume=True)  # finished: trains nothing, restores every state
    assert len(module.Recorder.built) == built + 2  # fresh objects: by check, by the run
    assert module.Recorder.built[-1].steps == steps and len(module.CALLS) == 2 * steps


def test_a_trainer_gets_fresh_plugins_after_its_strategies(lab: SimpleNamespace,
                                                           tmp_path: Path) -> None:
    plugin = {"class": f"{lab.module}.Recorder"}
    config = load_dict(_lab_config(lab, tmp_path, strategies=["finetune", lab.strategy],
                                   plugins=[plugin, plugin]), tmp_path)
    first, second = build_trainer(config).plugins, build_trainer(config).plugins
    module = sys.modules[lab.module]
    assert [type(p) for p in first] == [strategies.STRATEGIES["finetune"], module.Counting,
                                        module.Recorder, module.Recorder]
    assert first[2] is not first[3] and not set(map(id, first)) & set(map(id, second))


def test_a_plugin_without_state_dict_keeps_checkpoints_but_refuses_resume(
        lab: SimpleNamespace, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    config = _lab_config(lab, tmp_path, plugins=[{"class": f"{lab.module}.Forgetful"}])
    path = _write(config, tmp_path / "c.yaml")
    assert main(["run", str(path), "--out", str(out)]) == 0
    finished = {p: p.stat().st_mtime_ns for p in (out / "checkpoints").iterdir()}
    assert sorted(p.name for p in finished) == ["after_task_1.pt", "after_task_2.pt"]
    assert (out / "metrics.json").is_file()
    capsys.readouterr()
    metrics = (out / "metrics.json").stat().st_mtime_ns

    assert main(["run", str(path), "--out", str(out), "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"plugin {lab.module}.Forgetful has no state_dict" in err
    assert "cannot be restored; run without --resume to start over" in err
    assert (out / "metrics.json").stat().st_mtime_ns == metrics  # nothing trained
    assert {p: p.stat().st_mtime_ns for p in (out / "checkpoints").iterdir()} == finished


def test_ewc_plugin_is_built_from_the_config_and_its_state_is_not_resumed(
        tiny: dict, tmp_path: Path) -> None:
    from avalanche.training.plugins import EWCPlugin

    tiny["plugins"] = [{"class": EWC, "args": {"ewc_lambda": 100}}]
    config = load_dict(tiny, tmp_path)
    first, second = build_plugins(config.plugins), build_plugins(config.plugins)
    assert isinstance(first[0], EWCPlugin) and first[0].ewc_lambda == 100
    assert first[0] is not second[0]
    assert stateless_plugins(config) == [EWC]
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    check_resume(config, checkpoints)  # nothing to resume from
    (checkpoints / "after_task_1.pt").write_bytes(b"")
    with pytest.raises(ConfigError, match=f"plugin {EWC} has no state_dict.*EWCPlugin's "
                                          "importances"):
        check_resume(config, checkpoints)


# ---------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(("entry", "fragments"), [
    ({"class": "no_such_pkg_zz.Plugin"},
     ["plugins[1].class: cannot import 'no_such_pkg_zz'", "No module named"]),
    ({"class": "avalanche.training.plugins.NoSuchPlugin"},
     ["plugins[1].class: module 'avalanche.training.plugins' has no 'NoSuchPlugin'"]),
    ({"class": "os.path"}, ["plugins[1].class: 'os.path' is not a class (it is a module)"]),
    ({"class": "EWCPlugin"}, ["plugins[1].class: 'EWCPlugin' is not a dotted path to a class"]),
    ({"class": EWC, "args": {"lambda_": 1}},
     ["plugins[1].args: EWCPlugin refuses {'lambda_': 1}", "unexpected keyword argument",
      "its parameters: (ewc_lambda, mode='separate', decay_factor=None"]),
    ({"class": EWC}, ["plugins[1].args", "missing 1 required positional argument: 'ewc_lambda'"]),
    ({"class": EWC, "args": {"ewc_lambda": 1, "decay_factor": 0.5}},
     ["plugins[1].args: EWCPlugin(**", "failed: AssertionError", "`online` mode"]),
    ({"klass": EWC}, ["plugins[1]: unknown key 'klass' (valid keys: class, args)"]),
    ({"args": {}}, ["plugins[1].class: required field is missing"]),
    ({"class": EWC, "args": [1]}, ["plugins[1].args: expected a mapping, got [1]"]),
])
def test_bad_plugin_entries_are_named(tiny: dict, tmp_path: Path, entry: dict,
                                      fragments: list[str]) -> None:
    tiny["plugins"] = [{"class": EWC, "args": {"ewc_lambda": 1}}, entry]
    with pytest.raises(ConfigError) as err:
        check(load_config(_write(tiny, tmp_path / "c.yaml")))
    for fragment in fragments:
        assert fragment in str(err.value)


@pytest.mark.parametrize(("imports", "fragment"), [
    (["no_such_module_zz"], "imports[0]: cannot import 'no_such_module_zz': No module named"),
    (["json", "my lab"], "imports[1]: 'my lab' is not a module name"),
])
def test_bad_imports_are_named(tiny: dict, tmp_path: Path, imports: list[str],
                               fragment: str) -> None:
    tiny["imports"] = imports
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        check(from_dict(RunConfig, tiny))


def test_a_refused_registration_at_import_names_the_import(
        tiny: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, registries: None) -> None:
    source = ("from comodal import Strategy, register_strategy\n\n\n"
              "@register_strategy\nclass Mine(Strategy):\n    name = 'finetune'\n")
    with _module(tmp_path / "code", monkeypatch, source, "clash") as module:
        tiny["imports"] = [module]
        with pytest.raises(ConfigError) as err:
            check(from_dict(RunConfig, tiny))
        assert str(err.value).startswith(f"imports[0]: importing '{module}': register_strategy")
        assert "'finetune' is taken by comodal.strategies.finetune.Finetune" in str(err.value)


def test_the_cli_refuses_a_bad_plugin_before_generating_data(
        tiny: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    tiny["data"]["cache_dir"] = str(tmp_path / "fresh-cache")
    tiny["plugins"] = [{"class": EWC, "args": {"lambda": 1}}]
    path = _write(tiny, tmp_path / "c.yaml")
    assert main(["run", str(path), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("comodal: error: plugins[0].args: EWCPlugin refuses")
    assert not (tmp_path / "fresh-cache").exists() and not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------- registries
def test_register_strategy_refuses_what_is_not_a_strategy(registries: None) -> None:
    def strategy(class_name: str = "Made", **attributes: object) -> type:
        return type(class_name, (Strategy,), {"__module__": __name__, **attributes})

    @dataclass
    class Options:
        weight: float = 1.0

    cases = [
        (int, "register_strategy: <class 'int'> is not a comodal strategy"),
        (strategy(), "'name' must be letters, digits, _ or -"),
        (strategy(name="a+b"), "got 'a+b'"),
        (strategy(name="mine", Config=dict), "'Config' must be a dataclass"),
        (strategy(name="mine", kinds=("pairs",)), "'kinds' must be a non-empty tuple of pair, "
                                                   "classify"),
        (strategy(name="finetune"), "'finetune' is taken by comodal.strategies.finetune"),
    ]
    for cls, fragment in cases:
        with pytest.raises(ConfigError, match=re.escape(fragment)):
            comodal.register_strategy(cls)
    mine = strategy("Mine", name="mine", Config=Options, kinds=("classify",))
    assert comodal.register_strategy(mine) is mine
    assert comodal.register_strategy(mine) is mine  # the same class again: nothing changes
    assert strategies.strategies()["mine"] is mine
    with pytest.raises(ConfigError, match=f"'mine' is taken by {__name__}.Mine"):
        comodal.register_strategy(strategy("Other", name="mine"))
    with pytest.raises(ConfigError, match="strategies: 'mine' works on classify tasks"):
        strategies.validate_strategies(["mine"], {}, "pair")


def test_register_dataset_refuses_duplicates_and_reserved_names(registries: None) -> None:
    spec = comodal.DatasetSpec

    def build(data: object, progress: bool) -> None:
        return None

    cases = [
        ("toys", "register_dataset: expected a comodal.scenarios.registry.DatasetSpec"),
        (spec("features/mine", ("text",), build), "outside features/"),
        (spec("mine", (), build), "modalities must name at least one modality"),
        (spec("mine", ("text",), None), "build must be a function"),
        (spec("synth-pairs/toys", ("vision", "text"), build),
         "the dataset name is taken (registered by comodal.scenarios.synth_pairs)"),
    ]
    for bad, fragment in cases:
        with pytest.raises(ConfigError) as err:
            comodal.register_dataset(bad)
        assert fragment in str(err.value)
    mine = spec("mine", ("vision", "text"), build)
    assert comodal.register_dataset(mine) is mine and comodal.register_dataset(mine) is mine
    assert "mine" in datasets.dataset_names() and datasets.dataset_spec("mine") is mine


def test_a_reloaded_module_registers_its_definitions_again(lab: SimpleNamespace) -> None:
    module = importlib.import_module(lab.module)
    reloaded = importlib.reload(module)  # as a notebook does; a new class of the same code
    assert strategies.strategies()[lab.strategy] is reloaded.Counting
    assert datasets.dataset_spec(lab.dataset).build is reloaded.build


def test_the_package_exports_the_extension_names() -> None:
    assert comodal.register_strategy is strategies.register_strategy
    assert comodal.register_dataset is datasets.register_dataset
    assert comodal.Strategy is Strategy and comodal.Splits is datasets.Splits
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        comodal.nope  # noqa: B018


# ---------------------------------------------------------------------------- entry points
EXTENSION = '''
from comodal import DatasetSpec, Strategy


class Packaged(Strategy):
    name = "packaged"


SPEC = DatasetSpec("packaged/data", ("vision", "text"), lambda data, progress: None)
'''


def test_entry_points_add_strategies_and_datasets_once(
        tiny: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, registries: None) -> None:
    with _module(tmp_path / "code", monkeypatch, EXTENSION, "packaged") as module:
        points = {"comodal.strategies": [importlib.metadata.EntryPoint(
                      "packaged", f"{module}:Packaged", "comodal.strategies")],
                  "comodal.datasets": [importlib.metadata.EntryPoint(
                      "packaged/data", f"{module}:SPEC", "comodal.datasets")]}
        asked, installed = [], importlib.metadata.entry_points

        def found(**params: str) -> object:
            if params.get("group") not in points:  # another library's group
                return installed(**params)
            asked.append(params["group"])
            return points[params["group"]]

        monkeypatch.setattr(importlib.metadata, "entry_points", found)
        tiny["strategies"] = ["packaged"]
        tiny["scenario"]["tasks"] = [{"dataset": "packaged/data", "modalities": ["vision",
                                                                                 "text"]}]
        check(from_dict(RunConfig, tiny))
        assert strategies.strategies()["packaged"].__module__ == module
        assert datasets.dataset_spec("packaged/data").modalities == ("vision", "text")
        assert sorted(asked) == ["comodal.datasets", "comodal.strategies"]  # once each


@pytest.mark.parametrize(("value", "fragment"), [
    ("brokenlab_missing_zz:Ghost", "ModuleNotFoundError: No module named 'brokenlab_missing_zz'"),
    ("json:dumps", "ConfigError: register_strategy: <function dumps"),
])
def test_a_broken_entry_point_names_itself_and_its_distribution(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, registries: None, value: str,
        fragment: str) -> None:
    info = tmp_path / "brokenlab-1.0.dist-info"  # an installed distribution, as pip leaves it
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: brokenlab\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[comodal.strategies]\nghost = {value}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError) as err:
        strategies.strategies()
    assert str(err.value).startswith(f"entry point 'ghost' = '{value}' (group "
                                     "'comodal.strategies', distribution 'brokenlab') is broken")
    assert fragment in str(err.value)


# ---------------------------------------------------------------------------- compare
def test_compare_gives_the_plugins_to_every_entry_reuses_and_reports(
        lab: SimpleNamespace, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    plugin = {"class": f"{lab.module}.Recorder"}
    path = _write(_lab_config(lab, tmp_path, plugins=[plugin]), tmp_path / "c.yaml")
    out = tmp_path / "cmp"
    argv = ["compare", str(path), "--strategies", f"finetune,{lab.strategy}", "--seeds", "1",
            "--out", str(out)]
    assert main(argv) == 0
    for entry in ("finetune", lab.strategy):
        saved = yaml.safe_load((out / entry / "seed0" / "config.yaml").read_text())
        assert saved["plugins"] == [plugin] and saved["imports"] == [lab.module]
    assert f"| {lab.strategy} | 1 |" in (out / "summary.md").read_text()
    assert main(argv) == 0
    assert "0 runs trained, 2 already finished" in capsys.readouterr().out
    assert main([*argv, "--set", "plugins=[]"]) == 2  # the plugins are part of the config
    assert "made with another config (plugins:" in capsys.readouterr().err

    # a new process: neither the lab module nor its strategy is known until report imports it
    del sys.modules[lab.module]
    del strategies.STRATEGIES[lab.strategy], datasets._DATASETS[lab.dataset]
    assert main(["report", str(out)]) == 0
    assert lab.strategy in strategies.STRATEGIES


def test_compare_starts_over_a_run_whose_plugin_state_cannot_be_restored(
        lab: SimpleNamespace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    resumed = []
    monkeypatch.setattr("comodal.platform.run.run",
                        lambda config, resume: resumed.append(resume))
    for plugin, fresh in (("Recorder", False), ("Forgetful", False), ("Recorder", True)):
        config = from_dict(RunConfig, _lab_config(
            lab, tmp_path, plugins=[{"class": f"{lab.module}.{plugin}"}], out=str(tmp_path)))
        compare._train(compare.Planned("x", 0, copy.deepcopy(config), fresh=fresh))
    assert resumed == [True, False, False]


# ---------------------------------------------------------------------------- the README
@pytest.fixture()
def readme_lab(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
               registries: None) -> Iterator[Path]:
    """The README's ``file=`` blocks written out under a directory on ``sys.path``."""
    code = tmp_path / "code"
    blocks = re.findall(r"```\w+ file=(\S+)\n(.*?)```", README.read_text(), flags=re.S)
    assert [name for name, _ in blocks] == ["my_lab.yaml", "my_lab/strategies.py",
                                            "my_lab/datasets.py"]
    for name, body in blocks:
        (code / name).parent.mkdir(parents=True, exist_ok=True)
        (code / name).write_text(body)
    monkeypatch.syspath_prepend(str(code))
    try:
        yield code
    finally:
        for name in [m for m in sys.modules if m.split(".")[0] == "my_lab"]:
            del sys.modules[name]


def test_the_readme_lab_runs_end_to_end(readme_lab: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    config = load_config(readme_lab / "my_lab.yaml", [
        f"data.cache_dir={tmp_path / 'cache'}", "progress=false", "train.epochs=1", f"out={out}"])
    run(config)
    assert json.loads((out / "metrics.json").read_text())["tasks"] == [
        "1:toy:vision-text", "2:toy:text-vision"]
    assert type(strategies.strategies()["shrink"].Config()).__name__ == "ShrinkOptions"
    state = torch.load(out / "checkpoints" / "after_task_2.pt", weights_only=True)
    assert state["strategies"][1]["steps"] > 0  # StepCounter, after the one strategy


def test_the_readme_entry_points_name_what_the_registries_take(
        readme_lab: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (toml,) = re.findall(r"```toml\n(.*?)```", README.read_text(), flags=re.S)
    groups = tomllib.loads(toml)["project"]["entry-points"]
    points = {group: [importlib.metadata.EntryPoint(name, value, group)
                      for name, value in entries.items()] for group, entries in groups.items()}
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: points[group])
    assert sorted(points) == ["comodal.datasets", "comodal.strategies"]
    assert strategies.strategies()["shrink"].__module__ == "my_lab.strategies"
    assert datasets.dataset_spec("my-lab/toy").build.__module__ == "my_lab.datasets"
