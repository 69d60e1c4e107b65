"""``comodal compare --executor ray`` against a local Ray instance: the same runs, files and
metrics as the local executor, finished runs skipped, an interrupted run resumed, a failed run
reported as the local executor reports it, and the executor options' errors."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml

from comodal.cli import main

STACKS = "finetune,er+relation_kd"


@pytest.fixture(autouse=True)
def quiet_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    """No usage report, and never a cluster named by the environment."""
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


@pytest.fixture(scope="module")
def ray_instance() -> Iterator[None]:
    """One local Ray instance of 2 CPUs for the module (its workers stay warm between the
    compare calls); ``compare`` uses it as it is and leaves it running."""
    ray = pytest.importorskip("ray", reason="the ray extra: pip install -e '.[ray]'")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("RAY_USAGE_STATS_ENABLED", "0")
        env.delenv("RAY_ADDRESS", raising=False)
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            yield
        finally:
            ray.shutdown()


@pytest.fixture()
def one_thread() -> Iterator[None]:
    """This process trains with one thread, as a Ray task of --cpus-per-run 1 does."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _argv(tiny: dict, tmp_path: Path, stacks: str = STACKS) -> list[str]:
    """``compare`` of ``stacks`` over one seed, two tasks and one epoch, without --out."""
    tiny["scenario"]["tasks"] = tiny["scenario"]["tasks"][:2]
    tiny["train"]["epochs"] = 1
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(tiny))
    return ["compare", str(tmp_path / "config.yaml"), "--strategies", stacks, "--seeds", "1"]


def _files(out: Path) -> list[str]:
    """Every file under ``out``, TensorBoard event files (named by time, host and pid) by kind
    only."""
    names = []
    for path in sorted(out.rglob("*")):
        if path.is_file():
            rel = path.relative_to(out)
            names.append(str(rel.parent / "EVENTS") if rel.name.startswith("events.out.")
                          else str(rel))
    return sorted(names)


def _results(run: Path) -> dict:
    """A run's ``metrics.json`` without its wall time."""
    data = json.loads((run / "metrics.json").read_text())
    data.pop("seconds")
    return data


def test_bad_executor_options_are_clear_errors(
        tiny: dict, tmp_path: Path, capsys: pytest.CaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    argv = [*_argv(tiny, tmp_path, "finetune"), "--out", str(tmp_path / "cmp")]
    cases = [
        (["--address", "127.0.0.1:6379"], "--address: only with --executor ray"),
        (["--gpus-per-run", "1"], "--gpus-per-run: only with --executor ray"),
        (["--cpus-per-run", "2"], "--cpus-per-run: only with --executor ray"),
        (["--workers", "0"], "--workers: must be at least 1, got 0"),
        (["--executor", "ray", "--workers", "2"], "--workers: only with --executor local"),
        (["--executor", "ray", "--cpus-per-run", "0"], "--cpus-per-run: must be at least 1"),
        (["--executor", "ray", "--gpus-per-run", "-1"], "--gpus-per-run: must be 0 or more"),
    ]
    if importlib.util.find_spec("ray") is not None:
        cases += [
            (["--executor", "ray", "--address", "nowhere"], "--address nowhere: not HOST:PORT"),
            (["--executor", "ray", "--address", "127.0.0.1:1"],
             "--address 127.0.0.1:1: no Ray cluster answers there"),
        ]
    for extra, message in cases:
        assert main([*argv, *extra]) == 2, extra
        assert message in capsys.readouterr().err, extra
    monkeypatch.setitem(sys.modules, "ray", None)  # as if the extra were not installed
    assert main([*argv, "--executor", "ray"]) == 2
    assert "Ray is not installed; install comodal's ray extra with pip install -e '.[ray]'" \
        in capsys.readouterr().err
    assert not (tmp_path / "cmp").exists()  # refused before anything was planned or written


class _FakeRay:
    """What ``execute_ray`` asks of the ``ray`` module before any task, recorded: nodes of
    2 CPUs, and this process connected or not."""

    def __init__(self, connected: bool) -> None:
        import ray

        self.exceptions = ray.exceptions
        self.connected, self.calls = connected, []

    def is_initialized(self) -> bool:
        return self.connected

    def init(self, **kwargs: object) -> None:
        self.calls.append(("init", kwargs))

    def shutdown(self) -> None:
        self.calls.append(("shutdown", {}))

    def nodes(self) -> list[dict]:
        return [{"Alive": True, "Resources": {"CPU": 2.0}}]


@pytest.mark.parametrize("where", ["local", "address", "RAY_ADDRESS", "connected"])
def test_compare_starts_a_local_instance_or_connects_and_stops_only_its_own(
        where: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """A local instance compare started is shut down (a run too big for it is an error); from
    a cluster it only disconnects (too big is a warning); a connection it found it leaves."""
    import socket

    from comodal.errors import ConfigError
    from comodal.platform import compare, ray_executor

    pytest.importorskip("ray", reason="the ray extra: pip install -e '.[ray]'")
    fake = _FakeRay(connected=where == "connected")
    monkeypatch.setattr(ray_executor, "import_ray", lambda: fake)

    class Planned(Exception):
        pass

    def stop(todo: list) -> None:  # where the runs would be prepared and submitted
        raise Planned

    monkeypatch.setattr(compare, "_for_workers", stop)
    with socket.create_server(("127.0.0.1", 0)) as head:  # something answers at the address
        address = f"127.0.0.1:{head.getsockname()[1]}"
        if where == "RAY_ADDRESS":
            monkeypatch.setenv("RAY_ADDRESS", address)
        with pytest.raises(ConfigError if where == "local" else Planned) as err:
            ray_executor.execute_ray([object()], None, address if where == "address" else None,
                                     cpus_per_run=3)
    if where == "local":
        assert "--cpus-per-run 3 --gpus-per-run 0: no Ray node has that much" in str(err.value)
        assert fake.calls == [("init", {"address": "local", "include_dashboard": False}),
                              ("shutdown", {})]
    elif where == "connected":
        assert fake.calls == []  # the caller's connection, used as it is and left open
    else:
        assert fake.calls == [("init", {"address": address}), ("shutdown", {})]
        assert "comodal: warning: --cpus-per-run 3" in capsys.readouterr().err


def test_ray_runs_equal_local_runs_then_are_skipped_and_an_interrupted_one_resumes(
        ray_instance: None, one_thread: None, tiny: dict, tmp_path: Path,
        capsys: pytest.CaptureFixture) -> None:
    argv = _argv(tiny, tmp_path)
    local, remote = tmp_path / "local", tmp_path / "ray"
    assert main([*argv, "--out", str(local)]) == 0
    capsys.readouterr()
    ray_argv = [*argv, "--out", str(remote), "--executor", "ray", "--cpus-per-run", "1"]
    assert main(ray_argv) == 0
    assert "2 runs trained, 0 already finished" in capsys.readouterr().out

    assert _files(remote) == _files(local)
    for name in ("summary.md", "summary.csv", "compare.json"):
        assert (remote / name).read_text() == (local / name).read_text(), name
    runs = [Path(stack) / "seed0" for stack in STACKS.split(",")]
    for run in runs:
        assert _results(remote / run) == _results(local / run), run

    stamp = (remote / runs[0] / "metrics.json").stat().st_mtime_ns
    assert main(ray_argv) == 0
    assert "0 runs trained, 2 already finished" in capsys.readouterr().out
    assert (remote / runs[0] / "metrics.json").stat().st_mtime_ns == stamp

    # killed during its last task: no results, the first task's checkpoint kept
    run = remote / runs[1]
    (run / "metrics.json").unlink()
    (run / "checkpoints" / "after_task_2.pt").unlink()
    kept = (run / "checkpoints" / "after_task_1.pt").stat().st_mtime_ns
    assert main(ray_argv) == 0
    assert "1 runs trained, 1 already finished" in capsys.readouterr().out
    assert (run / "checkpoints" / "after_task_1.pt").stat().st_mtime_ns == kept  # resumed
    assert (run / "checkpoints" / "after_task_2.pt").is_file()
    assert _results(run) == _results(local / runs[1])
    assert (remote / "summary.md").read_text() == (local / "summary.md").read_text()


def test_a_failed_run_is_reported_as_the_local_executor_reports_it(
        ray_instance: None, tiny: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    argv = _argv(tiny, tmp_path, "finetune")
    errors = []
    for name, extra in (("local", []), ("ray", ["--executor", "ray"])):
        out = tmp_path / name
        (out / "finetune" / "seed0").mkdir(parents=True)
        (out / "finetune" / "seed0" / "notes.txt").write_text("mine\n")  # not a run's file
        assert main([*argv, "--out", str(out), *extra]) == 2
        errors.append(capsys.readouterr().err.replace(str(out), "OUT"))
    local, remote = (next(line for line in err.splitlines() if line.startswith("comodal:"))
                     for err in errors)
    assert local == remote
    assert "comodal: error: out: OUT/finetune/seed0 is not a comodal run directory" in remote
    assert os.listdir(tmp_path / "ray" / "finetune" / "seed0") == ["notes.txt"]
