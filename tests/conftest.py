"""Shared fixtures: a tiny synth-pairs config, one cache directory and one small synthesised
spoken-commands corpus for the whole session."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("comodal-cache")


@pytest.fixture(scope="session")
def tiny_template(cache_dir: Path) -> dict:
    """The default example scenario, shrunk: small splits, few epochs, no progress bars."""
    config = yaml.safe_load((ROOT / "examples" / "synth_pairs.yaml").read_text())
    config["data"] = {"cache_dir": str(cache_dir),
                      "synth_pairs": {"seed": 0, "train_size": 300, "test_size": 120}}
    config["train"]["epochs"] = 4
    config["progress"] = False
    return config


@pytest.fixture()
def tiny(tiny_template: dict) -> dict:
    return copy.deepcopy(tiny_template)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthesised spoken-commands corpus (FSC's layout): 2 train, 1 valid and 1 test
    speaker, made once per session (about a minute of speech synthesis)."""
    from comodal.config import SynthFSCConfig
    from comodal.scenarios.synth_fsc import generate

    return generate(tmp_path_factory.mktemp("fsc") / "corpus",
                    SynthFSCConfig(seed=3, train_speakers=2, valid_speakers=1, test_speakers=1),
                    progress=False)
