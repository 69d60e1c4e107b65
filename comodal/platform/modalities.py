"""Modalities: validation and preprocessing of raw values, collation, and the encoder choice.

This module is the one place that knows what a raw audio, text or vision value looks like and
how a list of them becomes a batch. A modality may have any name (depth, thermal, touch,
video, ...): audio, text and vision have built-in encoders of raw values, every other name
takes precomputed features (``encoder: features``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torchaudio
from torch import nn

from comodal.config import ModalityConfig
from comodal.errors import ConfigError, DataError
from comodal.platform.encoders import (
    AudioConv,
    HFAudio,
    HFText,
    ImageStats,
    LogMelStats,
    TextEmbeddingBag,
    VisionConv,
    default_text_model_dir,
    load_hf,
    pad_waves,
    to_mono,
)

ENCODERS: dict[str, tuple[str, ...]] = {
    "audio": ("logmel-stats", "conv", "hf", "features"),
    "text": ("hf", "embedding-bag", "features"),
    "vision": ("image-stats", "conv", "features"),
}
OTHER_ENCODERS = ("features",)  # what any other modality name takes


def encoders(name: str) -> tuple[str, ...]:
    """The encoders modality ``name`` can have."""
    return ENCODERS.get(name, OTHER_ENCODERS)


def check_encoder(name: str, encoder: str) -> None:
    """Refuse an encoder modality ``name`` does not have, naming the field and the choices; a
    modality without built-in encoders is told that it needs precomputed features."""
    where = f"model.modalities.{name}.encoder"
    if name in ENCODERS and encoder not in ENCODERS[name]:
        raise ConfigError(f"{where}: unknown value {encoder!r} "
                          f"(valid: {', '.join(ENCODERS[name])})")
    if name not in ENCODERS and encoder not in OTHER_ENCODERS:
        raise ConfigError(
            f"{where}: {encoder!r} cannot encode {name!r}: built-in encoders of raw values exist "
            f"for {', '.join(ENCODERS)} only, so modality {name!r} needs precomputed features "
            f"(encoder: features, dim: <their width>)")


class Modality:
    """One configured modality: turns raw values into encoder input and owns the backbone.

    ``frozen`` is the backbone that runs once per dataset (its output is cached); ``trainable``
    is the encoder that runs every step inside the model; with ``features`` neither exists and
    samples already hold vectors.
    """

    def __init__(self, name: str, config: ModalityConfig) -> None:
        self.name, self.config = name, config
        self.frozen: Any = None
        self.trainable: nn.Module | None = None
        self.tokenizer: Any = None
        choice = config.encoder
        if name == "audio" and choice == "logmel-stats":
            self.frozen = LogMelStats(config.sample_rate, config.n_mels)
        elif name == "audio" and choice == "conv":
            self.trainable = AudioConv(config.sample_rate, config.n_mels, config.dim)
        elif name == "audio" and choice == "hf":
            if not config.path:
                raise ConfigError("model.modalities.audio.path: the hf audio encoder needs a "
                                  "local Hugging Face directory (wav2vec2, HuBERT, ...)")
            audio = HFAudio(Path(config.path), config.freeze_feature_encoder)
            if config.frozen is False:
                self.trainable = audio
            else:
                self.frozen = audio.eval().requires_grad_(False)
        elif name == "vision" and choice == "image-stats":
            self.frozen = ImageStats()
        elif name == "vision" and choice == "conv":
            self.trainable = VisionConv(config.dim)
        elif name == "text" and choice == "hf":
            text = HFText(self.text_dir(), config.max_length)
            if config.frozen is not False:
                self.frozen = text.eval().requires_grad_(False)
            else:
                self.trainable = text
            self.tokenizer = text.tokenizer
        elif name == "text" and choice == "embedding-bag":
            self.tokenizer = load_hf(self.text_dir(), "tokenizer")
            self.trainable = TextEmbeddingBag(len(self.tokenizer), config.dim)
        elif choice != "features":
            check_encoder(name, choice)

    def text_dir(self) -> Path:
        return Path(self.config.path) if self.config.path else default_text_model_dir()

    def fingerprint(self) -> dict:
        """What determines the frozen backbone's output: the backbone and, for audio, the
        preprocessing (rate and crop)."""
        fingerprint = self.frozen.fingerprint()
        if self.name == "audio":
            fingerprint |= {"rate": self.config.sample_rate,
                            "max_seconds": self.config.max_seconds}
        return fingerprint

    @property
    def out_dim(self) -> int:
        """Width of what reaches the projection head (``dim`` for precomputed features)."""
        backbone = self.frozen or self.trainable
        return self.config.dim if backbone is None else int(backbone.out_dim)

    def preprocess(self, value: Any, where: str) -> Any:
        """Check one raw value and bring it to the configured form (mono, target rate)."""
        if self.config.encoder == "features":
            tensor = torch.as_tensor(value, dtype=torch.float32)
            if tensor.dim() != 1:
                raise DataError(f"{where}: {self.name} features must be a vector, "
                                 f"got shape {tuple(tensor.shape)}")
            if not torch.isfinite(tensor).all():
                raise DataError(f"{where}: {self.name} features hold NaN or inf")
            return tensor
        if self.name == "audio":
            return self._audio(value, where)
        if self.name == "text":
            if not isinstance(value, str) or not value.strip():
                raise DataError(f"{where}: text must be a non-empty string, got {value!r}")
            return value
        image = torch.as_tensor(value, dtype=torch.float32)
        if image.dim() != 3 or image.shape[0] != 3:
            raise DataError(f"{where}: vision expects an image [3, H, W], "
                             f"got shape {tuple(image.shape)}")
        if not torch.isfinite(image).all():
            raise DataError(f"{where}: vision image holds NaN or inf")
        return image

    def _audio(self, value: Any, where: str) -> torch.Tensor:
        if not (isinstance(value, tuple) and len(value) == 2):
            raise DataError(f"{where}: audio must be (waveform, sample_rate), got {type(value)}")
        wave, rate = value
        if not isinstance(rate, int) or rate <= 0:
            raise DataError(f"{where}: audio sample rate must be a positive int, got {rate!r}")
        wave = to_mono(torch.as_tensor(wave))
        if wave.numel() == 0 or not torch.isfinite(wave).all():
            raise DataError(f"{where}: audio waveform is empty or not finite")
        if rate != self.config.sample_rate:
            wave = torchaudio.functional.resample(wave, rate, self.config.sample_rate)
        if self.config.max_seconds:
            wave = wave[: int(self.config.max_seconds * self.config.sample_rate)]
        return wave

    @property
    def precomputed(self) -> bool:
        """Whether prepared values are feature vectors (frozen backbone or given features)."""
        return self.frozen is not None or self.config.encoder == "features"

    def collate_prepared(self, values: Sequence[Any]) -> Any:
        """A batch of prepared values: stacked features, or the raw-value collation."""
        return torch.stack(list(values)) if self.precomputed else self.collate(values)

    def collate(self, values: Sequence[Any]) -> Any:
        """A list of preprocessed raw values as one backbone input."""
        if self.config.encoder == "features":
            return torch.stack(list(values))
        if self.name == "audio":
            return pad_waves(list(values))
        if self.name == "text":
            return dict(self.tokenizer(list(values), padding=True, truncation=True,
                                       max_length=self.config.max_length, return_tensors="pt"))
        return torch.stack(list(values))


def build_modalities(configs: dict[str, ModalityConfig]) -> dict[str, Modality]:
    return {name: Modality(name, cfg) for name, cfg in configs.items()}


def collate_samples(
    samples: Sequence[dict[str, Any]], modalities: dict[str, Modality], prepared: bool = False
) -> dict:
    """Collate sample dicts (as an Avalanche or torch ``DataLoader`` yields them) per key:
    modalities through their own collation (raw values are checked and preprocessed first),
    labels into a tensor, metadata into lists."""
    batch: dict[str, Any] = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        if key in modalities:
            mod = modalities[key]
            if prepared:
                batch[key] = mod.collate_prepared(values)
            else:
                batch[key] = mod.collate([mod.preprocess(v, f"{key} value") for v in values])
        elif key == "label":
            batch[key] = torch.tensor(values)
        elif isinstance(values[0], torch.Tensor):  # a tensor column: a sequence's tokens
            batch[key] = torch.stack(values)
        else:
            batch[key] = values
    return batch
