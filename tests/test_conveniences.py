"""The conveniences a user expects: ``python -m comodal`` and ``--version``, ``comodal list``,
list indices in ``--set``, learning-rate schedules, TensorBoard written while a run trains
(and not twice after a resume), and where ``compare`` says the scalars are."""

from __future__ import annotations

import contextlib
import copy
import importlib.metadata
import io
import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from helpers import load_dict, load_error

from comodal.cli import main, version
from comodal.config import RunConfig, SchedulerConfig, from_dict, load_config
from comodal.platform.live_log import LiveTensorBoard
from comodal.platform.modalities import ENCODERS
from comodal.platform.run import run
from comodal.platform.schedules import build_scheduler
from comodal.strategies.registry import STRATEGIES

TASKS = ["1:toys:vision-text", "2:gems:vision-text"]


def _scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag in ``logdir`` as (step, value) pairs, in the order TensorBoard reads."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(logdir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)]
            for tag in events.Tags()["scalars"]}


def _images(logdir: Path) -> list[str]:
    """The image tags in ``logdir``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(logdir))
    events.Reload()
    return events.Tags()["images"]


# ------------------------------------------------------------------ python -m, --version
def test_python_m_comodal_prints_the_installed_version() -> None:
    done = subprocess.run([sys.executable, "-m", "comodal", "--version"], capture_output=True,
                          text=True, timeout=300, check=True)
    assert done.stdout == f"comodal {importlib.metadata.version('comodal')}\n"
    assert done.stdout == "comodal 0.1.0\n"  # pyproject.toml's version


def test_version_falls_back_to_the_package_when_not_installed(
        monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", missing)
    assert version() == "0.1.0"


# ------------------------------------------------------------------ comodal list
def test_list_prints_strategies_with_options_and_kinds_datasets_and_encoders(
        capsys: pytest.CaptureFixture) -> None:
    assert main(["list"]) == 0
    text = capsys.readouterr().out
    assert "  ewc (pair)\n      ewc_lambda=100000.0 mode=separate decay_factor=1.0\n" in text
    assert "  finetune (pair, classify, sequence)\n      no options\n" in text
    assert "  coconut (classify, sequence)\n" in text
    assert "  seq_kd (sequence)\n      weight=1.0 beam_width=0\n" in text
    assert all(f"  {name} (" in text for name in STRATEGIES)
    assert re.search(r"\n  synth-pairs/toys +vision, audio, text\n", text)
    assert re.search(r"\n  fsc +audio, text\n", text)
    assert re.search(r"\n  features/<name> +each entry of data.features", text)
    assert "\n  audio   logmel-stats, conv, hf, features\n" in text


def test_list_json_gives_the_same(capsys: pytest.CaptureFixture) -> None:
    assert main(["list", "--json"]) == 0
    found = json.loads(capsys.readouterr().out)
    assert set(found["strategies"]) == set(STRATEGIES)
    assert found["strategies"]["er"]["kinds"] == ["pair", "classify", "sequence"]
    assert found["strategies"]["gem"]["kinds"] == ["pair", "classify"]
    assert found["strategies"]["er"]["options"]["fraction"] == 0.02
    assert found["strategies"]["dns"]["options"]["preset"] is None
    assert found["datasets"]["synth-pairs/gems"] == ["vision", "audio", "text"]
    assert found["encoders"] == {m: list(e) for m, e in ENCODERS.items()}


# ------------------------------------------------------------------ --set with list indices
def test_set_indexes_lists_with_numbers(tiny: dict, tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(tiny))
    config = load_config(path, ["scenario.tasks.1.dataset=synth-pairs/gems",
                                "scenario.tasks.0.modalities.1=audio", "eval.ks.0=3",
                                "model.modalities.vision.encoder=conv"])
    assert config.scenario.tasks[1].dataset == "synth-pairs/gems"
    assert config.scenario.tasks[1].modalities == ["audio", "text"]  # the rest is kept
    assert config.scenario.tasks[0].modalities == ["vision", "audio"]
    assert config.eval.ks == [3, 5, 10]
    assert config.model.modalities["vision"].encoder == "conv"


@pytest.mark.parametrize(("override", "message"), [
    ("scenario.tasks.4.dataset=synth-pairs/gems",
     "index 4 is out of range: scenario.tasks is a list of 4 items (indices 0 to 3)"),
    ("eval.ks.3=5", "index 3 is out of range: eval.ks is a list of 3 items (indices 0 to 2)"),
    ("scenario.tasks.first.dataset=x",
     "scenario.tasks is a list of 4 items; index it with a number (indices 0 to 3), got 'first'"),
    ("scenario.tasks.-1.dataset=x",
     "scenario.tasks is a list of 4 items; index it with a number (indices 0 to 3), got '-1'"),
    ("train.epochs.0=5", "train.epochs is 4, not a mapping or a list"),
])
def test_a_bad_index_names_the_key_path_and_the_length(
        tiny: dict, tmp_path: Path, capsys: pytest.CaptureFixture, override: str,
        message: str) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(tiny))
    assert main(["run", str(path), "--set", override, "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == f"comodal: error: --set {override!r}: {message}\n"
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ schedules
def _lrs(config: SchedulerConfig, steps_per_epoch: int, epochs: int,
         optimizer: torch.optim.Optimizer | None = None) -> list[float]:
    """The lr of every optimizer step of one task, the scheduler stepped after each."""
    optimizer = optimizer or torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    scheduler = build_scheduler(optimizer, config, steps_per_epoch, epochs)
    lrs = []
    for _ in range(steps_per_epoch * epochs):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def test_no_schedule_is_none() -> None:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    assert build_scheduler(optimizer, SchedulerConfig(), 10, 3) is None


def test_warmup_rises_linearly_to_lr_then_cosine_ends_at_min_lr() -> None:
    lrs = _lrs(SchedulerConfig("cosine", warmup_epochs=1, min_lr=0.01), 10, 4)
    assert lrs[:10] == pytest.approx([0.1 * (i + 1) / 10 for i in range(10)])  # 1 epoch of 10
    assert lrs[10] == pytest.approx(0.1)  # after the warmup: lr
    assert lrs[-1] == pytest.approx(0.01)  # the last step: min_lr
    assert all(a > b for a, b in zip(lrs[10:], lrs[11:], strict=False))
    middle = 10 + (len(lrs) - 1 - 10) / 2  # half-way through the cosine: half-way down
    assert lrs[int(middle)] > 0.055 > lrs[math.ceil(middle)]


def test_a_fractional_warmup_counts_iterations() -> None:
    lrs = _lrs(SchedulerConfig("cosine", warmup_epochs=0.5), 10, 2)
    assert lrs[:6] == pytest.approx([0.02, 0.04, 0.06, 0.08, 0.1, 0.1])
    assert lrs[-1] == 0.0


def test_step_decays_by_gamma_every_step_epochs_after_the_warmup() -> None:
    lrs = _lrs(SchedulerConfig("step", warmup_epochs=1, step_epochs=2, gamma=0.5), 5, 6)
    assert lrs[4] == pytest.approx(0.1)  # the warmup's last step
    assert lrs[5:15] == pytest.approx([0.1] * 10)  # 2 epochs of 5 after the warmup
    assert lrs[15:25] == pytest.approx([0.05] * 10)
    assert lrs[25:] == pytest.approx([0.025] * 5)


def test_a_warmup_then_a_gamma_of_one_holds_lr() -> None:
    lrs = _lrs(SchedulerConfig("step", warmup_epochs=2, gamma=1.0), 3, 5)
    assert lrs == pytest.approx([0.1 * (i + 1) / 6 for i in range(6)] + [0.1] * 9)


def test_a_kept_optimizer_starts_each_task_from_lr() -> None:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    config = SchedulerConfig("cosine", min_lr=0.01)
    first = _lrs(config, 4, 2, optimizer)
    assert _lrs(config, 4, 2, optimizer) == first  # not from the first task's last lr
    assert first[0] == pytest.approx(0.1) and first[-1] == pytest.approx(0.01)


@pytest.mark.parametrize(("override", "message"), [
    ("train.scheduler.name=exponential",
     "train.scheduler.name: unknown value 'exponential' (valid: none, cosine, step, linear)"),
    ("train.scheduler.warmup_epochs=4",
     "train.scheduler.warmup_epochs: must be >= 0 and less than train.epochs (4), got 4.0"),
    ("train.scheduler.warmup_epochs=1", "train.scheduler.warmup_epochs: a warmup needs a "
     "schedule to warm up to"),
    ("train.scheduler.step_epochs=0", "train.scheduler.step_epochs: must be at least 1, got 0"),
    ("train.scheduler.gamma=0", "train.scheduler.gamma: must be in (0, 1], got 0.0"),
    ("train.scheduler.min_lr=0.1",
     "train.scheduler.min_lr: must be >= 0 and at most train.lr (0.001), got 0.1"),
    ("train.keep_optimizer=sometimes", "train.keep_optimizer: expected bool, got 'sometimes'"),
])
def test_bad_schedules_name_the_field(tiny: dict, tmp_path: Path, override: str,
                                      message: str) -> None:
    assert load_error(tiny, tmp_path, override).startswith(message)


def test_a_schedule_and_a_kept_optimizer_are_read_from_the_config(
        tiny: dict, tmp_path: Path) -> None:
    tiny["train"].update(scheduler={"name": "step", "warmup_epochs": 0.5, "step_epochs": 2,
                                    "gamma": 0.5}, keep_optimizer=True)
    config = load_dict(tiny, tmp_path)
    assert config.train.scheduler == SchedulerConfig("step", 0.5, 2, 0.5, 0.0)
    assert config.train.keep_optimizer is True


# ------------------------------------------------------------------ live TensorBoard
def _strategy(index: int, history: list[dict]) -> SimpleNamespace:
    """What LiveTensorBoard reads from a trainer."""
    optimizer = SimpleNamespace(param_groups=[{"lr": 0.5}])
    return SimpleNamespace(experience_index=index, history=history, optimizer=optimizer,
                           last_eval=[])


def test_each_point_is_on_disk_when_written_and_mid_task_evaluations_are_skipped(
        tmp_path: Path) -> None:
    live = LiveTensorBoard(tmp_path, ["a", "b"], "seed: 0\n")
    trainer = _strategy(0, [])
    trainer.last_eval = [{"recall@1": 0.1}, {"recall@1": 0.2}]
    live.after_eval(trainer)
    assert _scalars(tmp_path)["eval/recall@1/b"] == [(0, pytest.approx(0.2))]  # writer open
    live.before_training_exp(trainer)
    trainer.history.append({"task": 0, "epoch": 0, "loss": 3.0, "lr": 0.5})
    live.after_training_epoch(trainer)
    assert _scalars(tmp_path)["train/loss/a"] == [(0, 3.0)]
    assert _scalars(tmp_path)["train/lr/a"] == [(0, 0.5)]
    trainer.last_eval = [{"recall@1": 0.9}, {"recall@1": 0.9}]
    live.after_eval(trainer)  # eval.every_epochs: an evaluation during the task
    live.after_training_epoch(trainer)  # no new history entry: an epoch without batches
    live.after_training_exp(trainer)
    trainer.last_eval = [{"recall@1": 0.5}, {"recall@1": 0.3}]
    live.after_eval(trainer)
    live.close()
    scalars = _scalars(tmp_path)
    assert scalars["eval/recall@1/a"] == [(0, pytest.approx(0.1)), (1, pytest.approx(0.5))]
    assert scalars["train/loss/a"] == [(0, 3.0)]


@pytest.fixture(scope="module")
def compared(tiny_template: dict, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """``compare`` of finetune on two tasks of two epochs, one seed: the directory and what it
    printed."""
    tmp = tmp_path_factory.mktemp("conveniences")
    config = copy.deepcopy(tiny_template)
    config["scenario"]["tasks"] = [{"dataset": f"synth-pairs/{name}",
                                    "modalities": ["vision", "text"]} for name in ("toys", "gems")]
    config["train"]["epochs"] = 2
    (tmp / "config.yaml").write_text(yaml.safe_dump(config))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["compare", str(tmp / "config.yaml"), "--strategies", "finetune",
                     "--seeds", "1", "--out", str(tmp / "cmp")]) == 0
    return tmp / "cmp", printed.getvalue()


def test_compare_and_report_say_where_the_scalars_and_the_figures_are(
        compared: tuple[Path, str], capsys: pytest.CaptureFixture) -> None:
    directory, printed = compared
    line = (f"TensorBoard: the figures are in {directory}/tb, each run's scalars in "
            f"{directory}/<entry>/seed<k>/tb; to see both: tensorboard --logdir {directory}\n")
    assert line in printed
    assert main(["report", str(directory)]) == 0
    assert line in capsys.readouterr().out
    assert "compare/matrices" in _images(directory / "tb")
    assert "eval/recall@1/1:toys:vision-text" in _scalars(directory / "finetune/seed0/tb")


def _f32(value: float) -> object:
    """``value`` as TensorBoard stores it (a float32) and metrics.json (6 decimals) rounds it."""
    return pytest.approx(value, rel=1e-6, abs=1e-6)


def _check_run_events(out: Path) -> None:
    """Per-epoch loss and lr of each task, evaluations at steps 0..2 equal to the matrices,
    the summaries and the config, each step once."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars = _scalars(out / "tb")
    metrics = json.loads((out / "metrics.json").read_text())
    history = metrics["history"]
    assert len(history) == 4
    for task, name in enumerate(TASKS):
        steps = [2 * task, 2 * task + 1]  # two epochs each, counted over the run
        assert scalars[f"train/loss/{name}"] == [
            (s, _f32(history[s]["loss"])) for s in steps]
        assert scalars[f"train/lr/{name}"] == [(s, _f32(0.001)) for s in steps]
        column = [row[task] for row in metrics["matrices"]["recall@1"]]
        assert scalars[f"eval/recall@1/{name}"] == [
            (s, _f32(v)) for s, v in enumerate(column)]
    assert scalars["summary/recall@1/acc"] == [
        (0, _f32(metrics["summary"]["recall@1"]["acc"]))]
    for tag, points in scalars.items():
        steps = [s for s, _ in points]
        assert len(steps) == len(set(steps)), tag
    events = EventAccumulator(str(out / "tb"))
    events.Reload()
    assert "config/text_summary" in events.Tags()["tensors"]
    _check_hparams(events, metrics)


def _check_hparams(events: object, metrics: dict) -> None:
    """The HParams table's session: the config's scalars by dotted key, and its metrics."""
    from tensorboard.plugins.hparams import plugin_data_pb2

    content = events.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(
        content["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["train.lr"].number_value == _f32(0.001)
    assert start.hparams["train.scheduler.name"].string_value == "none"
    assert start.hparams["strategies"].string_value == "[finetune]"
    experiment = plugin_data_pb2.HParamsPluginData.FromString(
        content["_hparams_/experiment"]).experiment
    tags = {m.name.tag for m in experiment.metric_infos}
    assert "summary/recall@1/acc" in tags and len(tags) == sum(
        v is not None for values in metrics["summary"].values() for v in values.values())


def test_a_run_writes_tensorboard_while_it_trains(compared: tuple[Path, str]) -> None:
    _check_run_events(compared[0] / "finetune" / "seed0")


def test_a_resumed_run_writes_no_step_twice(compared: tuple[Path, str], tmp_path: Path) -> None:
    out = tmp_path / "run"
    shutil.copytree(compared[0] / "finetune" / "seed0", out)
    (out / "checkpoints" / "after_task_2.pt").unlink()  # killed before task 2's checkpoint
    (out / "metrics.json").unlink()
    config = from_dict(RunConfig, yaml.safe_load((out / "config.yaml").read_text()))
    config.out = str(out)
    run(config, resume=True)
    _check_run_events(out)
    parts = sorted(p.name.rsplit(".", 1)[1] for p in (out / "tb").iterdir())
    assert parts == ["part0", "part1", "part2", "summary"]

