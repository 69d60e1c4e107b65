"""Raw-value checks, resampling, collation and the encoder choices of each modality."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from comodal.config import ModalityConfig
from comodal.errors import DataError
from comodal.platform.encoders import default_text_model_dir
from comodal.platform.losses import InfoNCE
from comodal.platform.modalities import Modality
from comodal.platform.model import MultimodalEncoder


def test_audio_is_resampled_and_mixed_to_mono() -> None:
    audio = Modality("audio", ModalityConfig(encoder="logmel-stats", sample_rate=16000))
    stereo = torch.randn(2, 22050)
    wave = audio.preprocess((stereo, 22050), "clip.wav")
    assert wave.shape == (16000,)
    same = audio.preprocess((torch.randn(800), 16000), "clip.wav")
    assert same.shape == (800,)


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ((torch.randn(100), 0), "sample rate must be a positive int, got 0"),
        ((torch.randn(100), 16000.0), "sample rate must be a positive int"),
        ((torch.zeros(0), 16000), "empty or not finite"),
        ((torch.tensor([0.0, float("nan")]), 16000), "empty or not finite"),
        (torch.randn(100), "audio must be (waveform, sample_rate)"),
    ],
)
def test_bad_audio_is_named(value: object, fragment: str) -> None:
    audio = Modality("audio", ModalityConfig(encoder="logmel-stats"))
    with pytest.raises(ValueError) as err:
        audio.preprocess(value, "speaker3/utt7.wav")
    assert "speaker3/utt7.wav" in str(err.value) and fragment in str(err.value)


def test_bad_vision_and_text_are_named() -> None:
    vision = Modality("vision", ModalityConfig(encoder="image-stats"))
    with pytest.raises(ValueError, match=r"row 4: vision expects an image \[3, H, W\]"):
        vision.preprocess(torch.zeros(32, 32), "row 4")
    text = Modality("text", ModalityConfig(encoder="embedding-bag"))
    with pytest.raises(ValueError, match="row 2: text must be a non-empty string"):
        text.preprocess("  ", "row 2")


def test_bundled_minilm_loads_offline_and_means_something() -> None:
    text = Modality("text", ModalityConfig(encoder="hf"))
    assert text.out_dim == 384 and text.trainable is None
    sentences = ["a small red ball", "a tiny red ball", "a large steel knife"]
    z = F.normalize(text.frozen(text.collate(sentences)), dim=1)
    assert z[0] @ z[1] > z[0] @ z[2] + 0.1
    fp = text.frozen.fingerprint()
    assert fp["weights"] and fp["max_length"] == 32


def test_trainable_hf_text_encoder_from_a_local_directory(tmp_path: Path) -> None:
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=64)
    BertModel(config).save_pretrained(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt",
                 "special_tokens_map.json"):
        shutil.copy(default_text_model_dir() / name, tmp_path / name)
    text = Modality("text", ModalityConfig(encoder="hf", path=str(tmp_path), frozen=False))
    assert text.frozen is None and text.out_dim == 32
    out = text.trainable(text.collate(["hello there", "a red ball"]))
    assert out.shape == (2, 32) and out.requires_grad


def test_missing_model_directory_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no config.json"):
        Modality("text", ModalityConfig(encoder="hf", path=str(tmp_path)))


def test_trainable_encoders_learn_a_pairing() -> None:
    """A conv audio encoder and an embedding-bag text encoder pull matching pairs together."""
    torch.manual_seed(0)
    audio = Modality("audio", ModalityConfig(encoder="conv", dim=16, n_mels=16))
    text = Modality("text", ModalityConfig(encoder="embedding-bag", dim=16))
    vision = Modality("vision", ModalityConfig(encoder="conv", dim=16))
    words = ["low hum", "high beep", "rising tone", "falling tone"]
    freqs = [200.0, 2000.0, 600.0, 1200.0]
    t = torch.arange(4000) / 16000
    waves = [audio.preprocess((torch.sin(2 * torch.pi * f * t), 16000), "x") for f in freqs]
    batch = {"audio": audio.collate(waves), "text": text.collate(words),
             "vision": vision.collate([torch.rand(3, 32, 32) for _ in words])}
    assert batch["audio"]["wave"].shape == (4, 4000)
    model = MultimodalEncoder({"audio": 16, "text": 16, "vision": 16}, 8,
                              {"audio": audio.trainable, "text": text.trainable,
                               "vision": vision.trainable})
    assert model.encode(batch, "vision").shape == (4, 8)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = InfoNCE()(model.encode(batch, "audio"), model.encode(batch, "text"), model.scale)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize(("name", "encoder", "value"), [
    ("vision", "features", torch.tensor([0.5, float("nan"), 1.0])),
    ("text", "features", torch.tensor([0.5, float("inf")])),
    ("vision", "image-stats", torch.full((3, 8, 8), float("nan"))),
])
def test_non_finite_features_and_images_are_named(name: str, encoder: str,
                                                  value: torch.Tensor) -> None:
    modality = Modality(name, ModalityConfig(encoder=encoder, dim=len(value)))
    with pytest.raises(DataError, match=f"dataset 'mine' \\(train\\) row 7: {name} .*NaN or inf"):
        modality.preprocess(value, "dataset 'mine' (train) row 7")
