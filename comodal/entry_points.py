"""Strategies and datasets of installed packages, found through entry points.

A package adds to comodal by declaring entry points in the groups ``comodal.strategies`` (each
naming a ``Strategy`` subclass) and ``comodal.datasets`` (each naming a ``DatasetSpec``). Each
group is loaded once per process, when its registry is first used.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable
from typing import Any

from comodal.errors import ConfigError

_LOADED: set[str] = set()  # groups whose entry points are registered


def load_entry_points(group: str, register: Callable[[Any], Any]) -> None:
    """Call ``register`` on the object each entry point of ``group`` names, once per process;
    one that fails to load or register is a ``ConfigError`` naming it and its distribution."""
    if group in _LOADED:
        return
    for point in importlib.metadata.entry_points(group=group):
        try:
            register(point.load())
        except Exception as err:  # an installed package can fail in any way at import
            dist = f"distribution {point.dist.name!r}" if point.dist else "unknown distribution"
            raise ConfigError(f"entry point {point.name!r} = {point.value!r} (group {group!r}, "
                              f"{dist}) is broken: {type(err).__name__}: {err}; fix or "
                              "uninstall that package") from err
    _LOADED.add(group)
