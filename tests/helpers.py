"""Config helpers shared by the test modules (tiny configs as YAML files, class-incremental
variants of the tiny synth-pairs config)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
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

    def __init__(self, at: int | None) -> None:
        super().__init__()
        self.at = at

    def before_training_exp(self, strategy, **kwargs) -> None:  # noqa: ANN001
        if strategy.experience_index == self.at:
            raise KeyboardInterrupt
