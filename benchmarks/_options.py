"""The options every benchmark script takes besides its own settings: ``--out`` (where the
JSON results go) and ``--smoke`` (tiny settings that only check the script still runs); and
``--device`` for the scripts that can run on CUDA (``trainer_overhead.py``, ``dns_step.py``)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def add_output_options(parser: argparse.ArgumentParser, results: Path) -> None:
    parser.add_argument("--out", type=Path, default=None, help="JSON results path (default "
                        f"benchmarks/results/{results.name})")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny settings, to check that the script runs (seconds; the "
                             "numbers mean nothing); writes only to --out")


def parse_with_outputs(parser: argparse.ArgumentParser, argv: list[str] | None,
                       results: Path, smoke: dict[str, Any]) -> argparse.Namespace:
    """The parsed options; with ``--smoke`` the settings in ``smoke`` replace the given ones
    (and nothing is written unless ``--out`` is given), otherwise ``--out`` defaults to
    ``results``."""
    args = parser.parse_args(argv)
    if args.smoke:
        vars(args).update(smoke)
    elif args.out is None:
        args.out = results
    return args


def add_device_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu",
                        help="cpu, cuda[:N] or auto (CUDA when available); default cpu")


def synchronize(device: Any) -> None:
    """Wait for the device's queued work, so that a clock read after it counts that work."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_info(device: Any) -> dict[str, Any]:
    """The device the numbers were measured on, for a report's ``machine``."""
    import torch

    info: dict[str, Any] = {"device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def write_results(out: Path | None, report: dict[str, Any]) -> None:
    """Write ``report`` as JSON to ``out`` (nothing without one, as under ``--smoke``)."""
    import json

    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {out}")


def cpu_machine() -> dict[str, Any]:
    """The CPU the numbers were measured on, for a report's ``machine``."""
    import os
    import platform

    import torch

    return {"cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version()}
