"""CMCL feature files (the authors' HDF5 layout) and modalities of any name: tiny files in that
layout run a two-task stream end to end, every malformed file is a named error, and a modality
without built-in encoders (depth) trains on its own features and refuses a raw encoder."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest
from helpers import load_dict

from comodal.config import ModalityConfig, load_config
from comodal.errors import ConfigError, DataError
from comodal.platform.modalities import Modality
from comodal.platform.run import run
from comodal.scenarios.registry import build_scenario

D = 16
NYU_CLASSES = ["bathroom", "bedroom", "kitchen", "office"]
ESC_CLASSES = ["dog", "rain", "siren"]


def _write(path: Path, items: dict[str, np.ndarray]) -> None:
    """One HDF5 dataset per key, as the authors' ``FeatureStorage.save_features``."""
    with h5py.File(path, "w") as f:
        for key, value in items.items():
            f.create_dataset(key, data=value)


def _dataset(root: Path, name: str, rows: int, classes: list[str], seed: int,
             train: int = 36, test: int = 18) -> None:
    """``{name}_{train,test}_imagebind.h5`` with keys ``{id}__{class}__{index}`` and [rows, D]
    arrays (each row a noisy map of the sample's latent plus its class's direction), and
    ``{name}_class_imagebind.h5`` with each class's text feature."""
    g = np.random.default_rng(seed)
    protos = g.standard_normal((len(classes), D)).astype(np.float32)
    maps = g.standard_normal((rows, D, D)).astype(np.float32) / 4
    for split, n in (("train", train), ("test", test)):
        items = {}
        for i in range(n):
            c = i % len(classes)
            z = g.standard_normal(D).astype(np.float32) + protos[c]
            value = np.stack([z @ maps[r] + 0.1 * g.standard_normal(D) for r in range(rows)])
            items[f"{split}{i:03d}__{classes[c]}__{c}"] = value.astype(np.float32)
        _write(root / f"{name}_{split}_imagebind.h5", items)
    _write(root / f"{name}_class_imagebind.h5", {c: protos[i] for i, c in enumerate(classes)})


@pytest.fixture()
def files(tmp_path: Path) -> Path:
    """An nyudv2-like (vision, text, depth) and an esc50-like (text, audio) dataset."""
    root = tmp_path / "features_storage"
    root.mkdir()
    _dataset(root, "nyudv2", 3, NYU_CLASSES, seed=0)
    _dataset(root, "esc50", 2, ESC_CLASSES, seed=1)
    return root


def _config(root: Path, tmp_path: Path) -> dict:
    """Two tasks, one per task form: nyudv2 vision-depth by name, esc50 text-audio by rows."""
    return {
        "seed": 0, "progress": False, "strategies": ["finetune"],
        "data": {"cache_dir": str(tmp_path / "cache"),
                 "cmcl": {"root": str(root), "backbone": "imagebind"}},
        "model": {"joint_dim": D, "modalities": {m: {"encoder": "features", "dim": D}
                                                 for m in ("vision", "text", "audio", "depth")}},
        "scenario": {"tasks": [{"dataset": "cmcl/nyudv2", "modalities": ["vision", "depth"]},
                               {"dataset": "cmcl/esc50:0,1"}]},
        "train": {"epochs": 6, "batch_size": 16, "lr": 0.02},
        "eval": {"pool_size": 1000, "pool_draws": 1},
    }


def test_a_two_task_cmcl_stream_runs_end_to_end(files: Path, tmp_path: Path) -> None:
    config = load_dict(_config(files, tmp_path), tmp_path)
    scenario = build_scenario(config)
    first, second = scenario.tasks
    assert scenario.task_names == ["1:nyudv2:vision-depth", "2:esc50:text-audio"]
    assert first.class_names == NYU_CLASSES and second.class_names == ESC_CLASSES
    assert set(first.train.columns) == {"vision", "text", "depth"}
    assert len(first.train) == 36 and len(first.test) == 18
    assert first.train.meta["id"][:2] == ["train000", "train001"]
    assert first.train.labels[:5].tolist() == [0, 1, 2, 3, 0]  # sorted class names
    assert first.class_features.shape == (4, D) and second.class_features.shape == (3, D)

    result = run(config)
    for metric in ("recall@1", "zeroshot"):
        matrix = result.matrices[metric]
        assert matrix.shape == (3, 2) and bool(matrix.isfinite().all()), metric
    r1 = result.matrices["recall@1"]
    assert float(r1[1, 0]) > 0.3 and float(r1[2, 1]) > 0.3 > float(r1[0, 1])  # 18 candidates
    # audio against the text head's image of the stored class features, above 1/3 chance
    assert float(result.matrices["zeroshot"][0, 1]) > 0.45


def test_the_task_forms_name_the_same_rows(files: Path, tmp_path: Path) -> None:
    config = _config(files, tmp_path)
    config["scenario"]["tasks"] = [
        {"dataset": "cmcl/nyudv2:0,2"},                                     # rows
        {"dataset": "cmcl/nyudv2:2,0", "modalities": ["depth", "vision"]},  # rows and names
        {"dataset": "cmcl/esc50"},                                          # rows 0, 1
        {"dataset": "cmcl/mine:1,0", "modalities": ["audio", "thermal"]},   # undeclared data
    ]
    config["model"]["modalities"]["thermal"] = {"encoder": "features", "dim": D}
    (files / "mine_train_imagebind.h5").write_bytes((files / "esc50_train_imagebind.h5")
                                                    .read_bytes())
    (files / "mine_test_imagebind.h5").write_bytes((files / "esc50_test_imagebind.h5")
                                                   .read_bytes())
    tasks = build_scenario(load_dict(config, tmp_path)).tasks
    assert [t.modalities for t in tasks] == [("vision", "depth"), ("depth", "vision"),
                                            ("text", "audio"), ("audio", "thermal")]
    assert (tasks[3].train.columns["thermal"] == tasks[2].train.columns["text"]).all()
    assert tasks[3].class_features is None and tasks[3].train.labels is None  # no class file

    config["scenario"]["tasks"] = [{"dataset": "cmcl/mine", "modalities": ["text", "thermal"]}]
    config["data"]["cmcl"]["modalities"] = {"mine": ["text", "thermal"]}  # declared rows
    (task,) = build_scenario(load_dict(config, tmp_path)).tasks
    assert task.modalities == ("text", "thermal")


def test_a_labelled_cmcl_dataset_feeds_a_class_incremental_stream(files: Path,
                                                                  tmp_path: Path) -> None:
    config = _config(files, tmp_path)
    config["scenario"] = {"class_incremental": {"dataset": "cmcl/nyudv2",
                                                "modalities": ["depth"], "increments": [2]}}
    tasks = build_scenario(load_dict(config, tmp_path)).tasks
    assert [t.classes for t in tasks] == [[0, 1], [2, 3]]
    assert all(t.class_features.shape == (4, D) for t in tasks)


def _h5_edit(path: Path, edit: Callable[[h5py.File], None]) -> None:
    with h5py.File(path, "a") as f:
        edit(f)


def _bad_key(shape: tuple[int, ...], key: str = "train999__kitchen__2") -> Callable:
    return lambda f: f.create_dataset(key, data=np.ones(shape, np.float32))


def _nan_depth(f: h5py.File) -> None:
    value = f["train005__bedroom__1"][()]
    value[2, 3] = np.nan
    del f["train005__bedroom__1"]
    f.create_dataset("train005__bedroom__1", data=value)


def _empty(path: Path) -> None:
    with h5py.File(path, "w"):
        pass


NYU_TRAIN, NYU_TEST = "nyudv2_train_imagebind.h5", "nyudv2_test_imagebind.h5"
NYU_CLASS = "nyudv2_class_imagebind.h5"
DATA_CASES = [
    ("missing-file", lambda root: (root / "esc50_test_imagebind.h5").unlink(),
     ["esc50_test_imagebind.h5", "does not exist"]),
    ("missing-class-file", lambda root: (root / NYU_CLASS).unlink(),
     [NYU_CLASS, "class file", "does not exist"]),
    ("not-hdf5", lambda root: (root / NYU_TEST).write_text("id,split\n"),
     [NYU_TEST, "is not a readable HDF5 file"]),
    ("wrong-m", lambda root: _h5_edit(root / NYU_TRAIN, _bad_key((2, D))),
     [NYU_TRAIN, "key 'train999__kitchen__2'", "shape [2, 16]",
      "M = 3 (0 vision, 1 text, 2 depth)"]),
    ("not-2d", lambda root: _h5_edit(root / NYU_TRAIN, _bad_key((3 * D,))),
     [NYU_TRAIN, "key 'train999__kitchen__2'", "shape [48]", "[M, d] array"]),
    ("other-width", lambda root: _h5_edit(root / NYU_TRAIN, _bad_key((3, 8))),
     [NYU_TRAIN, "key 'train999__kitchen__2' has shape [3, 8]",
      "key 'train000__bathroom__0' has [3, 16]", "one width"]),
    ("nan", lambda root: _h5_edit(root / NYU_TRAIN, _nan_depth),
     [NYU_TRAIN, "key 'train005__bedroom__1'", "NaN or inf in row 2 (depth)", "1 of 36"]),
    ("empty-split", lambda root: _empty(root / NYU_TEST),
     [NYU_TEST, "holds no samples", "test split is empty"]),
    ("class-not-in-class-file", lambda root: _h5_edit(root / NYU_TRAIN,
                                                      _bad_key((3, D), "train999__garage__4")),
     [NYU_TRAIN, "'train999'", "class 'garage' is not one of the 4 classes", NYU_CLASS]),
    ("duplicate-id", lambda root: _h5_edit(root / NYU_TRAIN,
                                           _bad_key((3, D), "train001__office__3")),
     [NYU_TRAIN, "keys 'train001__bedroom__1' and 'train001__office__3'",
      "one sample id 'train001'"]),
    ("class-feature-width", lambda root: _h5_edit(
        root / NYU_CLASS, lambda f: (f.__delitem__("office"),
                                     f.create_dataset("office", data=np.ones(8, np.float32)))),
     [NYU_CLASS, "key 'office'", "shape [8]", "vector of width 16"]),
]


@pytest.mark.parametrize(("make", "fragments"), [c[1:] for c in DATA_CASES],
                         ids=[c[0] for c in DATA_CASES])
def test_a_file_off_the_layout_is_a_named_error(files: Path, tmp_path: Path, make: Callable,
                                                fragments: list[str]) -> None:
    config = load_dict(_config(files, tmp_path), tmp_path)
    make(files)
    with pytest.raises(DataError) as caught:
        build_scenario(config)
    message = str(caught.value)
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    assert len(message) < 500


def test_a_width_other_than_the_models_names_the_file(files: Path, tmp_path: Path) -> None:
    config = _config(files, tmp_path)
    config["model"]["modalities"]["depth"]["dim"] = 8
    with pytest.raises(DataError, match=rf"{NYU_TRAIN} holds features of width 16 .*"
                                        r"model.modalities.depth.dim is 8"):
        build_scenario(load_dict(config, tmp_path))


def _edit(change: Callable[[dict], None]) -> Callable[[dict], dict]:
    def apply(config: dict) -> dict:
        config = copy.deepcopy(config)
        change(config)
        return config
    return apply


def _task(**task: object) -> Callable[[dict], None]:
    return lambda c: c["scenario"].update(tasks=[task])


CONFIG_CASES = [
    ("raw-encoder-for-depth",
     lambda c: c["model"]["modalities"].update(depth={"encoder": "conv"}),
     ["model.modalities.depth.encoder", "'conv'", "needs precomputed features",
      "encoder: features"]),
    ("not-a-name", lambda c: c["model"]["modalities"].update({"my-depth": {"encoder": "features"}}),
     ["model.modalities", "'my-depth' is not a name", "letters, digits and _"]),
    ("reserved-name", lambda c: c["model"]["modalities"].update(label={"encoder": "features"}),
     ["'label' is reserved"]),
    ("no-root", lambda c: c["data"]["cmcl"].update(root=None),
     ["scenario.tasks[0].dataset", "'cmcl/nyudv2'", "set data.cmcl.root"]),
    ("row-out-of-range", _task(dataset="cmcl/nyudv2:0,5"),
     ["scenario.tasks[0].dataset", "row 5 is not a row of cmcl/nyudv2's features",
      "0 vision, 1 text, 2 depth"]),
    ("bad-row-syntax", _task(dataset="cmcl/nyudv2:0,x"),
     ["scenario.tasks[0].dataset", "two different row indices"]),
    ("rows-and-names-disagree", _task(dataset="cmcl/nyudv2:0,1", modalities=["vision", "depth"]),
     ["scenario.tasks[0].modalities", "are not rows 0,1", "vision, text"]),
    ("modality-not-in-dataset", _task(dataset="cmcl/esc50", modalities=["text", "vision"]),
     ["dataset 'cmcl/esc50' has no modality 'vision'", "it has: text, audio"]),
    ("undeclared-dataset", _task(dataset="cmcl/mine", modalities=["text", "audio"]),
     ["'cmcl/mine' is not one of the CMCL datasets", "data.cmcl.modalities.mine"]),
    ("rows-on-another-dataset", _task(dataset="synth-pairs/toys:0,1"),
     ["scenario.tasks[0].dataset", "row indices (:i,j) pick rows of CMCL feature files"]),
    ("raw-encoder-on-cmcl-rows",
     lambda c: c["model"]["modalities"].update(vision={"encoder": "image-stats"}),
     ["model.modalities.vision.encoder", "cmcl/nyudv2 holds precomputed vision features",
      "not 'image-stats'"]),
]


@pytest.mark.parametrize(("change", "fragments"), [c[1:] for c in CONFIG_CASES],
                         ids=[c[0] for c in CONFIG_CASES])
def test_a_config_mistake_is_a_named_error(files: Path, tmp_path: Path, change: Callable,
                                           fragments: list[str]) -> None:
    with pytest.raises(ConfigError) as caught:
        load_dict(_edit(change)(_config(files, tmp_path)), tmp_path)
    for fragment in fragments:
        assert fragment in str(caught.value), (fragment, str(caught.value))


def test_a_raw_encoder_is_refused_for_depth_when_the_modality_is_built() -> None:
    with pytest.raises(ConfigError, match="'hf' cannot encode 'depth'.*needs precomputed"):
        Modality("depth", ModalityConfig(encoder="hf"))
    assert Modality("depth", ModalityConfig(encoder="features", dim=5)).out_dim == 5


def test_own_features_with_a_depth_modality_train(tmp_path: Path) -> None:
    g = np.random.default_rng(0)
    rows = ["id,split"] + [f"s{i},{'test' if i % 3 == 0 else 'train'}" for i in range(60)]
    (tmp_path / "index.csv").write_text("\n".join(rows) + "\n")
    latent = g.standard_normal((60, 8)).astype(np.float32)
    np.save(tmp_path / "depth.npy", latent @ g.standard_normal((8, 8)).astype(np.float32))
    np.save(tmp_path / "vision.npy", latent @ g.standard_normal((8, 8)).astype(np.float32))
    config = load_dict({
        "progress": False,
        "data": {"cache_dir": str(tmp_path / "cache"), "features": {"room": {
            "index": str(tmp_path / "index.csv"),
            "modalities": {"vision": str(tmp_path / "vision.npy"),
                           "depth": str(tmp_path / "depth.npy")}}}},
        "model": {"joint_dim": 8, "modalities": {"vision": {"encoder": "features", "dim": 8},
                                                 "depth": {"encoder": "features", "dim": 8}}},
        "scenario": {"tasks": [{"dataset": "features/room", "modalities": ["depth", "vision"]}]},
        "train": {"epochs": 12, "batch_size": 20, "lr": 0.03},
        "eval": {"pool_draws": 1},
    }, tmp_path)
    result = run(config)
    r1 = result.matrices["recall@1"]
    assert r1.shape == (2, 1) and float(r1[1, 0]) > 0.3 > float(r1[0, 0])  # 20 candidates


PAPER_ROWS = {"ucf101": 2, "esc50": 2, "nyudv2": 3, "clotho": 2, "vggsound_s": 3, "tvl": 3,
              "llvip": 2}


def test_the_paper_preset_runs_its_eleven_tasks_on_files_in_the_authors_layout(
        tmp_path: Path) -> None:
    """``examples/cmcl_paper.yaml`` as a user with the authors' features runs it (tiny files,
    16 wide, one epoch): eleven tasks over seven datasets and seven modalities, scored by
    raw dot products through identity heads with a bias, as the preset says."""
    root = tmp_path / "features_storage"
    root.mkdir()
    for seed, (name, rows) in enumerate(PAPER_ROWS.items()):
        _dataset(root, name, rows, NYU_CLASSES, seed=seed, train=24, test=12)
    preset = Path(__file__).resolve().parents[1] / "examples" / "cmcl_paper.yaml"
    dims = [f"model.modalities.{m}.dim={D}"
            for m in ("vision", "text", "audio", "thermal", "depth", "video", "touch")]
    config = load_config(preset, [f"data.cmcl.root={root}", f"data.cache_dir={tmp_path}/c",
                                  f"model.joint_dim={D}", "train.epochs=1", "progress=false",
                                  f"out={tmp_path}/run", *dims])
    result = run(config)
    pairs = [name.split(":")[-1] for name in result.task_names]
    assert pairs == ["text-video", "text-audio", "vision-depth", "text-audio", "text-audio",
                     "text-video", "audio-video", "vision-touch", "text-touch", "vision-text",
                     "vision-thermal"]
    r1 = result.matrices["recall@1"]
    assert r1.shape == (12, 11) and bool(r1.isfinite().all())
    saved = (tmp_path / "run" / "config.yaml").read_text()
    for field in ("score: dot", "head_bias: true", "head_init: identity", "clip_grad_norm: 1.0",
                  "symmetric: false", "name: linear", "preset: paper"):
        assert field in saved
