"""What every comodal strategy is: an Avalanche ``SupervisedPlugin`` with a typed config."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from comodal._avalanche import SupervisedPlugin


@dataclass
class NoOptions:
    """Config of a strategy without hyperparameters."""


class Strategy(SupervisedPlugin):
    """A continual-learning strategy: overrides only the callbacks it needs. It may also
    define ``train_tasks(trainer)`` (the tasks whose data a task trains on, as ``joint``) or
    ``wrap_loader(trainer, loader)`` (``er``); the trainer calls those when it builds a
    task's loader."""

    name: ClassVar[str]
    Config: ClassVar[type] = NoOptions
    kinds: ClassVar[tuple[str, ...]] = ("pair", "classify")  # task kinds it works on
    uses_teacher: ClassVar[bool] = False  # True: the trainer keeps ``teacher`` for it
    # how its state stays the same on every process under torchrun (a key of
    # ``comodal.platform.distributed.ACROSS_RANKS``); None: it is refused there
    across_ranks: ClassVar[str | None] = None

    def __init__(self, config: object | None = None) -> None:
        super().__init__()
        self.config = config if config is not None else self.Config()
