"""What every comodal strategy is: an Avalanche ``SupervisedPlugin`` with a typed config."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import ClassVar

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # qpsolvers warns at import that no QP solver is installed
    from avalanche.core import SupervisedPlugin


@dataclass
class NoOptions:
    """Config of a strategy without hyperparameters."""


class Strategy(SupervisedPlugin):
    """A continual-learning strategy: overrides only the callbacks it needs."""

    name: ClassVar[str]
    Config: ClassVar[type] = NoOptions

    def __init__(self, config: object | None = None) -> None:
        super().__init__()
        self.config = config if config is not None else self.Config()
