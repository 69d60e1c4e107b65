"""Column-stored multimodal datasets and a batch loader over them.

A sample is a dict: modality name -> raw value (audio: ``(waveform, sample_rate)``, text: str,
vision: image tensor) or a precomputed feature vector, plus ``label`` and metadata. Storing
columns lets a frozen modality's column be swapped for its cached features in one step and lets
batches of features be gathered with one indexing operation instead of per-sample collation.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import Dataset

from comodal.errors import DataError


@dataclass
class MultimodalDataset(Dataset):
    """Parallel columns, one per modality, with optional integer labels and metadata.

    ``fingerprint`` names everything that determined the raw data; the feature cache keys on it.
    """

    name: str
    fingerprint: str
    columns: dict[str, Sequence[Any] | torch.Tensor]
    labels: torch.Tensor | None = None
    meta: dict[str, Sequence[Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        lengths = {key: len(col) for key, col in self.columns.items()}
        if self.labels is not None:
            lengths["label"] = len(self.labels)
        lengths.update({key: len(col) for key, col in self.meta.items()})
        if len(set(lengths.values())) > 1:
            raise DataError(f"dataset {self.name!r}: columns differ in length: {lengths}")

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(self.columns)

    def __len__(self) -> int:
        return len(next(iter(self.columns.values())))

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = {key: col[index] for key, col in self.columns.items()}
        if self.labels is not None:
            sample["label"] = int(self.labels[index])
        sample.update({key: col[index] for key, col in self.meta.items()})
        return sample

    def subset(self, indices: Sequence[int], name: str | None = None) -> MultimodalDataset:
        """Rows ``indices`` in order; the fingerprint records the selection."""
        idx = torch.as_tensor(list(indices), dtype=torch.long)

        def take(col: Sequence[Any] | torch.Tensor) -> Sequence[Any] | torch.Tensor:
            return col[idx] if isinstance(col, torch.Tensor) else [col[i] for i in idx.tolist()]

        return MultimodalDataset(
            name=name or self.name,
            fingerprint=f"{self.fingerprint}[{hashlib.sha1(idx.numpy().tobytes()).hexdigest()[:12]}]",
            columns={key: take(col) for key, col in self.columns.items()},
            labels=None if self.labels is None else self.labels[idx],
            meta={key: take(col) for key, col in self.meta.items()},
        )


Collate = Callable[[str, Sequence[Any]], Any]


def gather(dataset: MultimodalDataset, indices: torch.Tensor, collate: Collate) -> dict[str, Any]:
    """The batch of rows ``indices``: tensor columns are indexed, others collated per modality."""
    batch: dict[str, Any] = {}
    for key, col in dataset.columns.items():
        if isinstance(col, torch.Tensor):
            batch[key] = col[indices]
        else:
            batch[key] = collate(key, [col[i] for i in indices.tolist()])
    if dataset.labels is not None:
        batch["label"] = dataset.labels[indices]
    batch["index"] = indices
    return batch


class BatchLoader:
    """Batches of one task's dataset in a seeded order; each batch carries its ``task_id``."""

    def __init__(
        self,
        dataset: MultimodalDataset,
        collate: Collate,
        batch_size: int,
        task_id: int,
        shuffle: bool = True,
        generator: torch.Generator | None = None,
    ) -> None:
        self.dataset, self.collate, self.batch_size = dataset, collate, batch_size
        self.task_id, self.shuffle, self.generator = task_id, shuffle, generator

    def __len__(self) -> int:
        return -(-len(self.dataset) // self.batch_size)

    def batch_indices(self) -> list[torch.Tensor]:
        n = len(self.dataset)
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        return list(order.split(self.batch_size))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for idx in self.batch_indices():
            batch = gather(self.dataset, idx, self.collate)
            batch["task_id"] = self.task_id
            yield batch


class InterleavedLoader:
    """Batches of several task loaders in a seeded random interleaving (joint training)."""

    def __init__(self, loaders: Sequence[BatchLoader], generator: torch.Generator) -> None:
        self.loaders, self.generator = list(loaders), generator

    def __len__(self) -> int:
        return sum(len(loader) for loader in self.loaders)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        plans = [(loader, loader.batch_indices()) for loader in self.loaders]
        owner = torch.cat([torch.full((len(p),), i) for i, (_, p) in enumerate(plans)])
        owner = owner[torch.randperm(len(owner), generator=self.generator)].tolist()
        cursors = [0] * len(plans)
        for i in owner:
            loader, plan = plans[i]
            batch = gather(loader.dataset, plan[cursors[i]], loader.collate)
            batch["task_id"] = loader.task_id
            cursors[i] += 1
            yield batch
