"""Registers the SLU datasets ``fsc`` (a Fluent Speech Commands directory, or the synthesised
corpus, generated into the cache on first use) and ``slurp``."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import tempfile
from pathlib import Path

from comodal.config import DataConfig
from comodal.core.files import source_digest
from comodal.errors import ConfigError
from comodal.scenarios import synth_fsc
from comodal.scenarios.registry import DatasetSpec, Splits, register_dataset
from comodal.scenarios.slu import SlurpIntents, fsc_class_names, read_fsc, read_slurp

MODALITIES = ("audio", "text")


def synth_fsc_root(data: DataConfig, progress: bool = True) -> Path:
    """The synthesised corpus for ``data.fsc.synth`` under the cache, generated if missing
    (into a temporary directory renamed into place, so a killed generation leaves nothing)."""
    spec = data.fsc.synth
    key = json.dumps({"spec": dataclasses.asdict(spec), "source": source_digest(synth_fsc)},
                     sort_keys=True)
    root = Path(data.cache_dir) / "synth-fsc" / hashlib.sha256(key.encode()).hexdigest()[:12]
    if not (root / "synth_fsc.json").is_file():
        root.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=".tmp-"))
        try:
            synth_fsc.generate(tmp, spec, progress)
            if not (root / "synth_fsc.json").is_file():  # another process may have finished
                shutil.rmtree(root, ignore_errors=True)
                tmp.rename(root)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return root


def build_fsc(data: DataConfig, progress: bool) -> Splits:
    root = Path(data.fsc.root) if data.fsc.root else synth_fsc_root(data, progress)
    names = fsc_class_names()
    return Splits(read_fsc(root, "train", data.fsc.on_error),
                  read_fsc(root, "test", data.fsc.on_error),
                  class_names=names, class_texts=names)


def build_slurp(data: DataConfig, progress: bool) -> Splits:
    if not data.slurp.root:
        raise ConfigError("data.slurp.root: set it to your SLURP directory (with "
                          "train.jsonl, test.jsonl and the recordings under slurp_real/)")
    root = Path(data.slurp.root)
    intents = SlurpIntents.from_jsonl(root / "train.jsonl")
    read = [read_slurp(root, split, intents, data.slurp.audio_dir, data.slurp.on_error)
            for split in ("train", "test")]
    return Splits(*read, class_names=intents.names,
                  class_texts=[n.replace("_", " ") for n in intents.names],
                  class_groups=intents.scenarios)


register_dataset(DatasetSpec("fsc", MODALITIES, build_fsc))
register_dataset(DatasetSpec("slurp", MODALITIES, build_slurp))
