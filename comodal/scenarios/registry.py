"""Named datasets a scenario config can use, and scenario construction from a config."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from comodal.config import DataConfig, RunConfig
from comodal.scenarios.data import MultimodalDataset
from comodal.scenarios.task import Scenario, Task


@dataclass(frozen=True)
class Splits:
    train: MultimodalDataset
    test: MultimodalDataset
    class_names: list[str] | None = None
    class_texts: list[str] | None = None


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    modalities: tuple[str, ...]
    build: Callable[[DataConfig, bool], Splits]


_DATASETS: dict[str, DatasetSpec] = {}


def register_dataset(spec: DatasetSpec) -> None:
    _DATASETS[spec.name] = spec


def _load_builtin() -> None:
    from comodal.scenarios import synth_pairs  # noqa: F401  (registers its domains)


def dataset_names() -> list[str]:
    _load_builtin()
    return sorted(_DATASETS)


def dataset_spec(name: str) -> DatasetSpec:
    _load_builtin()
    if name not in _DATASETS:
        raise KeyError(f"unknown dataset {name!r} (valid: {', '.join(sorted(_DATASETS))})")
    return _DATASETS[name]


def build_scenario(config: RunConfig) -> Scenario:
    """The scenario a run config describes (datasets are built or loaded from the cache)."""
    tasks, built = [], {}
    for i, tc in enumerate(config.scenario.tasks):
        if tc.dataset not in built:
            built[tc.dataset] = dataset_spec(tc.dataset).build(config.data, config.progress)
        splits = built[tc.dataset]
        name = tc.name or f"{i + 1}:{tc.dataset.split('/')[-1]}:{'-'.join(tc.modalities)}"
        tasks.append(Task(name, tuple(tc.modalities), splits.train, splits.test,
                          splits.class_names, splits.class_texts))
    return Scenario(tasks)
