"""The layers import downwards only: ``core`` and ``scenarios`` never import the platform or
the strategies, and ``config`` no registry (its name checks are ``comodal.build``'s)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "comodal"


def imported(path: Path) -> set[str]:
    """Every module ``path`` imports, at the top or inside functions."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


@pytest.mark.parametrize("layer", ["core", "scenarios"])
def test_core_and_scenarios_do_not_import_the_platform_or_the_strategies(layer: str) -> None:
    for path in sorted((PACKAGE / layer).glob("*.py")):
        upward = {m for m in imported(path)
                  if m.startswith(("comodal.platform", "comodal.strategies"))}
        assert not upward, f"{path.name} imports {sorted(upward)}"


def test_config_imports_no_registry() -> None:
    assert not {m for m in imported(PACKAGE / "config.py")
                if m.startswith(("comodal.platform", "comodal.strategies", "comodal.scenarios"))}
