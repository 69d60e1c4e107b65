"""CMCL feature files: the datasets of Liu et al., "Continual Multimodal Contrastive Learning"
(NeurIPS 2025), read from the HDF5 files their code stores, so that their stream runs on their
ImageBind / LanguageBind / UniBind features. Datasets ``cmcl/<name>``, configured by
``data.cmcl: {root, backbone, modalities}``.

The layout, as the authors' code writes and reads it (``perceptors/imagebind.py``,
``feature_dataset.py``, ``dataloader.py``, ``features_storage/extract.py``), all in ``root``:

- ``{name}_{split}_{backbone}.h5`` for the splits ``train`` and ``test``: one HDF5 dataset per
  sample, its key ``{id}__{class name}__{class index}`` and its value an ``[M, d]`` array, the
  sample's M modalities in the canonical order vision, text, audio, thermal, depth, imu, video,
  tactile, point, restricted to those the dataset has (``ROWS``);
- ``{name}_class_{backbone}.h5``: one key per class name, its value the class's text feature
  ``[d]``. Classes are numbered in sorted name order and a sample's label is the number of the
  class name in its key, as in the authors' evaluation (the key's class index is the authors'
  loader's running count, shared across their datasets, and is not used).

A task indexes the rows of a dataset (``nyudv2:0,2``: rows 0 and 2, vision and depth; no index:
rows 0 and 1), as the authors' task strings do, or names two modalities of its rows. The
authors' ``tactile`` is comodal's ``touch``; every other name is theirs.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from comodal.config import FILE_PART, CMCLConfig, check_modality_name
from comodal.core.data import MultimodalDataset
from comodal.core.files import file_stamp
from comodal.errors import ConfigError, DataError
from comodal.scenarios.features import _check_file, _preview

PREFIX = "cmcl/"
SPLITS = ("train", "test")
# the rows of each dataset of the authors' stream: its modalities in the canonical order, in
# comodal's names (the authors' tactile is touch)
ROWS: dict[str, tuple[str, ...]] = {
    "ucf101": ("text", "video"),
    "esc50": ("text", "audio"),
    "nyudv2": ("vision", "text", "depth"),
    "clotho": ("text", "audio"),
    "vggsound_s": ("text", "audio", "video"),
    "tvl": ("vision", "text", "touch"),
    "llvip": ("vision", "thermal"),
}
# the datasets whose class file the authors' evaluation reads (the others are retrieval only)
LABELLED = ("nyudv2", "vggsound_s", "ucf101", "esc50")


def path(cfg: CMCLConfig, name: str, split: str) -> Path:
    """``<root>/{name}_{split}_{backbone}.h5`` (split ``class``: the class-name features)."""
    return Path(cfg.root or ".") / f"{name}_{split}_{cfg.backbone}.h5"


def row_modalities(name: str, cfg: CMCLConfig) -> tuple[str, ...] | None:
    """The modality of each row of dataset ``name``'s arrays: ``data.cmcl.modalities``, else
    the table of the authors' datasets, else None (unknown)."""
    if name in cfg.modalities:
        return tuple(cfg.modalities[name])
    return ROWS.get(name)


def _rows(table: tuple[str, ...]) -> str:
    return ", ".join(f"{i} {m}" for i, m in enumerate(table))


@dataclass(frozen=True)
class Resolved:
    """A task on a CMCL dataset: its modalities, and the name of each row the data needs
    (``m``: the rows every array has, None where the dataset's table is unknown)."""

    modalities: tuple[str, ...]
    naming: tuple[tuple[int, str], ...]
    m: int | None


def resolve(name: str, rows: tuple[int, int] | None, modalities: list[str], cfg: CMCLConfig,
            where: str) -> Resolved:
    """The modalities of a task on ``cmcl/<name>`` given as row indices, as modality names,
    both, or neither (rows 0 and 1, as the authors' code)."""
    dataset = f"{PREFIX}{name}"
    if cfg.root is None:
        raise ConfigError(f"{where}.dataset: {dataset!r} reads CMCL feature files; set "
                          "data.cmcl.root to their directory (and data.cmcl.backbone)")
    if not FILE_PART.fullmatch(name):
        raise ConfigError(f"{where}.dataset: {dataset!r}: {name!r} is not a dataset name (the "
                          "{dataset} of {dataset}_{split}_{backbone}.h5)")
    table = row_modalities(name, cfg)
    if table is None:
        if rows is None or len(modalities) != 2:
            raise ConfigError(
                f"{where}.dataset: {dataset!r} is not one of the CMCL datasets "
                f"({', '.join(ROWS)}); declare its rows (data.cmcl.modalities.{name}: "
                f"[vision, depth, ...]), or give rows and names ({{dataset: '{dataset}:0,1', "
                f"modalities: [a, b]}})")
        for m in modalities:
            check_modality_name(m, f"{where}.modalities")
        return Resolved(tuple(modalities), tuple(zip(rows, modalities, strict=True)), None)
    if rows is not None:
        bad = [r for r in rows if r >= len(table)]
        if bad:
            raise ConfigError(f"{where}.dataset: row {bad[0]} is not a row of {dataset}'s "
                              f"features ({_rows(table)})")
        pair = tuple(table[r] for r in rows)
        if modalities and tuple(modalities) != pair:
            raise ConfigError(f"{where}.modalities: {modalities} are not rows {rows[0]},{rows[1]} "
                              f"of {dataset}'s features, which are {', '.join(pair)} "
                              f"({_rows(table)})")
    elif modalities:
        missing = [m for m in modalities if m not in table]
        if missing:
            raise ConfigError(f"{where}.modalities: dataset {dataset!r} has no modality "
                              f"{missing[0]!r} (it has: {', '.join(table)})")
        pair = tuple(modalities)
    else:
        pair = table[:2]
    return Resolved(pair, tuple(enumerate(table)), len(table))


@dataclass(frozen=True)
class CMCLData:
    train: MultimodalDataset
    test: MultimodalDataset
    class_names: list[str] | None
    class_features: torch.Tensor | None


def _describe(item: object) -> str:
    import h5py

    if not isinstance(item, h5py.Dataset):
        return f"a {type(item).__name__.lower()}, not an array"
    return f"an array of shape {list(item.shape)} and type {item.dtype}"


def _open(file: Path, where: str, what: str):  # noqa: ANN202  (an h5py.File)
    import h5py

    _check_file(file, where, what)
    try:
        return h5py.File(file, "r")
    except OSError as err:
        raise DataError(f"{where}: {file} is not a readable HDF5 file ({err})") from None


def parse_key(key: str) -> tuple[str, str | None]:
    """A sample key's id and class name: ``{id}__{class name}__{class index}`` (the authors'
    ``tensor(5)`` id of an integer id read as ``5``); a key of another form is its own id."""
    parts = key.rsplit("__", 2)
    sample, cls = (parts[0], parts[1]) if len(parts) == 3 else (key, None)
    if sample.startswith("tensor(") and sample.endswith(")"):
        sample = sample[7:-1]
    return sample, cls


def read_split(file: Path, split: str, naming: tuple[tuple[int, str], ...], m: int | None,
               where: str) -> tuple[list[str], list[str | None], dict[str, torch.Tensor]]:
    """Keys (sorted, as the authors' loader), their ids and class names, and the named rows
    of their arrays as one ``[N, d]`` column per modality, every shape and value checked."""
    top = max(r for r, _ in naming)
    need = f"M = {m} ({_rows(tuple(n for _, n in naming))})" if m is not None \
        else f"M > {top} (rows {', '.join(f'{r} {n}' for r, n in naming)})"
    with _open(file, where, f"{split} features") as f:
        keys = sorted(f.keys())
        if not keys:
            raise DataError(f"{where}: {file} holds no samples: the {split} split is empty")
        arrays, first = [], None
        for key in keys:
            item = f[key]
            shape = getattr(item, "shape", None)
            if getattr(item, "dtype", None) is None or item.dtype.kind not in "fiu" \
                    or len(shape) != 2 or shape[1] == 0 \
                    or (shape[0] != m if m is not None else shape[0] <= top):
                raise DataError(f"{where}: {file} key {_preview(key)} holds {_describe(item)}; "
                                f"expected an [M, d] array of numbers with {need}")
            if first is None:
                first = (key, shape)
            elif shape != first[1]:
                what = "width" if shape[1] != first[1][1] else "number of modalities"
                raise DataError(f"{where}: {file} key {_preview(key)} has shape {list(shape)} "
                                f"but key {_preview(first[0])} has {list(first[1])}; every "
                                f"sample of a file has one {what}")
            arrays.append(item[()])
    stack = np.stack(arrays)
    rows = [r for r, _ in naming]
    finite = np.isfinite(stack[:, rows].astype(np.float32)).all(2)  # [N, rows]
    if not finite.all():
        bad = np.flatnonzero(~finite.all(1))
        row = rows[int(np.flatnonzero(~finite[bad[0]])[0])]
        raise DataError(f"{where}: {file} key {_preview(keys[bad[0]])} holds NaN or inf in row "
                        f"{row} ({dict(naming)[row]}); {len(bad)} of {len(keys)} samples do "
                        "(features must be finite)")
    columns = {name: torch.from_numpy(np.ascontiguousarray(stack[:, r], dtype=np.float32))
               for r, name in naming}
    ids, classes, seen = [], [], {}
    for key in keys:
        sample, cls = parse_key(key)
        if sample in seen:
            raise DataError(f"{where}: {file} keys {_preview(seen[sample])} and {_preview(key)} "
                            f"are one sample id {_preview(sample)}; a split holds a sample once")
        seen[sample] = key
        ids.append(sample)
        classes.append(cls)
    return ids, classes, columns


def read_classes(file: Path, width: int, where: str) -> tuple[list[str], torch.Tensor]:
    """The class names (sorted) and their text features ``[C, width]``."""
    with _open(file, where, "class") as f:
        names = sorted(f.keys())
        if not names:
            raise DataError(f"{where}: {file} holds no classes")
        vectors = []
        for key in names:
            item = f[key]
            shape = getattr(item, "shape", None)
            if getattr(item, "dtype", None) is None or item.dtype.kind not in "fiu" \
                    or shape not in ((width,), (1, width)):
                raise DataError(f"{where}: {file} key {_preview(key)} holds {_describe(item)}; "
                                f"expected the class's text feature, a vector of width {width} "
                                "(the width of the sample features)")
            vector = np.asarray(item[()], dtype=np.float32).reshape(width)
            if not np.isfinite(vector).all():
                raise DataError(f"{where}: {file} key {_preview(key)} holds NaN or inf "
                                "(features must be finite)")
            vectors.append(vector)
    return names, torch.from_numpy(np.stack(vectors))


def load(name: str, cfg: CMCLConfig, resolved: Resolved) -> CMCLData:
    """Train and test datasets of ``cmcl/<name>`` with the modalities ``resolved`` names, and,
    for a labelled dataset, its class names, labels and class text features."""
    where = f"data.cmcl ({PREFIX}{name})"
    files = {split: path(cfg, name, split) for split in (*SPLITS, "class")}
    read = {split: read_split(files[split], split, resolved.naming, resolved.m, where)
            for split in SPLITS}
    width = next(iter(read["train"][2].values())).shape[1]
    test_width = next(iter(read["test"][2].values())).shape[1]
    if test_width != width:
        raise DataError(f"{where}: {files['test']} holds features of width {test_width} but "
                        f"{files['train']} of width {width}; one backbone gives one width")
    labelled = name in LABELLED or (name not in ROWS and files["class"].exists())
    class_names = class_features = None
    if labelled:
        class_names, class_features = read_classes(files["class"], width, where)
    digest = hashlib.sha256()
    for file in files.values():
        if file.exists():
            digest.update(file_stamp(file).encode())
    rows = ",".join(f"{r}{n}" for r, n in resolved.naming)
    fingerprint = f"cmcl-{name}-{cfg.backbone}-{digest.hexdigest()[:12]}-{rows}"

    def dataset(split: str) -> MultimodalDataset:
        ids, classes, columns = read[split]
        labels = None
        if class_names is not None:
            index = {c: i for i, c in enumerate(class_names)}
            for key_id, cls in zip(ids, classes, strict=True):
                if cls not in index:
                    raise DataError(
                        f"{where}: {files[split]} sample {_preview(key_id)}: class "
                        f"{_preview(cls)} is not one of the {len(index)} classes of "
                        f"{files['class']} (a key is {{id}}__{{class name}}__{{class index}})")
            labels = torch.tensor([index[c] for c in classes])
        return MultimodalDataset(f"{PREFIX}{name}", f"{fingerprint}/{split}", columns, labels,
                                 {"id": ids})

    return CMCLData(dataset("train"), dataset("test"), class_names, class_features)


def check_widths(name: str, cfg: CMCLConfig, data: CMCLData, modalities: tuple[str, ...],
                 dims: dict[str, int], where: str) -> None:
    """The files' feature width against ``model.modalities.<m>.dim`` of the modalities used
    (text too where the class features feed zero-shot prototypes)."""
    used = list(modalities)
    if data.class_features is not None and "text" in dims:
        used.append("text")
    for m in used:
        width = int(data.class_features.shape[1]) if m not in data.train.columns \
            else int(data.train.columns[m].shape[1])
        if m in dims and dims[m] != width:
            source = path(cfg, name, "train" if m in data.train.columns else "class")
            raise DataError(f"{where}: {source} holds features of width {width} (every key), but "
                            f"model.modalities.{m}.dim is {dims[m]}")
