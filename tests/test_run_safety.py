"""The run directory: a user's files are never deleted, a second run is locked out, a bad
``--out`` fails before anything is generated or trained, and damaged files are named."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from comodal.cli import main
from comodal.config import load_config
from comodal.errors import ConfigError
from comodal.platform.run import run
from comodal.platform.trainer import Trainer


def _config_file(tiny: dict, directory: Path, **train: int) -> Path:
    tiny["train"].update({"epochs": 1, **train})
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump(tiny))
    return path


def test_a_directory_that_is_not_a_run_keeps_the_users_files(
        tiny: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    proj = tmp_path / "proj"
    (proj / "checkpoints").mkdir(parents=True)
    (proj / "checkpoints" / "mine.pt").write_text("x")
    (proj / "metrics.json").write_text('{"accuracy": 0.9}')
    assert main(["run", str(_config_file(tiny, tmp_path)), "--out", str(proj)]) == 2
    error = capsys.readouterr().err
    assert f"out: {proj} is not a comodal run directory" in error
    assert "checkpoints/mine.pt" in error
    assert (proj / "checkpoints" / "mine.pt").read_text() == "x"
    assert (proj / "metrics.json").read_text() == '{"accuracy": 0.9}'
    assert sorted(p.name for p in proj.iterdir()) == ["checkpoints", "metrics.json"]


def _old_run(out: Path) -> None:
    """What comodal wrote into a run directory before run directories were marked."""
    (out / "matrices").mkdir(parents=True)
    (out / "config.yaml").write_text("seed: 0\n")
    (out / "metrics.json").write_text('{"tasks": [], "matrices": {}, "summary": {}}')


def _old_interrupted_run(out: Path) -> None:
    (out / "checkpoints").mkdir(parents=True)
    torch.save({"config": "seed: 0\n"}, out / "checkpoints" / "after_task_1.pt")
    (out / "checkpoints" / ".after_task_2.pt.x1y2.tmp").write_bytes(b"")  # killed mid-write


@pytest.mark.parametrize("make", [_old_run, _old_interrupted_run])
def test_a_run_directory_an_older_comodal_wrote_is_adopted(tmp_path: Path, make) -> None:  # noqa: ANN001
    from comodal.platform.run import claim

    make(tmp_path / "old")
    with claim(tmp_path / "old"):
        assert "format: 1" in (tmp_path / "old" / ".comodal-run").read_text()


@pytest.mark.parametrize("content,named", [
    ({"metrics.json": '{"accuracy": 0.9}'}, "metrics.json"),  # another tool's results
    ({"tb/events": ""}, "tb"),
    ({"checkpoints/after_task_1.pt": "", "notes.txt": ""}, "notes.txt"),
    ({"checkpoints/after_task_1.pt": "a user's own file"}, "checkpoints"),
])
def test_a_directory_without_comodal_results_is_refused(
        tmp_path: Path, content: dict[str, str], named: str) -> None:
    from comodal.platform.run import claim

    for name, text in content.items():
        (tmp_path / "proj" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "proj" / name).write_text(text)
    with pytest.raises(ConfigError, match=f"holds {named}"):
        claim(tmp_path / "proj")
    assert not (tmp_path / "proj" / ".comodal-run").exists()
    assert all((tmp_path / "proj" / name).read_text() == text for name, text in content.items())


def test_a_second_run_on_a_locked_directory_is_refused_naming_the_holder(
        tiny: dict, tmp_path: Path) -> None:
    from comodal.platform.run import claim

    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from pathlib import Path; "
         "from comodal.platform.run import claim; lock = claim(Path(sys.argv[1])); "
         "print('held', flush=True); sys.stdin.read()", str(out)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        config = load_config(_config_file(tiny, tmp_path))
        config.out = str(out)
        with pytest.raises(ConfigError, match=f"{out} is in use by another run "
                                              f"\\(pid {holder.pid} on {socket.gethostname()}, "
                                              "started 20"):
            run(config)
        assert not (out / "checkpoints").exists()
    finally:
        holder.kill()  # like kill -9: the kernel releases the lock, none is left stale
        holder.wait()
    with claim(out):
        assert f"pid {os.getpid()} " in (out / ".comodal-lock").read_text()


def test_an_out_under_an_existing_file_fails_before_any_data_is_generated(
        tiny: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "file").write_text("mine")
    tiny["data"]["cache_dir"] = str(tmp_path / "fresh-cache")  # the corpus would be made here
    config = str(_config_file(tiny, tmp_path))
    assert main(["run", config, "--out", str(tmp_path / "file" / "run")]) == 2
    assert f"cannot use {tmp_path / 'file' / 'run'} as the run directory" in capsys.readouterr().err
    assert main(["run", config, "--out", str(tmp_path / "file")]) == 2
    assert f"{tmp_path / 'file'} is a file, not a directory" in capsys.readouterr().err
    assert not (tmp_path / "fresh-cache").exists()
    assert (tmp_path / "file").read_text() == "mine"


def test_a_result_file_that_cannot_be_written_is_a_named_error(tmp_path: Path) -> None:
    from comodal.core.files import atomic_write_text

    (tmp_path / "file").write_text("mine")
    with pytest.raises(ConfigError, match=f"cannot write {tmp_path / 'file' / 'summary.md'}: "):
        atomic_write_text(tmp_path / "file" / "summary.md", "| table |")
    assert (tmp_path / "file").read_text() == "mine"


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into a read-only directory")
def test_a_read_only_run_directory_is_a_named_error(tiny: dict, tmp_path: Path) -> None:
    config = load_config(_config_file(tiny, tmp_path))
    config.out = str(tmp_path / "run")
    (tmp_path / "run").mkdir(mode=0o555)
    with pytest.raises(ConfigError, match=str(tmp_path / "run")):
        run(config, resume=True)


def test_a_truncated_checkpoint_is_named(
        tiny: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = str(_config_file(tiny, tmp_path))
    out = tmp_path / "run"
    assert main(["run", config, "--out", str(out)]) == 0
    last = out / "checkpoints" / "after_task_4.pt"
    last.write_bytes(last.read_bytes()[:1000])
    assert main(["run", config, "--out", str(out), "--resume"]) == 2
    assert f"{last}: truncated or corrupt checkpoint" in capsys.readouterr().err


def test_a_refused_resume_names_the_changed_field(tiny: dict, tmp_path: Path) -> None:
    out = tmp_path / "run"
    config = load_config(_config_file(tiny, tmp_path, epochs=4))
    config.out = str(out)
    run(config)
    config.train.epochs, config.seed = 2, 1
    with pytest.raises(ConfigError,
                       match="another config \\(seed: 0 -> 1; train.epochs: 4 -> 2\\)"):
        run(config, resume=True)
    assert len(list((out / "checkpoints").glob("after_task_*.pt"))) == 4  # nothing removed


def test_config_diff_names_added_removed_and_nested_keys() -> None:
    from comodal.yaml_input import config_diff

    old = "a: 1\nb: {c: [x, y], d: 2}\ne: {}\n"
    new = "a: 1\nb: {c: [x], d: 3}\nf: hi\n"
    assert config_diff(old, new) == ["b.c: [x, y] -> [x]", "b.d: 2 -> 3", "e: {} -> (unset)",
                                     "f: (unset) -> hi"]


def test_reporting_a_truncated_metrics_json_names_the_file(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    seed = tmp_path / "comparison" / "finetune" / "seed0"
    seed.mkdir(parents=True)
    (seed / "config.yaml").write_text("seed: 0\n")
    (seed / "metrics.json").write_text('{"tasks": ["1:toys:vision-text"], "matr')
    assert main(["report", str(tmp_path / "comparison")]) == 2
    assert f"{seed / 'metrics.json'}: truncated or corrupt" in capsys.readouterr().err
    assert main(["summarize", str(seed)]) == 2
    assert f"{seed / 'metrics.json'}: truncated or corrupt" in capsys.readouterr().err


def test_a_non_finite_loss_keeps_the_finished_tasks_and_says_where_resume_continues(
        tiny: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from comodal.errors import TrainingError  # new with this behaviour

    train = Trainer.train_experience

    def diverge_in_task_3(self: Trainer, exp) -> None:  # noqa: ANN001
        if exp.current_experience == 2:
            raise TrainingError("task 3, epoch 1, step 1: the loss is nan")
        train(self, exp)

    monkeypatch.setattr(Trainer, "train_experience", diverge_in_task_3)
    config = load_config(_config_file(tiny, tmp_path))
    config.out = str(tmp_path / "run")
    with pytest.raises(TrainingError, match="loss is nan; the checkpoints of tasks 1-2 are kept "
                                            ".*--resume continues from task 3 "
                                            "\\(3:signs:audio-vision\\)"):
        run(config)
    saved = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert saved == ["after_task_1.pt", "after_task_2.pt"]
    monkeypatch.undo()
    resumed = run(config, resume=True)
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["tasks"][2] == \
        "3:signs:audio-vision"
    assert torch.isfinite(resumed.matrices["recall@1"][1:].diagonal()).all()
