"""Each config mistake gets one message naming the field, the bad value and the valid choices,
before any data is generated, and a non-zero exit from the CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from comodal.build import check
from comodal.cli import main
from comodal.config import ConfigError, from_dict, load_config


def _check(config: dict, *fragments: str) -> None:
    from comodal.config import RunConfig

    with pytest.raises(ConfigError) as err:
        check(from_dict(RunConfig, config))
    for fragment in fragments:
        assert fragment in str(err.value)


def test_unknown_key_names_the_valid_keys(tiny: dict) -> None:
    tiny["train"]["epoch"] = 3
    _check(tiny, "train: unknown key 'epoch'", "epochs", "batch_size")


def test_unknown_top_level_key(tiny: dict) -> None:
    tiny["strategy"] = ["finetune"]
    _check(tiny, "unknown key 'strategy'", "strategies")


def test_unknown_strategy(tiny: dict) -> None:
    tiny["strategies"] = ["finetune", "magic"]
    _check(tiny, "strategies[1]", "'magic'", "finetune", "joint")


def test_a_modality_without_built_in_encoders_needs_features(tiny: dict) -> None:
    tiny["model"]["modalities"]["smell"] = {"encoder": "conv"}
    _check(tiny, "model.modalities.smell.encoder", "'conv'", "audio, text, vision only",
           "'smell' needs precomputed features")
    tiny["model"]["modalities"]["smell"] = {"encoder": "features", "frozen": False}
    _check(tiny, "model.modalities.smell.frozen", "'smell' has no trainable encoder")
    tiny["model"]["modalities"]["smell!"] = tiny["model"]["modalities"].pop("smell")
    _check(tiny, "model.modalities", "'smell!' is not a name")


def test_unknown_encoder(tiny: dict) -> None:
    tiny["model"]["modalities"]["audio"]["encoder"] = "wav2vec"
    _check(tiny, "model.modalities.audio.encoder", "'wav2vec'", "logmel-stats", "conv")


def test_unknown_dataset(tiny: dict) -> None:
    tiny["scenario"]["tasks"][1]["dataset"] = "synth-pairs/space"
    _check(tiny, "scenario.tasks[1].dataset", "'synth-pairs/space'", "synth-pairs/toys")


def test_pair_naming_a_modality_the_dataset_lacks(
    tiny: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    from comodal.scenarios import registry

    registry.dataset_names()  # load the built-in datasets before adding a fake one
    spec = registry.DatasetSpec("test/text-only", ("text", "vision"), lambda d, p: None)
    monkeypatch.setitem(registry._DATASETS, spec.name, spec)
    tiny["scenario"]["tasks"][0] = {"dataset": "test/text-only", "modalities": ["audio", "text"]}
    _check(tiny, "scenario.tasks[0].modalities", "'test/text-only' has no modality 'audio'",
           "text, vision")


def test_pair_naming_an_unconfigured_modality(tiny: dict) -> None:
    del tiny["model"]["modalities"]["audio"]
    _check(tiny, "scenario.tasks[1].modalities", "'audio' is not configured")


def test_pair_must_name_two_modalities(tiny: dict) -> None:
    tiny["scenario"]["tasks"][0]["modalities"] = ["vision"]
    _check(tiny, "scenario.tasks[0].modalities", "two different modalities")


@pytest.mark.parametrize(
    ("path", "value", "fragment"),
    [
        (("train", "epochs"), "ten", "train.epochs: expected int, got 'ten'"),
        (("train", "lr"), "fast", "train.lr: expected float, got 'fast'"),
        (("eval", "ks"), 5, "eval.ks: expected a list, got 5"),
        (("model", "learnable_temperature"), "yes", "expected bool"),
        (("train", "batch_size"), 0, "train.batch_size: must be at least 1"),
    ],
)
def test_wrong_types_and_values(tiny: dict, path: tuple, value: object, fragment: str) -> None:
    tiny[path[0]][path[1]] = value
    _check(tiny, fragment)


def test_overrides_are_validated_too(tmp_path: Path, tiny: dict) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tiny))
    assert load_config(path, ["train.epochs=2"]).train.epochs == 2
    with pytest.raises(ConfigError, match="train: unknown key 'epoks'"):
        load_config(path, ["train.epoks=2"])


def test_cli_exits_non_zero_before_generating_data(
    tmp_path: Path, tiny: dict, capsys: pytest.CaptureFixture
) -> None:
    cache = tmp_path / "fresh-cache"
    tiny["data"]["cache_dir"] = str(cache)
    tiny["strategies"] = ["nope"]
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(tiny))
    assert main(["run", str(path), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "unknown strategy 'nope'" in err and err.count("\n") == 1
    assert not cache.exists() and not (tmp_path / "run").exists()


def test_missing_config_file(capsys: pytest.CaptureFixture) -> None:
    assert main(["run", "does/not/exist.yaml"]) == 2
    assert "does/not/exist.yaml" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("model.temperature=0", "model.temperature: must be positive, got 0"),
        ("device=banana", "device: 'banana' is not a device"),
        ("eval.ks=[0]", "eval.ks[0]: must be at least 1"),
        ("eval.batch_size=0", "eval.batch_size: must be at least 1"),
        ("seed=-1", "seed: must be at least 0"),
        ("data.synth_pairs.test_size=-5", "data.synth_pairs.test_size: must be at least 1"),
        ("model.joint_dim=0", "model.joint_dim: must be at least 1"),
        ("model.modalities.audio.n_mels=0", "model.modalities.audio.n_mels: must be at least 1"),
        ("model.modalities.vision.frozen=false", "'image-stats' is fixed and cannot be trained; "
                                                 "use encoder 'conv'"),
        ("strategies=[finetune,joint]", "'joint' must come first"),
    ],
)
def test_bad_values_are_named(tmp_path: Path, tiny: dict, override: str, fragment: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tiny))
    with pytest.raises(ConfigError) as err:
        check(load_config(path, [override]))
    assert fragment in str(err.value)


def test_duplicate_task_names(tiny: dict) -> None:
    for task in tiny["scenario"]["tasks"][:2]:
        task["name"] = "same"
    _check(tiny, "task name 'same' is used twice")


def test_floats_in_exponent_form_and_overrides_keep_defaults(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({
        "train": {"lr": "1e-3"},
        "scenario": {"tasks": [{"dataset": "synth-pairs/toys", "modalities": ["vision", "text"]}]},
    }))
    config = load_config(path, ["model.modalities.vision.encoder=conv", "train.lr=5e-4"])
    assert config.train.lr == 5e-4
    assert config.model.modalities["vision"].encoder == "conv"
    assert set(config.model.modalities) == {"vision", "audio", "text"}  # defaults kept


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf"), "nan", "1e400",
                                   10**400])
def test_every_float_field_must_be_finite(tiny: dict, value: object) -> None:
    tiny["train"]["lr"] = value
    _check(tiny, "train.lr: must be a finite number, got")


def test_a_strategy_option_must_be_finite_too(tiny: dict) -> None:
    tiny["strategies"] = ["dns"]
    tiny["strategy_args"] = {"dns": {"input_threshold": float("nan")}}
    _check(tiny, "strategy_args.dns.input_threshold: must be a finite number, got nan")


def test_an_echoed_value_is_cut_short(tiny: dict) -> None:
    from comodal.config import RunConfig

    tiny["train"]["lr"] = list(range(100_000))
    with pytest.raises(ConfigError) as err:
        from_dict(RunConfig, tiny)
    assert str(err.value).startswith("train.lr: expected float, got [0, 1, 2")
    assert len(str(err.value)) < 250


def test_anchors_and_merge_keys_still_work(tmp_path: Path) -> None:
    from comodal.yaml_input import read_yaml

    path = tmp_path / "c.yaml"
    path.write_text("_train: &train {epochs: 2, lr: 0.5}\ntrain:\n  <<: *train\n  lr: 0.25\n"
                    "eval: {ks: &ks [1, 5], pool_draws: 1}\ncopy: *ks\n")
    data = read_yaml(path)
    assert data["train"] == {"epochs": 2, "lr": 0.25} and data["copy"] == [1, 5]
