"""The options every benchmark script takes besides its own settings: ``--out`` (where the
JSON results go) and ``--smoke`` (tiny settings that only check the script still runs)."""

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
