"""Every benchmark script still runs: each one on its tiny ``--smoke`` settings exits 0 and
writes its report where ``--out`` says, leaving the committed results alone. Nothing about
time is asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((ROOT / "benchmarks").glob("[!_]*.py"))  # _options.py is their helper


def test_there_are_benchmarks_to_run() -> None:
    assert {p.stem for p in SCRIPTS} >= {"trainer_overhead", "dns_step", "replay_step"}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.stem)
def test_benchmark_runs_on_tiny_settings(script: Path, tmp_path: Path) -> None:
    committed = {p.name: p.read_bytes() for p in (ROOT / "benchmarks" / "results").glob("*")}
    out = tmp_path / f"{script.stem}.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny tensors: threads would only contend
    done = subprocess.run([sys.executable, str(script), "--smoke", "--out", str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert f"wrote {out}" in done.stdout
    report = json.loads(out.read_text())
    assert report["benchmark"] == script.stem
    assert report.get("runners") or report.get("trainer")  # timings of at least one runner
    after = {p.name: p.read_bytes() for p in (ROOT / "benchmarks" / "results").glob("*")}
    assert after == committed
