"""What every comodal strategy is: an Avalanche ``SupervisedPlugin`` with a typed config."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from comodal._avalanche import SupervisedPlugin


@dataclass
class NoOptions:
    """Config of a strategy without hyperparameters."""


class Strategy(SupervisedPlugin):
    """A continual-learning strategy: overrides only the callbacks it needs."""

    name: ClassVar[str]
    Config: ClassVar[type] = NoOptions
    kinds: ClassVar[tuple[str, ...]] = ("pair", "classify")  # task kinds it works on

    def __init__(self, config: object | None = None) -> None:
        super().__init__()
        self.config = config if config is not None else self.Config()
