"""Bad input given to the command line, as a hostile user would give it: each case ends in one
named error line (exit 2) and never in a traceback; Ctrl-C and a killed ``compare`` leave no
traceback and no orphaned worker processes."""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from comodal.cli import main


def _config(tmp: Path, tiny: dict, text: str | None = None) -> str:
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(tiny) if text is None else text)
    return str(path)


def _run(*overrides: str) -> Callable[[Path, dict], list[str]]:
    def argv(tmp: Path, tiny: dict) -> list[str]:
        sets = [a for o in overrides for a in ("--set", o)]
        return ["run", _config(tmp, tiny), *sets, "--out", str(tmp / "run")]
    return argv


def _alias_bomb(tmp: Path, tiny: dict) -> list[str]:
    """A config whose ``train.lr`` nests seven levels of nine aliases: 9**7 strings once
    expanded, a 50 MB error message before (nine levels: 2.1 GB and 12 GB of memory)."""
    levels = ["&a0 [lol]"] + [f"&a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]"
                              for i in range(1, 8)]
    return ["run", _config(tmp, tiny, "train:\n  lr: [" + ",\n    ".join(levels) + "]\n")]


def _duplicate_key(tmp: Path, tiny: dict) -> list[str]:
    rest = yaml.safe_dump({k: v for k, v in tiny.items() if k != "train"})
    return ["run", _config(tmp, tiny, "train:\n  epochs: 1\n  lr: 0.5\n  lr: 0.1\n" + rest)]


def _synth_fsc(out: str) -> Callable[[Path, dict], list[str]]:
    def argv(tmp: Path, tiny: dict) -> list[str]:
        (tmp / "file").write_text("mine\n")
        return ["data", "synth-fsc", "--out", str(tmp / out)]
    return argv


def _report(damage: str) -> Callable[[Path, dict], list[str]]:
    """A comparison directory of one finished run, with one file damaged."""
    def argv(tmp: Path, tiny: dict) -> list[str]:
        run = tmp / "cmp" / "finetune" / "seed0"
        run.mkdir(parents=True)
        files = {"metrics.json": "{}", "config.yaml": "strategies: [finetune]\n",
                 "compare.json": '{"strategies": ["finetune"], "seeds": [0]}'}
        files[damage] = files[damage][:-3]  # cut short, as by a full disk or a kill
        for name, text in files.items():
            (tmp / "cmp" / name if name == "compare.json" else run / name).write_text(text)
        return ["report", str(tmp / "cmp")]
    return argv


def _report_on_a_run(tmp: Path, tiny: dict) -> list[str]:
    (tmp / "run").mkdir()
    (tmp / "run" / "metrics.json").write_text("{}")
    return ["report", str(tmp / "run")]


CASES = [
    pytest.param(_run("train.lr=.inf"), "train.lr: must be a finite number, got inf",
                 id="lr-inf"),
    pytest.param(_run("train.lr=.nan"), "train.lr: must be a finite number, got nan",
                 id="lr-nan"),
    pytest.param(_run("model.temperature=.nan"),
                 "model.temperature: must be a finite number, got nan", id="temperature-nan"),
    pytest.param(_run("train.weight_decay=-.inf"), "train.weight_decay: must be a finite number",
                 id="weight-decay-minus-inf"),
    pytest.param(_run("strategies=[ewc]", "strategy_args.ewc.ewc_lambda=.nan"),
                 "strategy_args.ewc.ewc_lambda: must be a finite number, got nan",
                 id="strategy-option-nan"),
    pytest.param(_run("train.lr=1" + "0" * 400), "train.lr: must be a finite number",
                 id="lr-past-float-range"),
    pytest.param(_run("seed=4294967296"), "seed: must be below 2**32", id="seed-too-large"),
    pytest.param(_run("train.epochs=[1"), "--set 'train.epochs=[1', line 1, column 3: not "
                 "valid YAML", id="override-not-yaml"),
    pytest.param(_run("train.lr=&a [*a]"), "a YAML alias refers to a value that contains it",
                 id="override-self-alias"),
    pytest.param(_alias_bomb, "expands to more than 100000 values", id="alias-bomb"),
    pytest.param(_duplicate_key, "line 4: key 'lr' is given twice in one mapping (first on "
                 "line 3)", id="duplicate-key"),
    pytest.param(lambda tmp, tiny: ["run", str(tmp)], "is a directory; give the path of a "
                 "YAML file", id="config-is-a-directory"),
    pytest.param(_synth_fsc("file"), "is a file; give a directory", id="synth-fsc-out-a-file"),
    pytest.param(_synth_fsc("file/corpus"), "--out: cannot create", id="synth-fsc-parent-a-file"),
    pytest.param(_report_on_a_run, "a run directory, not a comparison", id="report-on-a-run"),
    pytest.param(_report("metrics.json"), "metrics.json: truncated", id="report-truncated-run"),
    pytest.param(_report("config.yaml"), "seed0/config.yaml', line 1, column 21: not valid YAML",
                 id="report-truncated-run-config"),
    pytest.param(_report("compare.json"), "compare.json: truncated", id="report-truncated-plan"),
]


@pytest.mark.parametrize(("argv", "fragment"), CASES)
def test_bad_input_is_one_named_error_line(
        argv: Callable[[Path, dict], list[str]], fragment: str, tmp_path: Path, tiny: dict,
        capsys: pytest.CaptureFixture) -> None:
    assert main(argv(tmp_path, tiny)) == 2
    err = capsys.readouterr().err
    assert err.startswith("comodal: error: ") and err.count("\n") == 1, err[:500]
    assert fragment in err
    assert len(err) < 400  # no value echoed whole (the alias bomb once gave 351 MB)
    assert "Traceback" not in err


def test_ctrl_c_during_a_run_says_what_is_kept(tmp_path: Path, tiny: dict,
                                                capsys: pytest.CaptureFixture,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from comodal.platform import run

    def interrupted(config, resume: bool = False) -> None:  # noqa: ANN001
        raise KeyboardInterrupt

    monkeypatch.setattr(run, "run", interrupted)
    try:
        code = main(_run()(tmp_path, tiny))
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped the command line as a traceback")
    err = capsys.readouterr().err
    assert code == 130
    assert err.startswith("comodal: interrupted; the checkpoints of the finished tasks are kept "
                          f"in {tmp_path / 'run' / 'checkpoints'}") and "--resume" in err


# ----------------------------------------------------------------------------- processes
def _children(pid: int) -> dict[int, str]:
    """Live child processes of ``pid`` and their command lines (from /proc)."""
    found = {}
    for entry in Path("/proc").iterdir():
        try:
            state, ppid = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:2]
            command = (entry / "cmdline").read_text().replace("\0", " ")
        except (OSError, ValueError):
            continue
        if int(ppid) == pid and state != "Z":
            found[int(entry.name)] = command
    return found


def _alive(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _poll(condition: Callable[[], bool], tries: int = 3000) -> bool:
    """``condition`` checked every 0.1 s until it holds, at most ``tries`` times."""
    for _ in range(tries):
        if condition():
            return True
        time.sleep(0.1)
    return False


def _compare_with_two_workers(tmp_path: Path, tiny: dict) -> tuple[subprocess.Popen, dict]:
    """``comodal compare --workers 2`` of one tiny task in its own process group, once both
    pool workers exist."""
    config = copy.deepcopy(tiny)
    config["scenario"]["tasks"] = config["scenario"]["tasks"][:1]
    config["train"]["epochs"] = 3
    argv = [sys.executable, "-m", "comodal.cli", "compare", _config(tmp_path, config),
            "--strategies", "finetune", "--seeds", "2", "--workers", "2",
            "--out", str(tmp_path / "cmp")]
    # Ctrl-C as from a terminal, even when pytest itself was started in the background (a
    # shell starts `cmd &` with SIGINT ignored, which the child would inherit)
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    workers: dict[int, str] = {}

    def started() -> bool:
        workers.update({p: c for p, c in _children(proc.pid).items() if "spawn_main" in c})
        return len(workers) >= 2 or proc.poll() is not None

    assert _poll(started) and proc.poll() is None, proc.communicate()
    return proc, _children(proc.pid)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("how", ["kill -9", "ctrl-c"])
def test_compare_workers_end_with_their_parent(tmp_path: Path, tiny: dict, how: str) -> None:
    proc, children = _compare_with_two_workers(tmp_path, tiny)
    try:
        os.kill(proc.pid, signal.SIGKILL if how == "kill -9" else signal.SIGINT)
        _, err = proc.communicate(timeout=300)
        assert _poll(lambda: not any(_alive(p) for p in children), tries=300), children
        if how == "ctrl-c":
            assert proc.returncode == 130 and "Traceback" not in err, err
            assert "comodal: interrupted; finished runs and the checkpoints" in err
    finally:
        for pid in children:  # on failure: end what this test started
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
