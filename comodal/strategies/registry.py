"""The one registry mapping config names to strategy plugins, and stack validation.

Besides the built-in strategies, ``register_strategy`` adds one from user code (a module a
config lists under ``imports``, or any code run before), and installed packages add theirs
through ``comodal.strategies`` entry points, loaded when the registry is first used.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

from comodal.config import from_dict
from comodal.entry_points import load_entry_points
from comodal.errors import ConfigError
from comodal.strategies.agem import AGEM
from comodal.strategies.base import Strategy
from comodal.strategies.cflat import CFlat
from comodal.strategies.cila import CILA
from comodal.strategies.co2l import Co2L
from comodal.strategies.coconut import COCONUT
from comodal.strategies.der import DER, DERPP
from comodal.strategies.distill import KD, RelationKD
from comodal.strategies.dns import DNS
from comodal.strategies.ewc import EWC
from comodal.strategies.finetune import Finetune
from comodal.strategies.gem import GEM
from comodal.strategies.gpm import GPM
from comodal.strategies.joint import Joint
from comodal.strategies.replay import ER
from comodal.strategies.seq_kd import SeqKD

STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls for cls in (Finetune, Joint, DNS, GPM, EWC, ER, COCONUT, KD, RelationKD,
                              CFlat, GEM, AGEM, DER, DERPP, Co2L, CILA, SeqKD)
}
KINDS = ("pair", "classify", "sequence")


def register_strategy(cls: type[Strategy]) -> type[Strategy]:
    """Make ``cls`` usable in configs under its ``name`` (it also works as a class decorator).
    It must subclass ``Strategy`` and name a dataclass ``Config`` and its ``kinds``; a name
    already taken by another class is refused, so a plugin cannot silently replace one (the
    same class defined again, by a reloaded module, replaces the old one)."""
    if not (isinstance(cls, type) and issubclass(cls, Strategy)):
        raise ConfigError(f"register_strategy: {cls!r} is not a comodal strategy (a subclass "
                          "of comodal.strategies.base.Strategy)")
    where = f"register_strategy: {cls.__module__}.{cls.__qualname__}"
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_-]+", name):
        raise ConfigError(f"{where}: 'name' must be letters, digits, _ or - (it names the "
                          f"strategy in configs and compare directories), got {name!r}")
    if not dataclasses.is_dataclass(cls.Config):
        raise ConfigError(f"{where}: 'Config' must be a dataclass of the strategy's options, "
                          f"got {cls.Config!r}")
    if not (isinstance(cls.kinds, tuple) and cls.kinds and set(cls.kinds) <= set(KINDS)):
        raise ConfigError(f"{where}: 'kinds' must be a non-empty tuple of {', '.join(KINDS)}, "
                          f"got {cls.kinds!r}")
    taken = STRATEGIES.get(name)
    if taken is not None and (taken.__module__, taken.__qualname__) != (cls.__module__,
                                                                         cls.__qualname__):
        raise ConfigError(f"{where}: the strategy name {name!r} is taken by "
                          f"{taken.__module__}.{taken.__qualname__}; choose another name")
    STRATEGIES[name] = cls
    return cls


def strategies() -> dict[str, type[Strategy]]:
    """Every strategy by name: built in, registered in code, or from an entry point."""
    load_entry_points("comodal.strategies", register_strategy)
    return STRATEGIES


def validate_strategies(names: Sequence[str], args: Mapping[str, Mapping[str, Any]],
                        kind: str | None = None) -> None:
    """Unknown names, options for strategies not in the stack, bad option values, a stack
    with two replay buffers, or a strategy on a kind of task (``pair``, ``classify``) it does
    not work on."""
    known = strategies()
    if not names:
        raise ConfigError(f"strategies: name at least one (valid: {', '.join(known)})")
    for i, name in enumerate(names):
        if name not in known:
            raise ConfigError(
                f"strategies[{i}]: unknown strategy {name!r} (valid: {', '.join(known)})"
            )
    if "joint" in names and names[0] != "joint":
        raise ConfigError(
            "strategies: 'joint' must come first, since it replaces the training loader that "
            f"later strategies build on (got {list(names)})"
        )
    if "cflat" in names and names.index("cflat") != int(names[0] == "joint"):
        raise ConfigError(
            "strategies: 'cflat' must come first (right after 'joint' if that is stacked), "
            "since it replaces the step's gradient, which later strategies (dns, gpm, gem, "
            f"agem) then edit (got {list(names)})"
        )
    if len(set(names)) != len(names):
        raise ConfigError(f"strategies: each strategy may appear once, got {list(names)}")
    for name, options in args.items():
        if name not in names:
            raise ConfigError(
                f"strategy_args.{name}: {name!r} is not in strategies ({', '.join(names)})"
            )
        from_dict(known[name].Config, dict(options), f"strategy_args.{name}")
    buffers = [n for n in names if getattr(known[n], "owns_buffer", False)]
    if len(buffers) > 1:
        raise ConfigError(f"strategies: {' and '.join(buffers)} each keep a replay buffer; "
                          "stack one of them")
    # kd and seq_kd distil the rows er's loader marks batch["rehearsal"]: gem, agem and der
    # keep memories outside the training batches
    rehearsal = any(getattr(known[n], "wrap_loader", None) is ER.wrap_loader for n in names)
    if "kd" in names and not rehearsal:
        kd = from_dict(KD.Config, dict(args.get("kd", {})), "strategy_args.kd")
        if kd.needs_buffer:
            raise ConfigError("strategies: kd on rehearsal rows needs a replay strategy in the "
                              "stack (er or coconut), or strategy_args.kd.feature and "
                              ".prediction set to batch or off")
    if "seq_kd" in names and not rehearsal:
        raise ConfigError("strategies: seq_kd trains on the teacher's decoding of the "
                          "rehearsal rows, so it needs a replay strategy in the stack (er or "
                          "coconut: er+seq_kd, coconut+seq_kd)")
    for name in names if kind else ():
        if kind not in known[name].kinds:
            valid = [n for n, c in known.items() if kind in c.kinds]
            kinds = " and ".join(known[name].kinds)
            raise ConfigError(f"strategies: {name!r} works on {kinds} tasks, and this "
                              f"scenario's tasks are {kind} tasks (strategies for {kind} "
                              f"tasks: {', '.join(valid)})")


def build_strategies(names: Sequence[str], args: Mapping[str, Mapping[str, Any]]) -> list:
    """Plugins in stack order: at each callback they run in the order named in the config."""
    validate_strategies(names, args)
    known = strategies()
    return [known[n](from_dict(known[n].Config, dict(args.get(n, {})), f"strategy_args.{n}"))
            for n in names]
