"""Named datasets a scenario config can use, and scenario construction from a config.

Besides the built-in datasets, ``register_dataset`` adds one from user code (a module a config
lists under ``imports``, or any code run before), and installed packages add theirs through
``comodal.datasets`` entry points, loaded when the registry is first used.
"""

from __future__ import annotations

import itertools
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch

from comodal.config import DataConfig, RunConfig, check_choice, task_rows
from comodal.core.data import MultimodalDataset
from comodal.entry_points import load_entry_points
from comodal.errors import ConfigError
from comodal.scenarios import cmcl
from comodal.scenarios.task import Scenario, Task


@dataclass(frozen=True)
class Splits:
    train: MultimodalDataset
    test: MultimodalDataset
    class_names: list[str] | None = None
    class_texts: list[str] | None = None
    class_groups: list[str] | None = None  # a group per class (SLURP: the scenario)
    class_features: torch.Tensor | None = None  # [classes, d] stored class text features


@dataclass(frozen=True)
class DatasetSpec:
    """A named dataset: its modalities, and ``build(data_config, progress) -> Splits``."""

    name: str
    modalities: tuple[str, ...]
    build: Callable[[DataConfig, bool], Splits]


_DATASETS: dict[str, DatasetSpec] = {}


def register_dataset(spec: DatasetSpec) -> DatasetSpec:
    """Make ``spec`` usable as ``scenario...dataset: <spec.name>``; a name already taken by
    another spec, or one under ``features/`` or ``cmcl/`` (the bring-your-own-features and
    CMCL datasets), is refused, so a plugin cannot silently replace a dataset (the same
    builder defined again, by a reloaded module, replaces the old spec)."""
    if not isinstance(spec, DatasetSpec):
        raise ConfigError(f"register_dataset: expected a comodal.scenarios.registry.DatasetSpec, "
                          f"got {spec!r}")
    where = f"register_dataset: {spec.name!r}"
    if not isinstance(spec.name, str) or not spec.name \
            or spec.name.startswith(("features/", cmcl.PREFIX)) or ":" in spec.name:
        raise ConfigError(f"{where}: the name must be a non-empty string without ':' outside "
                          "features/ and cmcl/ (reserved for data.features and data.cmcl)")
    if not spec.modalities or not all(isinstance(m, str) for m in spec.modalities):
        raise ConfigError(f"{where}: modalities must name at least one modality, "
                          f"got {spec.modalities!r}")
    if not callable(spec.build):
        raise ConfigError(f"{where}: build must be a function (data config, progress) -> "
                          f"Splits, got {spec.build!r}")
    taken = _DATASETS.get(spec.name)
    if taken is not None and _origin(taken.build) != _origin(spec.build):
        owner = _origin(taken.build)[0] or "another module"
        raise ConfigError(f"{where}: the dataset name is taken (registered by {owner}); "
                          "choose another name")
    _DATASETS[spec.name] = spec
    return spec


def _origin(build: Callable) -> tuple[str | None, str | None]:
    """Where a builder is defined, which stays the same when its module is reloaded."""
    return getattr(build, "__module__", None), getattr(build, "__qualname__", None)


def _load() -> None:
    """The built-in datasets, and those of installed packages (once)."""
    from comodal.scenarios import slu_datasets, synth_pairs  # noqa: F401  (register datasets)

    load_entry_points("comodal.datasets", register_dataset)


def dataset_names(data: DataConfig | None = None) -> list[str]:
    """Registered datasets, ``features/<name>`` for each of ``data.features``, and, where
    ``data.cmcl.root`` is set, ``cmcl/<name>`` for the CMCL datasets and those it declares."""
    _load()
    extra = [f"features/{k}" for k in (data.features if data is not None else {})]
    if data is not None and data.cmcl.root is not None:
        extra += [f"{cmcl.PREFIX}{k}" for k in {**cmcl.ROWS, **data.cmcl.modalities}]
    return sorted(_DATASETS) + extra


def dataset_spec(name: str, data: DataConfig | None = None) -> DatasetSpec:
    """The spec of dataset ``name`` (a ``features/<name>`` or ``cmcl/<name>`` one from
    ``data``)."""
    _load()
    key = name.removeprefix("features/")
    if data is not None and name.startswith("features/") and key in data.features:
        return DatasetSpec(name, tuple(data.features[key].modalities), _features_builder(key))
    if data is not None and data.cmcl.root is not None and name.startswith(cmcl.PREFIX):
        return resolve_task(name, [], data, "dataset").spec
    if name not in _DATASETS:
        raise KeyError(f"unknown dataset {name!r} (valid: {', '.join(dataset_names(data))})")
    return _DATASETS[name]


@dataclass(frozen=True)
class ResolvedTask:
    """What a task's ``dataset`` and ``modalities`` mean: the dataset (without ``:i,j``), the
    task's modalities, the spec, and ``key``, the same for tasks that share the built data."""

    dataset: str
    modalities: tuple[str, ...]
    spec: DatasetSpec
    key: tuple


def resolve_task(dataset: str, modalities: list[str], data: DataConfig,
                 where: str) -> ResolvedTask:
    """Check a task's (or class-incremental stream's) dataset and modalities and resolve them:
    ``cmcl/<name>`` datasets take row indices (``:i,j``), modality names or neither; every other
    dataset names modalities it has. Mistakes are ``ConfigError``s at ``where``."""
    base, rows = task_rows(dataset, f"{where}.dataset")
    if base.startswith(cmcl.PREFIX):
        name = base.removeprefix(cmcl.PREFIX)
        found = cmcl.resolve(name, rows, modalities, data.cmcl, where)
        table = tuple(m for _, m in found.naming)

        def build(data: DataConfig, progress: bool) -> Splits:
            loaded = cmcl.load(name, data.cmcl, found)
            return Splits(loaded.train, loaded.test, class_names=loaded.class_names,
                          class_features=loaded.class_features)

        return ResolvedTask(base, found.modalities, DatasetSpec(base, table, build),
                            (base, found.naming))
    if rows is not None:
        raise ConfigError(f"{where}.dataset: {dataset!r}: row indices (:i,j) pick rows of CMCL "
                          f"feature files (cmcl/<name>:i,j); name the modalities of {base!r}")
    check_choice(f"{where}.dataset", base, dataset_names(data))
    spec = dataset_spec(base, data)
    for m in modalities:
        if m not in spec.modalities:
            raise ConfigError(f"{where}.modalities: dataset {base!r} has no modality {m!r} "
                              f"(it has: {', '.join(spec.modalities)})")
    return ResolvedTask(base, tuple(modalities), spec, (base,))


def _features_builder(key: str) -> Callable[[DataConfig, bool], Splits]:
    def build(data: DataConfig, progress: bool) -> Splits:
        from comodal.scenarios.features import load_features

        train, test = load_features(key, data.features[key])
        if train.labels is None:
            return Splits(train, test)
        names = [f"class {c}" for c in range(int(max(train.labels.max(), test.labels.max())) + 1)]
        return Splits(train, test, class_names=names)

    return build


def build_scenario(config: RunConfig) -> Scenario:
    """The scenario a run config describes (datasets are built or loaded from the cache)."""
    ci = config.scenario.class_incremental
    if ci is not None:
        where = "scenario.class_incremental"
        resolved = resolve_task(ci.dataset, ci.modalities, config.data, where)
        splits = _built(resolved, config, where, {})
        order, increments = ci.order, ci.increments
        if ci.groups_per_task:
            order, increments = group_order(splits, ci.groups_per_task)
        kind = "sequence" if ci.target == "sequence" else "classify"
        return class_incremental(splits, ci.dataset, resolved.modalities, increments, order,
                                 ci.subset, kind)
    tasks, built = [], {}
    for i, tc in enumerate(config.scenario.tasks):
        where = f"scenario.tasks[{i}]"
        resolved = resolve_task(tc.dataset, tc.modalities, config.data, where)
        splits = _built(resolved, config, where, built)
        name = tc.name or (f"{i + 1}:{resolved.dataset.split('/')[-1]}:"
                           f"{'-'.join(resolved.modalities)}")
        tasks.append(Task(name, resolved.modalities, splits.train, splits.test,
                          splits.class_names, splits.class_texts,
                          class_features=splits.class_features))
    return Scenario(tasks)


def _built(resolved: ResolvedTask, config: RunConfig, where: str, built: dict) -> Splits:
    """The task's data, built once per ``resolved.key``; a CMCL dataset's feature width is
    checked against the model's modalities, naming the file."""
    if resolved.key not in built:
        built[resolved.key] = resolved.spec.build(config.data, config.progress)
    splits = built[resolved.key]
    if resolved.dataset.startswith(cmcl.PREFIX):
        dims = {m: c.dim for m, c in config.model.modalities.items() if c.encoder == "features"}
        loaded = cmcl.CMCLData(splits.train, splits.test, splits.class_names,
                               splits.class_features)
        cmcl.check_widths(resolved.dataset.removeprefix(cmcl.PREFIX), config.data.cmcl, loaded,
                          resolved.modalities, dims, where)
    return splits


def class_groups(num_classes: int, increments: list[int], order: list[int] | None = None,
                 subset: bool = False) -> list[list[int]]:
    """Classes per task: ``order`` (default ascending) cut by ``increments``; the last
    increment repeats while classes remain (the final task may be smaller). ``order`` names
    every class once, or, with ``subset``, some classes (the others are left out, and said so)."""
    where = "scenario.class_incremental"
    order = list(range(num_classes)) if order is None else list(order)
    bad = [c for c in order if not 0 <= c < num_classes]
    if bad:
        raise ConfigError(f"{where}.order: class {bad[0]} is not a class of the dataset "
                          f"(ids 0..{num_classes - 1})")
    repeated = [(c, n) for c, n in Counter(order).items() if n > 1]
    if repeated:
        raise ConfigError(f"{where}.order: class {repeated[0][0]} is listed {repeated[0][1]} "
                          "times; each class arrives in one task")
    missing = sorted(set(range(num_classes)) - set(order))
    if missing:
        listed = _ids(missing)
        if not subset:
            raise ConfigError(f"{where}.order: names {len(order)} of the dataset's {num_classes} "
                              f"classes; name every class (missing: {listed})")
        print(f"comodal: {where}: using {len(order)} of {num_classes} classes, in the order "
              f"{_ids(order)}; left out: {listed}", file=sys.stderr)
    if sum(increments) > len(order):
        raise ConfigError(f"{where}.increments: {increments} adds up to {sum(increments)} "
                          f"classes, but the order has {len(order)}")
    groups, start = [], 0
    for k in itertools.count():
        if start >= len(order):
            break
        size = increments[min(k, len(increments) - 1)]
        groups.append(order[start:start + size])
        start += size
    return groups


def _ids(classes: list[int], limit: int = 40) -> str:
    shown = ", ".join(map(str, classes[:limit]))
    return shown + (f", ... ({len(classes)} in all)" if len(classes) > limit else "")


def group_order(splits: Splits, per_task: int) -> tuple[list[int], list[int]]:
    """Class order and increments for tasks of ``per_task`` class groups each (groups in
    alphabetical order, classes by id within a group)."""
    if not splits.class_groups:
        raise ConfigError("scenario.class_incremental.groups_per_task: this dataset has no "
                          "class groups (SLURP's scenarios are one)")
    names = sorted(set(splits.class_groups))
    order, increments = [], []
    for start in range(0, len(names), per_task):
        chunk = set(names[start:start + per_task])
        members = [c for c, g in enumerate(splits.class_groups) if g in chunk]
        members.sort(key=lambda c: (splits.class_groups[c], c))
        order += members
        increments.append(len(members))
    return order, increments


def class_incremental(splits: Splits, dataset: str, modalities: tuple[str, ...],
                      increments: list[int], order: list[int] | None = None,
                      subset: bool = False, kind: str = "classify") -> Scenario:
    """One ``classify`` (or ``sequence``) task per group of classes, each with its classes'
    rows of ``splits`` (``order`` and ``subset`` as in ``class_groups``)."""
    if splits.train.labels is None or not splits.class_names:
        raise ConfigError(f"scenario.class_incremental.dataset: {dataset!r} has no labels")
    groups = class_groups(len(splits.class_names), increments, order, subset)
    tasks = []
    for i, classes in enumerate(groups):
        keep = torch.tensor(classes)
        parts = [data.subset(torch.isin(data.labels, keep).nonzero().flatten().tolist())
                 for data in (splits.train, splits.test)]
        name = f"{i + 1}:classes " + "+".join(map(str, classes))
        tasks.append(Task(name, modalities, parts[0], parts[1], splits.class_names,
                          splits.class_texts, kind=kind, classes=classes,
                          class_features=splits.class_features))
    return Scenario(tasks)
