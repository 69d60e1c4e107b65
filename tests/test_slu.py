"""SLU corpora: the synthesised corpus in FSC's layout, the FSC and SLURP readers and their
error messages, class-incremental SLU streams and the audio encoders."""

from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from helpers import slurp_corpus

from comodal.config import (
    ClassIncrementalConfig,
    ModalityConfig,
    RunConfig,
    ScenarioConfig,
    SynthFSCConfig,
)
from comodal.errors import ConfigError, DataError
from comodal.platform.feature_cache import FeatureCache, prepare_dataset
from comodal.platform.modalities import Modality
from comodal.scenarios.registry import Splits, build_scenario, class_groups, group_order
from comodal.scenarios.slu import SlurpIntents, read_fsc, read_slurp
from comodal.scenarios.synth_fsc import HEADER, INTENTS, generate, phrasings

FSC_ORDER = [19, 27, 30, 28, 15, 4, 2, 9, 10, 22, 11, 7, 1, 25, 16, 14, 5, 8, 29, 12, 21, 17, 3,
             20, 23, 6, 18, 24, 26, 0, 13]


def test_the_corpus_is_in_fsc_layout_and_reads_like_fsc(corpus: Path) -> None:
    for split in ("train", "valid", "test"):
        with (corpus / "data" / f"{split}_data.csv").open(newline="") as f:
            rows = list(csv.reader(f))
        assert rows[0] == HEADER == ["", "path", "speakerId", "transcription", "action",
                                     "object", "location"]
        assert len(rows) - 1 == 31 * 6 * (2 if split == "train" else 1)
        first = rows[1]
        assert first[1] == f"wavs/speakers/{first[2]}/{Path(first[1]).name}"
        info = soundfile.info(str(corpus / first[1]))
        assert (info.samplerate, info.channels) == (16000, 1)
    data = read_fsc(corpus, "train")
    assert len(data) == 372 and data.labels.unique().tolist() == list(range(31))
    wave, rate = data.columns["audio"][0]
    assert rate == 16000 and wave.shape[0] == 1 and wave.shape[1] > 8000


def test_speakers_are_disjoint_across_splits(corpus: Path) -> None:
    speakers = {s: set(read_fsc(corpus, s).meta["speaker"]) for s in ("train", "valid", "test")}
    assert len(speakers["train"]) == 2
    assert not speakers["train"] & speakers["test"]
    assert not speakers["train"] & speakers["valid"] and not speakers["valid"] & speakers["test"]


def test_intents_have_design_ids_and_several_phrasings(corpus: Path) -> None:
    assert len(INTENTS) == 31 and len(set(INTENTS)) == 31
    assert INTENTS[0] == ("change language", "none", "none")
    assert INTENTS[13] == ("activate", "lights", "washroom")
    assert INTENTS[21] == ("decrease", "heat", "bedroom")
    assert INTENTS[26] == ("change language", "Chinese", "none")
    assert INTENTS[30] == ("bring", "shoes", "none")
    assert all(len(set(phrasings(i))) >= 5 for i in range(31))
    data = read_fsc(corpus, "test")
    with (corpus / "data" / "test_data.csv").open(newline="") as f:
        for row, label in zip(csv.DictReader(f), data.labels.tolist(), strict=True):
            assert INTENTS[label] == (row["action"], row["object"], row["location"])


def test_generation_is_deterministic(corpus: Path, tmp_path: Path) -> None:
    again = generate(tmp_path / "again", SynthFSCConfig(seed=3, train_speakers=2,
                                                      valid_speakers=1, test_speakers=1),
                     progress=False)
    assert (again / "data" / "train_data.csv").read_text() == \
        (corpus / "data" / "train_data.csv").read_text()
    name = "wavs/speakers/" + read_fsc(corpus, "test").meta["speaker"][0]
    first = sorted((corpus / name).iterdir())[0]
    assert first.read_bytes() == (again / name / first.name).read_bytes()


def test_the_fsc_class_order_gives_the_stated_tasks() -> None:
    groups = class_groups(31, [4, 3], FSC_ORDER)
    assert len(groups) == 10
    assert groups[0] == [19, 27, 30, 28] and groups[1] == [15, 4, 2]
    assert groups[-1] == [26, 0, 13]
    assert [len(g) for g in class_groups(31, [11, 10])] == [11, 10, 10]
    assert [len(g) for g in class_groups(31, [6, 5])] == [6, 5, 5, 5, 5, 5]


def test_a_class_incremental_fsc_scenario_from_config(corpus: Path, tmp_path: Path) -> None:
    config = RunConfig(progress=False)
    config.data.fsc.root = str(corpus)
    config.scenario = ScenarioConfig(class_incremental=ClassIncrementalConfig(
        dataset="fsc", modalities=["audio", "text"], increments=[4, 3], order=FSC_ORDER))
    scenario = build_scenario(config)
    assert len(scenario) == 10
    assert scenario.tasks[0].classes == [19, 27, 30, 28]
    assert set(scenario.tasks[0].train.labels.tolist()) == {19, 27, 30, 28}
    assert len(scenario.tasks[0].train) == 4 * 6 * 2 and len(scenario.tasks[1].test) == 3 * 6


# ----------------------------------------------------------------------------- bad input
def _copy(corpus: Path, tmp_path: Path) -> Path:
    root = tmp_path / "fsc"
    shutil.copytree(corpus, root)
    return root


def _edit_row(root: Path, row: int, **fields: str) -> str:
    path = root / "data" / "test_data.csv"
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    rows[row].update(fields)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=HEADER)
        writer.writeheader()
        writer.writerows(rows)
    return rows[row]["path"]


@pytest.mark.parametrize("damage,message", [
    ("missing", "row 4: audio file .* does not exist"),
    ("corrupt", "row 4: audio file .* is unreadable"),
    ("empty", "row 4: audio file .* is empty"),
    ("field", "row 4: field 'transcription' is empty"),
    ("intent", "row 4: intent 'bring/car/none' is not one of FSC's 31 intents"),
])
def test_bad_fsc_rows_name_the_file_and_row(corpus: Path, tmp_path: Path, damage: str,
                                            message: str) -> None:
    root = _copy(corpus, tmp_path)
    if damage == "field":
        _edit_row(root, 2, transcription="")
    elif damage == "intent":
        _edit_row(root, 2, action="bring", object="car")
    else:
        audio = root / _edit_row(root, 2)
        if damage == "missing":
            audio.unlink()
        elif damage == "corrupt":
            audio.write_bytes(b"not a wav file")
        else:
            soundfile.write(audio, np.zeros(0, dtype=np.float32), 16000)
    with pytest.raises(DataError, match=message):
        read_fsc(root, "test")
    skipped = read_fsc(root, "test", on_error="skip")
    assert len(skipped) == 31 * 6 - 1


def test_skipped_rows_are_counted_and_reported(corpus: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture) -> None:
    root = _copy(corpus, tmp_path)
    (root / _edit_row(root, 0)).unlink()
    _edit_row(root, 5, location="garage")
    read_fsc(root, "test", on_error="skip")
    assert "FSC test: skipped 2 rows" in capsys.readouterr().err


def test_a_replaced_wav_gets_a_new_fingerprint_and_cache_entry(corpus: Path,
                                                               tmp_path: Path) -> None:
    root = _copy(corpus, tmp_path)
    audio = Modality("audio", ModalityConfig(encoder="logmel-stats"))
    cache = FeatureCache(tmp_path / "cache", progress=False)
    before = read_fsc(root, "test")
    old = prepare_dataset(before, "test", {"audio": audio}, cache).columns["audio"]
    wav = Path(before.meta["path"][2])
    noise = np.random.default_rng(0).standard_normal(12000).astype(np.float32)
    soundfile.write(wav, 0.3 * noise, 16000)  # other audio at the same path
    after = read_fsc(root, "test")
    assert after.fingerprint != before.fingerprint
    new = prepare_dataset(after, "test", {"audio": audio}, cache).columns["audio"]
    assert cache.misses == 2 and cache.hits == 0
    assert not torch.allclose(new[2], old[2]) and torch.equal(new[3], old[3])
    stat = wav.stat()  # same size, rewritten a second later: a new entry too
    soundfile.write(wav, 0.2 * noise, 16000)
    os.utime(wav, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert wav.stat().st_size == stat.st_size
    assert read_fsc(root, "test").fingerprint not in (before.fingerprint, after.fingerprint)


# ----------------------------------------------------------------------------- SLURP
def test_a_slurp_fixture_loads_with_intents_and_scenario_groups(tmp_path: Path) -> None:
    root = slurp_corpus(tmp_path / "slurp")
    intents = SlurpIntents.from_jsonl(root / "train.jsonl")
    assert intents.names == ["alarm_query", "alarm_set", "play_music", "weather_query"]
    data = read_slurp(root, "test", intents)
    assert len(data) == 8 and data.columns["text"][0] == "sentence 0"
    assert data.labels[0] == intents.names.index("alarm_set")
    assert data.meta["target"][1] == "alarm_query _SEP word _FILL sentence _SEP sentence 1"
    splits = Splits(data, data, intents.names, class_groups=intents.scenarios)
    order, increments = group_order(splits, 2)  # alarm + play, then weather
    assert order == [0, 1, 2, 3] and increments == [3, 1]
    (root / "slurp_real" / "test-3.flac").unlink()
    with pytest.raises(DataError, match=r"test.jsonl line 4: audio file .*test-3.flac does not"):
        read_slurp(root, "test", intents)


def test_slurp_without_a_root_is_a_clear_error() -> None:
    from comodal.scenarios.registry import dataset_spec

    with pytest.raises(ConfigError, match="data.slurp.root"):
        dataset_spec("slurp").build(RunConfig().data, False)


# ----------------------------------------------------------------------------- encoders
@pytest.fixture(scope="module")
def tiny_wav2vec2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    config = Wav2Vec2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=64, conv_dim=(16, 16), conv_stride=(5, 4),
                            conv_kernel=(10, 8), num_feat_extract_layers=2,
                            num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=2,
                            feat_extract_norm="layer", do_stable_layer_norm=True)
    path = tmp_path_factory.mktemp("w2v")
    torch.manual_seed(0)
    Wav2Vec2Model(config).save_pretrained(path)
    return path


def test_a_local_wav2vec2_encodes_audio_with_its_front_end_frozen(tiny_wav2vec2: Path) -> None:
    audio = Modality("audio", ModalityConfig(encoder="hf", path=str(tiny_wav2vec2), frozen=False,
                                             freeze_feature_encoder=True))
    encoder = audio.trainable
    assert audio.out_dim == 32 and audio.frozen is None
    front = [p for n, p in encoder.named_parameters() if "feature_extractor" in n]
    rest = [p for n, p in encoder.named_parameters() if "feature_extractor" not in n]
    assert front and not any(p.requires_grad for p in front) and all(p.requires_grad for p in rest)
    waves = [audio.preprocess((torch.randn(1, n), 16000), "test") for n in (8000, 12000)]
    out = encoder(audio.collate(waves))
    assert out.shape == (2, 32) and torch.isfinite(out).all()
    alone = encoder(audio.collate(waves[:1]))  # padding does not change a shorter utterance
    assert torch.allclose(out[0], alone[0], atol=1e-4)


def test_a_frozen_hf_audio_encoder_is_cached_and_others_refused(tiny_wav2vec2: Path) -> None:
    frozen = Modality("audio", ModalityConfig(encoder="hf", path=str(tiny_wav2vec2)))
    assert frozen.trainable is None and "weights" in frozen.fingerprint()
    with pytest.raises(ConfigError, match="needs a local Hugging Face directory"):
        Modality("audio", ModalityConfig(encoder="hf"))


def test_audio_is_cropped_to_max_seconds() -> None:
    audio = Modality("audio", ModalityConfig(encoder="conv", max_seconds=0.5))
    assert audio.preprocess((torch.randn(16000 * 2), 16000), "x").shape == (8000,)
    assert audio.preprocess((torch.randn(44100), 44100), "x").shape == (8000,)  # resampled first
