"""Run ``comodal run CONFIG --out OUT`` for each (CONFIG, OUT) pair of the command line in one
torchrun job, so that the distributed tests start their processes once; each run's exit
status goes to ``<OUT>.status`` (rank 0)."""

from __future__ import annotations

import sys
from pathlib import Path

from comodal.cli import main
from comodal.platform import distributed

args = sys.argv[1:]
for config, out in zip(args[::2], args[1::2], strict=True):
    status = main(["run", config, "--out", out])
    world = distributed.current()
    if world is None or world.main:
        Path(f"{out}.status").write_text(f"{status}\n")
