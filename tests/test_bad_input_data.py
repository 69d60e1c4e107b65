"""Bad data entering the platform, tried as a hostile user would: every case is a named error
(class, file and row in the message), never a traceback or a silently corrupt result."""

from __future__ import annotations

import csv
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from helpers import class_incremental, load_dict
from safetensors.torch import save_file

from comodal.config import (
    ClassIncrementalConfig,
    FeaturesConfig,
    ModalityConfig,
    RunConfig,
    ScenarioConfig,
)
from comodal.errors import ConfigError, DataError
from comodal.platform.feature_cache import FeatureCache, prepare_dataset
from comodal.platform.modalities import Modality
from comodal.scenarios.features import load_features
from comodal.scenarios.registry import build_scenario
from comodal.scenarios.slu import read_fsc
from comodal.scenarios.synth_fsc import HEADER, INTENTS

ITEMS = 48  # features items: 24 classes, two of each; every fourth item is a test item


def _features(root: Path) -> FeaturesConfig:
    """An index of ``ITEMS`` labelled items, a vision ``.npy`` and a text ``.safetensors``."""
    rows = ["id,split,label"] + [f"a{i},{'test' if i % 4 == 0 else 'train'},{i % 24}"
                                 for i in range(ITEMS)]
    (root / "index.csv").write_text("\n".join(rows) + "\n")
    g = torch.Generator().manual_seed(0)
    np.save(root / "vision.npy", torch.randn(ITEMS, 8, generator=g).numpy())
    save_file({"embeddings": torch.randn(ITEMS, 8, generator=g)}, str(root / "text.safetensors"))
    return FeaturesConfig(index=str(root / "index.csv"),
                          modalities={"vision": str(root / "vision.npy"),
                                      "text": str(root / "text.safetensors")})


def _fsc(root: Path, rows: int = 6) -> Path:
    """An FSC directory with ``rows`` test utterances of 0.5 s noise, one intent each."""
    g = np.random.default_rng(0)
    lines = []
    for i in range(rows):
        path = f"wavs/speakers/s1/u{i}.wav"
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        soundfile.write(root / path, 0.1 * g.standard_normal(8000).astype(np.float32), 16000)
        lines.append([str(i), path, "s1", f"utterance {i}", *INTENTS[i]])
    (root / "data").mkdir()
    with (root / "data" / "test_data.csv").open("w", newline="") as f:
        csv.writer(f).writerows([HEADER, *lines])
    return root


def _class_incremental(root: Path, order: list[int]) -> Callable[[], object]:
    config = RunConfig(progress=False)
    config.data.features = {"mine": _features(root)}
    config.scenario = ScenarioConfig(class_incremental=ClassIncrementalConfig(
        dataset="features/mine", modalities=["vision"], increments=[4], order=order))
    return lambda: build_scenario(config)


def nan_in_npy(root: Path) -> Callable[[], object]:
    cfg = _features(root)
    array = np.load(root / "vision.npy")
    array[9, 3], array[30, 0] = np.nan, np.inf
    np.save(root / "vision.npy", array)
    return lambda: load_features("mine", cfg)


def inf_in_safetensors(root: Path) -> Callable[[], object]:
    cfg = _features(root)
    text = torch.ones(ITEMS, 8)
    text[5, 7] = -float("inf")
    save_file({"embeddings": text}, str(root / "text.safetensors"))
    return lambda: load_features("mine", cfg)


def empty_npy(root: Path) -> Callable[[], object]:
    cfg = _features(root)
    (root / "vision.npy").write_bytes(b"")
    return lambda: load_features("mine", cfg)


def truncated_npy(root: Path) -> Callable[[], object]:
    cfg = _features(root)
    (root / "vision.npy").write_bytes((root / "vision.npy").read_bytes()[:100])
    return lambda: load_features("mine", cfg)


def binary_index(root: Path) -> Callable[[], object]:
    cfg = _features(root)
    cfg.index = cfg.modalities["vision"]  # the .npy given as the index
    return lambda: load_features("mine", cfg)


def headerless_index(root: Path) -> Callable[[], object]:
    cfg = _features(root)
    (root / "index.csv").write_text('{"secret": "' + "x" * 5000 + '"}\n')
    return lambda: load_features("mine", cfg)


def directory_index(root: Path) -> Callable[[], object]:
    cfg = _features(root)
    cfg.index = str(root)
    return lambda: load_features("mine", cfg)


def short_wav(samples: int) -> Callable[[Path], Callable[[], object]]:
    def make(root: Path) -> Callable[[], object]:
        _fsc(root)
        soundfile.write(root / "wavs/speakers/s1/u2.wav", np.ones(samples, np.float32), 16000)
        return lambda: read_fsc(root, "test")
    return make


def nan_wav(root: Path) -> Callable[[], object]:
    _fsc(root)
    wave = np.full(8000, 0.1, np.float32)
    wave[100] = np.nan
    soundfile.write(root / "wavs/speakers/s1/u2.wav", wave, 16000, subtype="FLOAT")
    audio = Modality("audio", ModalityConfig(encoder="logmel-stats"))
    return lambda: prepare_dataset(read_fsc(root, "test"), "test", {"audio": audio},
                                   FeatureCache(root / "cache", progress=False))


CASES = [
    ("nan-in-npy", nan_in_npy, DataError,
     ["vision.npy row 9", "id 'a9'", "index.csv line 11", "NaN or inf", "2 of 48 rows"]),
    ("inf-in-safetensors", inf_in_safetensors, DataError,
     ["text.safetensors row 5", "id 'a5'", "line 7", "NaN or inf"]),
    ("empty-npy", empty_npy, DataError, ["vision.npy", "is empty (0 bytes)"]),
    ("truncated-npy", truncated_npy, DataError, ["vision.npy", "not a readable .npy array"]),
    ("binary-index", binary_index, DataError,
     ["vision.npy", "is not a CSV text file", "'id,split[,label]'"]),
    ("directory-index", directory_index, DataError, ["index file", "is not a regular file"]),
    ("headerless-index", headerless_index, DataError,
     ["index.csv", "has no column 'id'", "'id,split[,label]'", "xxx'..."]),
    ("1-sample-wav", short_wav(1), DataError,
     ["test_data.csv row 4", "u2.wav lasts 1 samples", "at least 0.1 s"]),
    ("8-sample-wav", short_wav(8), DataError,
     ["test_data.csv row 4", "u2.wav lasts 8 samples", "at least 0.1 s"]),
    ("nan-wav", nan_wav, DataError,
     ["test_data.csv row 4", "u2.wav holds NaN or inf samples"]),
    ("order-names-20-of-24", lambda root: _class_incremental(root, list(range(2, 22))),
     ConfigError, ["class_incremental.order", "names 20 of the dataset's 24 classes",
                   "name every class (missing: 0, 1, 22, 23)"]),
    ("order-repeats-a-class", lambda root: _class_incremental(root, [*range(24), 5]),
     ConfigError, ["class_incremental.order", "class 5 is listed 2 times"]),
]


@pytest.mark.parametrize(("make", "error", "fragments"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_bad_input_is_a_named_error(tmp_path: Path, make: Callable, error: type,
                                    fragments: list[str]) -> None:
    trigger = make(tmp_path)
    with pytest.raises(error) as caught:
        trigger()
    message = str(caught.value)
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    assert len(message) < 400  # never a whole file echoed back


@pytest.mark.parametrize("samples", [1, 8])
def test_skip_drops_a_too_short_wav(tmp_path: Path, samples: int,
                                    capsys: pytest.CaptureFixture) -> None:
    short_wav(samples)(tmp_path)
    data = read_fsc(tmp_path, "test", on_error="skip")
    assert len(data) == 5 and "u2.wav" not in " ".join(data.meta["path"])
    assert "skipped 1 rows" in capsys.readouterr().err


def test_a_subset_order_is_used_only_when_asked_for_and_said(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from comodal.scenarios.registry import class_groups

    assert class_groups(6, [2], [5, 0, 3, 1], subset=True) == [[5, 0], [3, 1]]
    assert "using 4 of 6 classes, in the order 5, 0, 3, 1; left out: 2, 4" in \
        capsys.readouterr().err


def test_the_subset_option_of_a_config_keeps_only_the_ordered_classes(
        tiny: dict, tmp_path: Path) -> None:
    config = class_incremental(tiny)
    config["scenario"]["class_incremental"].update(order=list(range(20)), increments=[10])
    with pytest.raises(ConfigError, match="missing: 20, 21, 22, 23"):
        build_scenario(load_dict(config, tmp_path))
    config["scenario"]["class_incremental"]["subset"] = True
    scenario = build_scenario(load_dict(config, tmp_path))
    assert [t.classes for t in scenario.tasks] == [list(range(10)), list(range(10, 20))]
    assert all(int(t.test.labels.max()) < 20 for t in scenario.tasks)
