"""Bring-your-own features: a dataset of embeddings computed elsewhere (ImageBind,
LanguageBind, CLAP, ...), so that a CMCL-style stream runs without those backbones.

Configured under ``data.features.<name>`` and used as dataset ``features/<name>``:

- ``index``: a CSV with a header and columns ``id``, ``split`` (``train`` or ``test``) and
  optionally ``label`` (an integer class id); one row per item, in the arrays' row order;
- ``modalities``: modality -> a ``.npy`` file (a 2-D array) or a ``.safetensors`` file (one
  2-D tensor, or a tensor named ``embeddings``), one row per index row. A ``.safetensors``
  file may carry its row ids as JSON in the metadata field ``ids``, and a ``.npy`` file in a
  text file beside it (``<file>.ids``, one id per line); when present they must equal the
  index's ids, row by row.

Relative paths are read from the current directory. The modalities take precomputed features
(``model.modalities.<m>: {encoder: features, dim: <width>}``).
"""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from comodal.config import FeaturesConfig
from comodal.core.data import MultimodalDataset, non_finite_rows
from comodal.core.files import file_stamp
from comodal.errors import DataError

SPLITS = ("train", "test")
INDEX_HEADER = "id,split[,label]"


def read_index(path: Path, where: str) -> tuple[list[str], list[str], list[int] | None]:
    """ids, splits and labels (or None) of an index CSV, checked row by row."""
    _check_file(path, where, "index")
    try:
        with path.open(newline="", encoding="utf-8") as f:
            return _read_index_rows(csv.DictReader(f), path, where)
    except (UnicodeDecodeError, csv.Error) as err:
        raise DataError(f"{where}: {path} is not a CSV text file ({type(err).__name__}); "
                        f"expected a header line {INDEX_HEADER!r} and a row per item") from None


def _read_index_rows(reader: csv.DictReader, path: Path,
                     where: str) -> tuple[list[str], list[str], list[int] | None]:
    missing = [c for c in ("id", "split") if c not in (reader.fieldnames or [])]
    if missing:
        raise DataError(f"{where}: {path} has no column {missing[0]!r}: its first line begins "
                        f"{_preview(','.join(reader.fieldnames or []))}; expected the header "
                        f"{INDEX_HEADER!r}")
    has_label = "label" in reader.fieldnames
    ids, splits, labels = [], [], []
    for line, row in enumerate(reader, start=2):
        if row["split"] not in SPLITS:
            raise DataError(f"{where}: {path} line {line}: split {_preview(row['split'])} is "
                            f"not one of {', '.join(SPLITS)}")
        if not row["id"]:
            raise DataError(f"{where}: {path} line {line}: empty id")
        ids.append(row["id"])
        splits.append(row["split"])
        if has_label:
            try:
                labels.append(int(row["label"]))
            except (TypeError, ValueError):
                labels.append(-1)
            if labels[-1] < 0:
                raise DataError(f"{where}: {path} line {line}: label {_preview(row['label'])} "
                                "is not a class id (an integer >= 0)")
    if not ids:
        raise DataError(f"{where}: {path} lists no items")
    seen: dict[str, int] = {}
    for line, item in enumerate(ids, start=2):
        if item in seen:
            raise DataError(f"{where}: {path} line {line}: id {_preview(item)} is also on line "
                            f"{seen[item]}")
        seen[item] = line
    return ids, splits, labels if has_label else None


def _preview(text: str | None, limit: int = 40) -> str:
    """``text`` quoted for a message: at most ``limit`` characters, unprintable ones as '?'."""
    text = str(text)
    shown = "".join(c if c.isprintable() else "?" for c in text[:limit])
    return repr(shown) + ("..." if len(text) > limit else "")


def _check_file(path: Path, where: str, what: str) -> None:
    if not path.exists():
        raise DataError(f"{where}: {what} file {str(path)!r} does not exist")
    if not path.is_file():
        raise DataError(f"{where}: {what} file {str(path)!r} is not a regular file")
    if path.stat().st_size == 0:
        raise DataError(f"{where}: {what} file {str(path)!r} is empty (0 bytes)")


def read_array(path: Path, where: str) -> tuple[torch.Tensor, list[str] | None]:
    """The 2-D float embeddings of one modality file and its row ids, if it carries them."""
    _check_file(path, where, "features")
    ids = None
    if path.suffix == ".npy":
        try:
            array = torch.from_numpy(np.load(path, allow_pickle=False)).float()
        except (ValueError, TypeError, EOFError, OSError) as err:
            raise DataError(f"{where}: {path} is not a readable .npy array ({err})") from None
        sidecar = path.with_name(path.name + ".ids")
        if sidecar.is_file():
            ids = sidecar.read_text().split("\n")
            ids = ids[:-1] if ids and ids[-1] == "" else ids
    elif path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                keys = list(f.keys())
                key = "embeddings" if "embeddings" in keys else keys[0] if len(keys) == 1 else None
                if key is None:
                    raise DataError(f"{where}: {path} holds several tensors ({', '.join(keys)}) "
                                    "and none is named 'embeddings'")
                array = f.get_tensor(key).float()
                meta = f.metadata() or {}
        except SafetensorError as err:
            raise DataError(f"{where}: {path} is not a readable .safetensors file ({err})") \
                from None
        if "ids" in meta:
            try:
                ids = json.loads(meta["ids"])
            except json.JSONDecodeError as err:
                raise DataError(f"{where}: {path} metadata 'ids' is not JSON ({err})") from None
            if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
                raise DataError(f"{where}: {path} metadata 'ids' must be a JSON list of strings")
    else:
        raise DataError(f"{where}: {path} must be a .npy or .safetensors file")
    if array.dim() != 2:
        raise DataError(f"{where}: {path} has shape {tuple(array.shape)}; expected "
                        "[items, width]")
    return array, ids


def check_finite(array: torch.Tensor, path: Path, ids: list[str], index: Path,
                 where: str) -> None:
    """Refuse NaN or inf: one such row silently corrupts every score it enters (a NaN
    similarity used to rank as a hit)."""
    bad = non_finite_rows(array)
    if len(bad):
        row = int(bad[0])
        raise DataError(f"{where}: {path} row {row} (id {_preview(ids[row])}, {index} line "
                        f"{row + 2}) holds NaN or inf; {len(bad)} of {len(array)} rows do "
                        "(features must be finite)")


def load_features(name: str, cfg: FeaturesConfig) -> tuple[MultimodalDataset, MultimodalDataset]:
    """Train and test datasets of ``features/<name>``, with every shape and id checked."""
    where = f"data.features.{name}"
    if not cfg.modalities:
        raise DataError(f"{where}.modalities: name at least one modality file")
    index = Path(cfg.index)
    ids, splits, labels = read_index(index, where)
    digest = hashlib.sha256(index.read_bytes())
    columns = {}
    for modality, file in cfg.modalities.items():
        path = Path(file)
        array, row_ids = read_array(path, f"{where}.modalities.{modality}")
        if len(array) != len(ids):
            raise DataError(f"{where}.modalities.{modality}: {path} has {len(array)} rows but "
                            f"{index} lists {len(ids)} items")
        if row_ids is not None:
            if len(row_ids) != len(ids):
                raise DataError(f"{where}.modalities.{modality}: {path} carries {len(row_ids)} "
                                f"ids but {index} lists {len(ids)} items")
            for row, (got, want) in enumerate(zip(row_ids, ids, strict=True)):
                if got != want:
                    raise DataError(f"{where}.modalities.{modality}: {path} row {row} has id "
                                    f"{got!r} where {index} line {row + 2} has {want!r}")
        check_finite(array, path, ids, index, f"{where}.modalities.{modality}")
        columns[modality] = array
        digest.update(f"{modality}:{file_stamp(path)}".encode())
    fingerprint = f"features-{name}-{digest.hexdigest()[:12]}"
    label_tensor = torch.tensor(labels) if labels is not None else None

    def split(which: str) -> MultimodalDataset:
        rows = torch.tensor([i for i, s in enumerate(splits) if s == which])
        if len(rows) == 0:
            raise DataError(f"{where}: {index} has no {which} rows")
        return MultimodalDataset(
            f"features/{name}", f"{fingerprint}/{which}",
            {m: col[rows] for m, col in columns.items()},
            None if label_tensor is None else label_tensor[rows],
            {"id": [ids[i] for i in rows.tolist()]})

    return split("train"), split("test")
