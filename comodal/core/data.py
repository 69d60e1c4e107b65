"""Column-stored multimodal datasets, the batches made of them (``Batch``, what Avalanche's
plugins read as the input ``x``) and the loaders over them.

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
    ``origin`` says which rows of which datasets a subset or concatenation was made of, so that
    their cached features are reused instead of computed again.
    """

    name: str
    fingerprint: str
    columns: dict[str, Sequence[Any] | torch.Tensor]
    labels: torch.Tensor | None = None
    meta: dict[str, Sequence[Any]] = field(default_factory=dict)
    origin: list[tuple[MultimodalDataset, torch.Tensor | None]] | None = field(
        default=None, repr=False, compare=False)

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
            origin=[(self, idx)],
        )


def non_finite_rows(values: torch.Tensor) -> torch.Tensor:
    """Indices of the rows of ``values`` holding NaN or inf: such a row would rank as a hit in
    retrieval or poison every loss it enters, so each entry point refuses it by row."""
    return (~torch.isfinite(values.reshape(len(values), -1))).any(1).nonzero().flatten()


def concat(datasets: Sequence[MultimodalDataset], name: str,
           labels: torch.Tensor | None = None) -> MultimodalDataset:
    """Rows of ``datasets`` one after another (they share columns); ``labels`` replaces
    theirs (by default their labels, joined, where every one has labels)."""

    def join(cols: list) -> Sequence[Any] | torch.Tensor:
        if all(isinstance(c, torch.Tensor) for c in cols):
            return torch.cat(cols)
        return [v for c in cols for v in c]

    first = datasets[0]
    if labels is None and all(d.labels is not None for d in datasets):
        labels = torch.cat([d.labels for d in datasets])
    return MultimodalDataset(
        name=name,
        fingerprint="+".join(d.fingerprint for d in datasets),
        columns={k: join([d.columns[k] for d in datasets]) for k in first.columns},
        labels=labels,
        meta={k: join([d.meta[k] for d in datasets]) for k in first.meta},
        origin=[(d, None) for d in datasets],
    )


Collate = Callable[[str, Sequence[Any]], Any]


def gather(dataset: MultimodalDataset, indices: torch.Tensor, collate: Collate) -> dict[str, Any]:
    """The batch of rows ``indices``: tensor columns are indexed, others collated per modality."""
    return gather_parts([(dataset, indices)], collate)


def gather_parts(parts: Sequence[tuple[MultimodalDataset, torch.Tensor]],
                 collate: Collate) -> dict[str, Any]:
    """One batch of rows from several datasets with the same columns (a training batch plus
    replayed rows): tensor columns are indexed and concatenated, the others collated once."""
    batch: dict[str, Any] = {}
    for key in parts[0][0].columns:
        cols = [(data.columns[key], idx) for data, idx in parts]
        if all(isinstance(col, torch.Tensor) for col, _ in cols):
            taken = [col[idx] for col, idx in cols]
            batch[key] = taken[0] if len(taken) == 1 else torch.cat(taken)
        else:
            batch[key] = collate(key, [col[i] for col, idx in cols for i in idx.tolist()])
    if all(data.labels is not None for data, _ in parts):
        labels = [data.labels[idx] for data, idx in parts]
        batch["label"] = labels[0] if len(labels) == 1 else torch.cat(labels)
    batch["index"] = parts[0][1] if len(parts) == 1 else torch.cat([idx for _, idx in parts])
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


class Batch(dict):
    """A collated batch (modality name -> tensor, plus ``label``, ``index``, ``task_id``) that
    Avalanche's plugins can treat as the input tensor ``x`` of their ``(x, y, t)`` batches:
    ``len`` counts rows, ``to`` moves it, and, where it was collated from samples, slices and
    ``torch.cat`` select and join rows (re-collated, since padded columns cannot be joined).
    ``kind`` and ``modalities`` say how the model reads it; a batch mixing modality pairs keeps
    one sub-batch per pair in ``parts``, with the rows each holds."""

    def __init__(self, columns: dict[str, Any], rows: int, kind: str,
                 modalities: tuple[str, ...], samples: list[dict[str, Any]] | None = None,
                 collate: Callable[[list[dict[str, Any]]], Batch] | None = None,
                 parts: list[tuple[torch.Tensor, Batch]] | None = None) -> None:
        super().__init__(columns)
        self.rows, self.kind, self.modalities = rows, kind, modalities
        self.samples, self.collate, self.parts = samples, collate, parts

    def __len__(self) -> int:
        return self.rows

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, str):
            return super().__getitem__(key)
        if self.samples is None:
            raise TypeError("rows of a training batch cannot be selected; only batches of "
                            "an Avalanche loader (collated from samples) can")
        if isinstance(key, slice):
            picked = list(range(self.rows)[key])
        else:
            index = torch.as_tensor(key)
            if index.dim() != 1:
                raise TypeError(f"a batch's rows are selected by a slice, a list of rows or a "
                                f"row mask, not {key!r}")
            picked = (index.nonzero().flatten() if index.dtype == torch.bool else index).tolist()
        return self.collate([self.samples[i] for i in picked])

    def size(self, dim: int = 0) -> int:
        if dim != 0:
            raise ValueError("a batch has only a row dimension")
        return self.rows

    def clone(self) -> Batch:
        return self

    def to(self, device: Any, non_blocking: bool = False) -> Batch:
        moved = Batch(to_device(dict(self), device), self.rows, self.kind, self.modalities,
                      self.samples, self.collate)
        moved.parts = [(rows, part.to(device)) for rows, part in self.parts or []] or None
        return moved

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (),
                           kwargs: Any = None) -> Any:
        """``torch.cat`` of batches: one batch of all their rows (as GEM keeps its memory)."""
        if func is not torch.cat:
            return NotImplemented
        batches = list(args[0])
        if any(b.samples is None for b in batches):
            return NotImplemented
        return batches[0].collate([s for b in batches for s in b.samples])


def to_device(value: Any, device: Any) -> Any:
    """``value``'s tensors on ``device``, through nested dicts (a batch's columns)."""
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    return value
