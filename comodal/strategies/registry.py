"""The one registry mapping config names to strategy plugins, and stack validation."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from comodal.config import from_dict
from comodal.errors import ConfigError
from comodal.strategies.base import Strategy
from comodal.strategies.coconut import COCONUT
from comodal.strategies.distill import KD, RelationKD
from comodal.strategies.dns import DNS
from comodal.strategies.ewc import EWC
from comodal.strategies.finetune import Finetune
from comodal.strategies.gpm import GPM
from comodal.strategies.joint import Joint
from comodal.strategies.replay import ER

STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls for cls in (Finetune, Joint, DNS, GPM, EWC, ER, COCONUT, KD, RelationKD)
}


def validate_strategies(names: Sequence[str], args: Mapping[str, Mapping[str, Any]],
                        kind: str | None = None) -> None:
    """Unknown names, options for strategies not in the stack, bad option values, a stack
    with two replay buffers, or a strategy on a kind of task (``pair``, ``classify``) it does
    not work on."""
    if not names:
        raise ConfigError(f"strategies: name at least one (valid: {', '.join(STRATEGIES)})")
    for i, name in enumerate(names):
        if name not in STRATEGIES:
            raise ConfigError(
                f"strategies[{i}]: unknown strategy {name!r} (valid: {', '.join(STRATEGIES)})"
            )
    if "joint" in names and names[0] != "joint":
        raise ConfigError(
            "strategies: 'joint' must come first, since it replaces the training loader that "
            f"later strategies build on (got {list(names)})"
        )
    if len(set(names)) != len(names):
        raise ConfigError(f"strategies: each strategy may appear once, got {list(names)}")
    for name, options in args.items():
        if name not in names:
            raise ConfigError(
                f"strategy_args.{name}: {name!r} is not in strategies ({', '.join(names)})"
            )
        from_dict(STRATEGIES[name].Config, dict(options), f"strategy_args.{name}")
    buffers = [n for n in names if getattr(STRATEGIES[n], "owns_buffer", False)]
    if len(buffers) > 1:
        raise ConfigError(f"strategies: {' and '.join(buffers)} each keep a replay buffer; "
                          "stack one of them")
    if "kd" in names and not buffers:
        kd = from_dict(KD.Config, dict(args.get("kd", {})), "strategy_args.kd")
        if kd.needs_buffer:
            raise ConfigError("strategies: kd on rehearsal rows needs a replay strategy in the "
                              "stack (er or coconut), or strategy_args.kd.feature and "
                              ".prediction set to batch or off")
    for name in names if kind else ():
        if kind not in STRATEGIES[name].kinds:
            valid = [n for n, c in STRATEGIES.items() if kind in c.kinds]
            kinds = " and ".join(STRATEGIES[name].kinds)
            raise ConfigError(f"strategies: {name!r} works on {kinds} tasks, and this "
                              f"scenario's tasks are {kind} tasks (strategies for {kind} "
                              f"tasks: {', '.join(valid)})")


def build_strategies(names: Sequence[str], args: Mapping[str, Mapping[str, Any]]) -> list:
    """Plugins in stack order: at each callback they run in the order named in the config."""
    validate_strategies(names, args)
    return [
        STRATEGIES[n](from_dict(STRATEGIES[n].Config, dict(args.get(n, {})), f"strategy_args.{n}"))
        for n in names
    ]
