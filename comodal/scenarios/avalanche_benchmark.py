"""A comodal scenario as an Avalanche 0.6 benchmark.

Each experience's dataset yields Avalanche's ``[x, y, t]`` items: ``x`` a sample dict (tagged
with its task and row), ``y`` its target and ``t`` its task label, with the ``targets`` and
``targets_task_labels`` attributes Avalanche's buffers, plugins and loaders read. Targets of a
class-incremental stream are classifier rows (classes numbered in arrival order, as the
model's classifier grows); a pair task's rows have its task index as target. Task labels are 0
throughout a class-incremental stream (one head) and the task index on pair streams.

The datasets carry no transform groups (Avalanche's transforms assume tuples and break dict
samples); their collate function turns samples into ``[Batch, y, t]`` with the caller's collation
of the sample dicts, so that Avalanche's own loaders produce comodal batches.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from comodal._avalanche import (
    CLScenario,
    ConstantSequence,
    DataAttribute,
    DatasetExperience,
    EagerCLStream,
    TaskAwareSupervisedClassificationDataset,
    TaskLabels,
)
from comodal.core.data import Batch, MultimodalDataset
from comodal.scenarios.task import Task

Collate = Callable[[list[dict[str, Any]]], dict[str, Any]]
_TAGS = ("task_id", "index")


class TaskRows(Dataset):
    """One task's rows as ``[sample, target]`` items; the sample is tagged with ``task_id``
    and ``index`` (its row), so that rows of several tasks stay apart in one loader."""

    def __init__(self, data: MultimodalDataset, task_id: int, targets: list[int]) -> None:
        self.data, self.task_id, self.targets = data, task_id, targets

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> list[Any]:
        sample = self.data[index]
        sample["task_id"], sample["index"] = self.task_id, index
        return [sample, self.targets[index]]


class PairExperience(DatasetExperience):
    """An experience that knows its comodal task and modality pair, and carries what
    Avalanche's class-incremental plugins read (task labels, classes by arrival)."""

    def __init__(self, *, dataset: Any, task: Task, current_experience: int,
                 task_label: int, classes: list[list[int]]) -> None:
        super().__init__(dataset=dataset, current_experience=current_experience)
        self.task, self.modalities = task, task.modalities
        self.task_labels, self.task_label = [task_label], task_label
        i = current_experience
        self.classes_in_this_experience = classes[i]
        self.previous_classes = sorted({c for c in sum(classes[:i], [])})
        self.classes_seen_so_far = sorted({c for c in sum(classes[: i + 1], [])})
        self.future_classes = sorted({c for c in sum(classes[i + 1:], [])})


def arrival_rows(tasks: Sequence[Task]) -> dict[int, int]:
    """Each class id's classifier row: classes numbered in the order tasks bring them."""
    arrival = dict.fromkeys(c for t in tasks if t.kind != "pair" for c in t.classes or [])
    return {c: row for row, c in enumerate(arrival)}


def make_batch(samples: list[dict[str, Any]], collate_fn: Collate,
               tasks: Sequence[Task]) -> Batch:
    """One ``Batch`` of tagged samples; samples of several modality pairs (or column sets)
    become one sub-batch each, in ``parts``."""
    again = functools.partial(make_batch, collate_fn=collate_fn, tasks=tasks)
    groups: dict[tuple, list[int]] = {}
    for i, s in enumerate(samples):
        task = tasks[s["task_id"]]
        groups.setdefault((task.kind, task.modalities, tuple(s)), []).append(i)
    if len(groups) > 1:
        parts = [(torch.tensor(rows), again([samples[i] for i in rows]))
                 for rows in groups.values()]
        return Batch({}, len(samples), "mixed", (), samples, again, parts)
    (kind, modalities, _), = groups
    columns = dict(collate_fn([{k: v for k, v in s.items() if k not in _TAGS}
                               for s in samples]))
    columns["index"] = torch.tensor([s["index"] for s in samples])
    columns["task_id"] = samples[0]["task_id"]
    return Batch(columns, len(samples), kind, modalities, samples, again)


def collate_items(items: list[list[Any]], collate_fn: Collate,
                  tasks: Sequence[Task]) -> list[Any]:
    """Avalanche's ``[x, y, t]`` of a list of items, ``x`` a ``Batch``."""
    batch = make_batch([item[0] for item in items], collate_fn, tasks)
    return [batch, torch.tensor([item[1] for item in items]),
            torch.tensor([item[-1] for item in items])]


def pair_benchmark(tasks: Sequence[Task], collate_fn: Collate) -> CLScenario:
    """One experience per task in ``train_stream`` and ``test_stream``; ``collate_fn`` turns
    a list of sample dicts into a batch dict (``comodal.platform.modalities.collate_samples``)."""
    rows = arrival_rows(tasks)
    classes = [sorted(rows[c] for c in t.classes) if t.kind != "pair" else [i]
               for i, t in enumerate(tasks)]
    collate = functools.partial(collate_items, collate_fn=collate_fn, tasks=tasks)

    def dataset(i: int, data: MultimodalDataset, label: int) -> Any:
        task = tasks[i]
        if task.kind != "pair":
            targets = [rows[int(c)] for c in data.labels.tolist()]
        else:
            targets = [i] * len(data)
        return TaskAwareSupervisedClassificationDataset(
            [TaskRows(data, i, targets)],
            data_attributes=[DataAttribute(targets, "targets"),
                             TaskLabels(ConstantSequence(label, len(data)))],
            collate_fn=collate)

    def stream(name: str, split: str) -> EagerCLStream:
        exps = []
        for i, task in enumerate(tasks):
            label = 0 if task.kind != "pair" else i
            exps.append(PairExperience(dataset=dataset(i, getattr(task, split), label),
                                       task=task, current_experience=i, task_label=label,
                                       classes=classes))
        return EagerCLStream(name, exps)

    return CLScenario([stream("train", "train"), stream("test", "test")])
