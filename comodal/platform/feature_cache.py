"""Frozen backbones run once: their outputs are cached on disk, keyed by what produced them.

The key hashes the dataset fingerprint, the split, the modality and the backbone fingerprint
(extractor version, preprocessing parameters, weight digests), so changing any of them
computes a new entry instead of reusing a stale one.
"""

from __future__ import annotations

import hashlib
import json
import sys
import weakref
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from comodal.core.data import MultimodalDataset, concat, non_finite_rows
from comodal.core.files import atomic_torch_save, atomic_write_text
from comodal.errors import DataError
from comodal.platform import distributed
from comodal.platform.modalities import Modality


class FeatureCache:
    """A directory of ``<key>.pt`` feature tensors with a JSON sidecar saying what made each.

    It also holds, while a dataset lives, that dataset prepared (``parents``): the tasks of a
    class-incremental stream are subsets of one parent, which is then read and preprocessed
    once instead of once per task.
    """

    def __init__(self, root: str | Path, batch_size: int = 256, progress: bool = True) -> None:
        self.root = Path(root) / "features"
        self.batch_size, self.progress = batch_size, progress
        self.hits = self.misses = 0
        self.writable = True
        self.parents: dict[tuple, MultimodalDataset] = {}

    @staticmethod
    def key(dataset_fingerprint: str, split: str, modality: str, backbone: dict) -> str:
        payload = json.dumps([dataset_fingerprint, split, modality, backbone], sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:32]

    def features(self, dataset_fingerprint: str, split: str, modality: Modality,
                 values: Sequence[Any], where: str) -> torch.Tensor:
        """Cached features of ``values`` under ``modality``'s frozen backbone (computed once;
        an unreadable entry is computed again and replaced). ``where`` names the rows."""
        backbone = modality.fingerprint()
        key = self.key(dataset_fingerprint, split, modality.name, backbone)
        path = self.root / f"{key}.pt"
        feats = self._load(path, len(values)) if path.is_file() else None
        world = distributed.current()
        if (feats is not None) if world is None else world.all(feats is not None):
            self.hits += 1
            return feats
        self.misses += 1
        starts = list(range(0, len(values), self.batch_size))
        mine = starts if world is None else starts[world.rank::world.size]
        label = f"encoding {split} {modality.name} ({backbone['extractor']})"
        chunks = {}
        for start in tqdm(mine, desc=label, disable=not self.progress, leave=False):
            part = [modality.preprocess(values[i], f"{where} {i}")
                    for i in range(start, min(start + self.batch_size, len(values)))]
            with torch.no_grad():
                chunks[start] = modality.frozen(modality.collate(part)).float().cpu()
        if world is not None:  # under torchrun each rank encoded every size-th chunk
            chunks = {k: v for found in world.objects(chunks) for k, v in found.items()}
        feats = torch.cat([chunks[start] for start in starts])
        bad = non_finite_rows(feats)
        if len(bad):
            raise DataError(f"{where} {int(bad[0])}: the frozen {modality.name} backbone "
                            f"({backbone['extractor']}) gives NaN or inf features "
                            f"({len(bad)} of {len(feats)} rows)")
        meta = {"dataset": dataset_fingerprint, "split": split, "modality": modality.name,
                "backbone": backbone, "shape": list(feats.shape)}
        self._store(path, feats, json.dumps(meta, indent=1))
        return feats

    @staticmethod
    def _load(path: Path, rows: int) -> torch.Tensor | None:
        """The entry at ``path``, or None (after saying so) if it is unreadable or wrong."""
        try:
            feats = torch.load(path, weights_only=True)
        except Exception as err:  # torch.load fails in many ways on a damaged file
            problem = str(err).split(". ")[0] or type(err).__name__
        else:
            if isinstance(feats, torch.Tensor) and feats.dim() == 2 and len(feats) == rows:
                return feats
            problem = f"not a [{rows}, width] tensor"
        print(f"comodal: feature cache entry {path} is unreadable ({problem}); computing it "
              "again", file=sys.stderr)
        return None

    def _store(self, path: Path, feats: torch.Tensor, meta: str) -> None:
        """Write an entry atomically (rank 0 under torchrun); a cache that cannot be written is
        used without storing."""
        world = distributed.current()
        if not self.writable or (world is not None and not world.main):
            return
        try:
            atomic_torch_save(feats, path)
            atomic_write_text(path.with_suffix(".json"), meta)
        except OSError as err:
            self.writable = False
            print(f"comodal: cannot write the feature cache {self.root} "
                  f"({err.strerror or err}); features are computed but not stored",
                  file=sys.stderr)


def prepare_dataset(
    dataset: MultimodalDataset, split: str, modalities: dict[str, Modality], cache: FeatureCache
) -> MultimodalDataset:
    """The dataset as training reads it, restricted to ``modalities``: cached features for
    frozen backbones, stacked vectors for precomputed features, and checked (resampled) raw
    values for trainable encoders."""
    if len(dataset) == 0:
        raise DataError(f"dataset {dataset.name!r} ({split}) is empty")
    if dataset.origin is not None:  # rows of other datasets: prepare those (once), then take
        parts = []
        for parent, rows in dataset.origin:
            prepared = _prepare_parent(parent, split, modalities, cache)
            parts.append(prepared if rows is None else prepared.subset(rows))
        joined = parts[0] if len(parts) == 1 else concat(parts, dataset.name)
        return replace(dataset, columns=joined.columns, origin=None)
    where = f"dataset {dataset.name!r} ({split}) row"
    columns: dict[str, Any] = {}
    for name, modality in modalities.items():
        values = dataset.columns[name]
        if modality.frozen is not None:
            columns[name] = cache.features(dataset.fingerprint, split, modality, values, where)
            continue
        column = [modality.preprocess(v, f"{where} {i}") for i, v in enumerate(values)]
        if modality.config.encoder == "features":
            column = torch.stack(column)
            if column.shape[1] != modality.config.dim:
                raise DataError(
                    f"dataset {dataset.name!r} ({split}): {name} features have width "
                    f"{column.shape[1]} but model.modalities.{name}.dim is {modality.config.dim}"
                )
        columns[name] = column
    return replace(dataset, columns=columns)


def _prepare_parent(parent: MultimodalDataset, split: str, modalities: dict[str, Modality],
                    cache: FeatureCache) -> MultimodalDataset:
    """``parent`` prepared once per (split, modalities) for as long as it lives."""
    key = (id(parent), split, tuple(modalities.items()))
    if key not in cache.parents:
        cache.parents[key] = prepare_dataset(parent, split, modalities, cache)
        weakref.finalize(parent, cache.parents.pop, key, None)  # its id may then be reused
    return cache.parents[key]
