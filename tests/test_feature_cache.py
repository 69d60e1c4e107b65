"""Frozen backbones run once per (dataset, split, modality, backbone); changes invalidate;
a broken or unwritable cache is said and worked around; shared parents are prepared once."""

from __future__ import annotations

import errno
import gc
from pathlib import Path

import pytest
import torch

from comodal.config import ModalityConfig
from comodal.core.data import MultimodalDataset
from comodal.errors import DataError
from comodal.platform.feature_cache import FeatureCache, prepare_dataset
from comodal.platform.modalities import Modality
from comodal.scenarios.registry import Splits, class_incremental


class CountingBackbone:
    """A frozen backbone that counts how often it runs."""

    def __init__(self, scale: float = 1.0) -> None:
        self.calls, self.scale, self.out_dim = 0, scale, 2

    def fingerprint(self) -> dict:
        return {"extractor": "counting/1", "scale": self.scale}

    def __call__(self, waves: dict) -> torch.Tensor:
        self.calls += 1
        wave = waves["wave"]
        return torch.stack([wave.mean(1), wave.std(1)], 1) * self.scale


def _audio_dataset(fingerprint: str = "fixture-v1") -> MultimodalDataset:
    g = torch.Generator().manual_seed(0)
    waves = [(torch.randn(800, generator=g), 16000) for _ in range(10)]
    return MultimodalDataset("fixture", fingerprint, {"audio": waves})


def _modality(backbone: CountingBackbone, **cfg: object) -> Modality:
    modality = Modality("audio", ModalityConfig(encoder="logmel-stats", **cfg))
    modality.frozen = backbone
    return modality


def test_backbone_runs_once_and_the_cache_is_reused(tmp_path: Path) -> None:
    backbone = CountingBackbone()
    modality = _modality(backbone)
    cache = FeatureCache(tmp_path, batch_size=4, progress=False)
    first = prepare_dataset(_audio_dataset(), "train", {"audio": modality}, cache)
    calls = backbone.calls
    assert calls == 3  # 10 rows in batches of 4
    # a new cache object over the same directory, as in a second run
    again = FeatureCache(tmp_path, batch_size=4, progress=False)
    second = prepare_dataset(_audio_dataset(), "train", {"audio": modality}, again)
    assert backbone.calls == calls
    assert again.hits == 1 and again.misses == 0
    assert torch.equal(first.columns["audio"], second.columns["audio"])


def test_changing_the_backbone_preprocessing_or_data_invalidates(tmp_path: Path) -> None:
    cache = FeatureCache(tmp_path, progress=False)
    base = prepare_dataset(_audio_dataset(), "train",
                           {"audio": _modality(CountingBackbone())}, cache)
    changed_backbone = CountingBackbone(scale=2.0)
    out = prepare_dataset(_audio_dataset(), "train", {"audio": _modality(changed_backbone)},
                          cache)
    assert changed_backbone.calls == 1
    assert torch.allclose(out.columns["audio"], 2 * base.columns["audio"])
    for dataset, split in ((_audio_dataset("fixture-v2"), "train"), (_audio_dataset(), "test")):
        backbone = CountingBackbone()
        prepare_dataset(dataset, split, {"audio": _modality(backbone)}, cache)
        assert backbone.calls == 1
    assert cache.misses == 4 and cache.hits == 0


def test_real_extractor_keys_on_its_preprocessing(tmp_path: Path) -> None:
    cache = FeatureCache(tmp_path, progress=False)
    forty = Modality("audio", ModalityConfig(encoder="logmel-stats", n_mels=40))
    twenty = Modality("audio", ModalityConfig(encoder="logmel-stats", n_mels=20))
    a = prepare_dataset(_audio_dataset(), "train", {"audio": forty}, cache)
    b = prepare_dataset(_audio_dataset(), "train", {"audio": twenty}, cache)
    assert a.columns["audio"].shape == (10, forty.out_dim)
    assert b.columns["audio"].shape == (10, twenty.out_dim)
    assert cache.misses == 2
    prepare_dataset(_audio_dataset(), "train", {"audio": forty}, cache)
    assert cache.hits == 1


def test_cache_files_record_what_made_them(tmp_path: Path) -> None:
    cache = FeatureCache(tmp_path, progress=False)
    prepare_dataset(_audio_dataset(), "train", {"audio": _modality(CountingBackbone())}, cache)
    (meta,) = (tmp_path / "features").glob("*.json")
    assert '"counting/1"' in meta.read_text() and '"fixture-v1"' in meta.read_text()
    assert not list((tmp_path / "features").glob(".*tmp"))  # no half-written files left


def test_a_truncated_entry_is_named_and_computed_again(tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    modality = _modality(CountingBackbone())
    first = prepare_dataset(_audio_dataset(), "train", {"audio": modality},
                            FeatureCache(tmp_path, progress=False))
    (entry,) = (tmp_path / "features").glob("*.pt")
    entry.write_bytes(entry.read_bytes()[:100])
    cache = FeatureCache(tmp_path, progress=False)
    again = prepare_dataset(_audio_dataset(), "train", {"audio": modality}, cache)
    assert f"feature cache entry {entry} is unreadable" in capsys.readouterr().err
    assert cache.misses == 1 and torch.equal(again.columns["audio"], first.columns["audio"])
    assert torch.equal(torch.load(entry, weights_only=True), first.columns["audio"])  # replaced


def test_an_unwritable_cache_computes_without_storing(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture) -> None:
    def refuse(obj: object, path: Path) -> None:  # a read-only directory (tests may run as root)
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr("comodal.platform.feature_cache.atomic_torch_save", refuse)
    backbone = CountingBackbone()
    cache = FeatureCache(tmp_path, batch_size=4, progress=False)
    out = prepare_dataset(_audio_dataset(), "train", {"audio": _modality(backbone)}, cache)
    assert out.columns["audio"].shape == (10, 2) and backbone.calls == 3
    assert f"cannot write the feature cache {tmp_path / 'features'} (Permission denied)" in \
        capsys.readouterr().err
    assert not list(tmp_path.rglob("*.pt"))


def test_non_finite_backbone_output_is_named_by_dataset_and_row(tmp_path: Path) -> None:
    modality = _modality(CountingBackbone(scale=float("nan")))
    with pytest.raises(DataError, match=r"dataset 'fixture' \(train\) row 0: the frozen audio "
                                        r"backbone \(counting/1\) gives NaN or inf features"):
        prepare_dataset(_audio_dataset(), "train", {"audio": modality},
                        FeatureCache(tmp_path, progress=False))
    assert not list(tmp_path.rglob("*.pt"))


def test_class_incremental_tasks_preprocess_their_parent_once(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    parent = MultimodalDataset("parent", "parent-v1",
                               {"audio": [(torch.randn(1600, generator=g), 16000)
                                          for _ in range(12)]},
                               labels=torch.arange(12) % 6)
    scenario = class_incremental(Splits(parent, parent, [f"c{i}" for i in range(6)]), "parent",
                                 ("audio",), [2])
    audio = Modality("audio", ModalityConfig(encoder="conv"))  # trainable: preprocessed rows
    calls = []
    preprocess = audio.preprocess
    audio.preprocess = lambda value, where: calls.append(where) or preprocess(value, where)
    cache = FeatureCache(tmp_path, progress=False)
    prepared = [prepare_dataset(task.train, "train", {"audio": audio}, cache)
                for task in scenario.tasks]
    assert len(scenario) == 3 and len(calls) == len(parent) == 12  # not 3 tasks x 12 rows
    assert [len(p) for p in prepared] == [4, 4, 4]
    assert torch.equal(prepared[1].columns["audio"][0], preprocess(parent[2]["audio"], ""))
    del scenario, parent, prepared
    gc.collect()
    assert not cache.parents  # the shared preparation lives as long as its dataset
