"""Tasks and scenarios: an ordered list of modality-pair or class-incremental tasks, also an
Avalanche benchmark."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from comodal.core.data import MultimodalDataset
from comodal.errors import DataError

KINDS = ("pair", "classify", "sequence")


@dataclass
class Task:
    """A modality pair trained on ``train`` and evaluated on ``test``; labelled tasks also
    name their classes and the text used for each class (zero-shot prototypes), or give each
    class's text as stored features ``class_features`` ``[classes, d]`` (CMCL class files).

    A ``classify`` task (class-incremental) brings the new classes ``classes``: its first
    modality is classified over every class seen so far, an optional second one (the
    transcript) pairs with it for audio-text losses. A ``sequence`` task brings classes too,
    but its audio is decoded into its row's target string (``meta["target"]``,
    ``"<intent> _SEP <transcription>"``) by the model's decoder."""

    name: str
    modalities: tuple[str, ...]
    train: MultimodalDataset
    test: MultimodalDataset
    class_names: list[str] | None = None
    class_texts: list[str] | None = None
    kind: str = "pair"
    classes: list[int] | None = None
    class_features: Any = None  # a torch.Tensor [classes, d], or None

    def __post_init__(self) -> None:
        self.modalities = tuple(self.modalities)
        if self.kind not in KINDS:
            raise DataError(f"task {self.name!r}: unknown kind {self.kind!r} "
                            f"(valid: {', '.join(KINDS)})")
        for split, data in (("train", self.train), ("test", self.test)):
            if len(data) == 0:
                raise DataError(f"task {self.name!r}: the {split} set is empty")
            if self.kind != "pair" and data.labels is None:
                raise DataError(f"task {self.name!r}: a {self.kind} task needs labels, and the "
                                f"{split} dataset {data.name!r} has none")
            if self.kind == "sequence" and "target" not in data.meta:
                raise DataError(f"task {self.name!r}: a sequence task needs each row's target "
                                f"string, and the {split} dataset {data.name!r} has none "
                                "(datasets fsc and slurp have them)")
            missing = [m for m in self.modalities if m not in data.modalities]
            if missing:
                raise DataError(
                    f"task {self.name!r}: {split} dataset {data.name!r} has no modality "
                    f"{missing[0]!r} (it has: {', '.join(data.modalities)})"
                )

    def with_data(self, train: MultimodalDataset, test: MultimodalDataset) -> Task:
        return dataclasses.replace(self, train=train, test=test)


@dataclass
class Scenario:
    """An ordered sequence of tasks."""

    tasks: list[Task]

    def __post_init__(self) -> None:
        if not self.tasks:
            raise DataError("a scenario needs at least one task")
        names = [t.name for t in self.tasks]
        if len(set(names)) != len(names):
            raise DataError(f"task names must be unique, got {names}")

    def __len__(self) -> int:
        return len(self.tasks)

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def benchmark(self, collate_fn: Callable[[list], Any]) -> Any:
        """The scenario as an Avalanche ``CLScenario``: ``train_stream`` and ``test_stream``
        with one experience per task, carrying ``task``, ``modalities``, ``task_labels`` and
        the classes Avalanche's plugins read; ``collate_fn`` collates sample dicts."""
        from comodal.scenarios.avalanche_benchmark import pair_benchmark

        return pair_benchmark(self.tasks, collate_fn)
