"""Shared fixtures: a tiny synth-pairs config and one cache directory for the whole session."""

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
