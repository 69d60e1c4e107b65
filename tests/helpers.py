"""Config helpers shared by the test modules (tiny configs as YAML files, class-incremental
variants of the tiny synth-pairs config, sequence-to-sequence SLU streams, a small SLURP)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile
import yaml

from comodal.build import check
from comodal.config import RunConfig, load_config
from comodal.errors import ConfigError
from comodal.strategies.base import Strategy


def load_dict(config: dict, directory: Path) -> RunConfig:
    """``config`` written as ``<directory>/config.yaml``, loaded and checked as a user's file
    would be."""
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    loaded = load_config(path)
    check(loaded)
    return loaded


def load_error(config: dict, directory: Path, override: str) -> str:
    """The ``ConfigError`` message of loading ``config`` with one ``--set`` override."""
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError) as err:
        load_config(path, [override])
    return str(err.value)


def class_incremental(tiny: dict) -> dict:
    """The tiny config as a class-incremental stream over synth-pairs/all: vision classified,
    captions as transcripts, 8 classes per task."""
    config = copy.deepcopy(tiny)
    config["model"]["modalities"] = {"vision": {"encoder": "image-stats"},
                                     "text": {"encoder": "hf"}}
    config["scenario"] = {"class_incremental": {"dataset": "synth-pairs/all",
                                                "modalities": ["vision", "text"],
                                                "increments": [8]}}
    return config


class Kill(Strategy):
    """Stops the run when task ``at`` is about to start (a simulated kill)."""

    name = "kill"
    kinds = ("pair", "classify", "sequence")

    def __init__(self, at: int | None) -> None:
        super().__init__()
        self.at = at

    def before_training_exp(self, strategy, **kwargs) -> None:  # noqa: ANN001
        if strategy.experience_index == self.at:
            raise KeyboardInterrupt


FSC_ORDER = [19, 27, 30, 28, 15, 4, 2, 9, 10, 22, 11, 7, 1, 25, 16, 14, 5, 8, 29, 12, 21, 17, 3,
             20, 23, 6, 18, 24, 26, 0, 13]  # the 10-task class order of Cappellazzo et al.


def sequence_stream(corpus: Path, data: dict) -> dict:
    """A sequence-to-sequence SLU config on the small synthesised corpus (``corpus``): three
    tasks of 11, 10 and 10 intents, a tiny conv encoder and decoder, one epoch per task;
    ``data`` holds the cache directory."""
    return {
        "seed": 0, "strategies": ["finetune"], "progress": False,
        "model": {"joint_dim": 32,
                  "modalities": {"audio": {"encoder": "conv", "dim": 32, "n_mels": 20,
                                           "max_seconds": 3.0}},
                  "decoder": {"dim": 32, "layers": 1, "heads": 2, "ffn": 64, "dropout": 0.0,
                              "vocab_size": 200, "max_length": 40, "beam_width": 2}},
        "data": {**data, "fsc": {"root": str(corpus)}},
        "scenario": {"class_incremental": {"dataset": "fsc", "modalities": ["audio"],
                                           "target": "sequence", "order": FSC_ORDER,
                                           "increments": [11, 10]}},
        "train": {"epochs": 1, "batch_size": 32, "lr": 0.002},
    }


def slurp_corpus(root: Path) -> Path:
    """Three scenarios, four intents, a FLAC recording per sentence."""
    (root / "slurp_real").mkdir(parents=True)
    g = np.random.default_rng(0)
    records = {"train": [], "test": []}
    intents = [("alarm_set", "alarm"), ("alarm_query", "alarm"), ("play_music", "play"),
               ("weather_query", "weather")]
    for split in records:
        for i in range(8):
            intent, scenario = intents[i % 4]
            name = f"{split}-{i}.flac"
            soundfile.write(root / "slurp_real" / name,
                            (0.1 * g.standard_normal(8000)).astype(np.float32), 16000)
            records[split].append({"slurp_id": i, "sentence": f"sentence {i}", "intent": intent,
                                   "scenario": scenario, "action": intent.split("_")[1],
                                   "sentence_annotation": f"[word : Sentence] {i}",
                                   "entities": [], "recordings": [{"file": name}]})
        (root / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in records[split]))
    return root
