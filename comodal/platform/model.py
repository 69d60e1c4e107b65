"""The shared multimodal encoder: per modality an optional trainable backbone and a linear
projection head into one joint space, a temperature, and for class-incremental work a linear
classifier over the joint space that grows as classes arrive.

Heads are linear maps, identity-initialised when widths match (as in CMCL; ``head_init``),
bias-free by default or with a zero-initialised bias (``head_bias``, the CMCL code's): the
gradient-projection strategies treat a biased head as ``[W | b]`` acting on ``[x, 1]``, so
they reason about either exactly.

How two joint embeddings are scored is the model's ``score`` (``model.score`` in the config),
decided here and nowhere else: ``cosine`` compares L2-normalised embeddings, ``dot`` the heads'
raw outputs (the CMCL code's scores, on which DNS's guarantee holds). ``scored(z)`` puts
embeddings in the space their scores are dot products in, and ``encode`` does so by default;
the training losses, retrieval, zero-shot prototypes and the strategies' pair losses and
features all read embeddings through one of the two.
"""

from __future__ import annotations

import copy
import math
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from comodal.config import HEAD_INITS, SCORES
from comodal.errors import ConfigError
from comodal.platform import distributed
from comodal.platform.encoders import masked_mean


def init_head(head: nn.Linear, how: str, name: str) -> None:
    """``identity`` (square heads only), ``orthogonal``, or ``auto``: identity when the head is
    square, else orthogonal. A bias starts at zero, so that an identity head is the backbone's
    own embedding."""
    out_dim, in_dim = head.weight.shape
    if how == "identity" and in_dim != out_dim:
        raise ConfigError(f"model.head_init: identity needs every head square, but modality "
                          f"{name!r} has width {in_dim} and model.joint_dim is {out_dim} (use "
                          "auto, identity where the widths match, or orthogonal)")
    if how == "identity" or (how == "auto" and in_dim == out_dim):
        nn.init.eye_(head.weight)
    elif how in ("auto", "orthogonal"):
        nn.init.orthogonal_(head.weight)
    else:
        raise ConfigError(f"model.head_init: unknown value {how!r} (valid: "
                          f"{', '.join(HEAD_INITS)})")
    if head.bias is not None:
        nn.init.zeros_(head.bias)


class SequenceOutput(NamedTuple):
    """What a sequence task's forward pass gives: the decoder's teacher-forced logits
    ``[B, L-1, V]`` (of the target tokens but the last), the pooled audio's joint features
    (before normalisation, as ``ClassifyOutput.features``), and the decoder's memory
    ``(memory [B, T', d], valid [B, T'])`` for decoding and distillation."""

    logits: torch.Tensor
    features: torch.Tensor
    memory: tuple[torch.Tensor, torch.Tensor]


class MultimodalEncoder(nn.Module):
    """``encode(batch, modality)`` -> joint embeddings ``[B, joint_dim]`` as the model scores
    them: L2-normalised (``score="cosine"``) or the heads' raw outputs (``score="dot"``).

    ``batch[modality]`` holds either backbone input (trainable encoders) or the backbone's
    output (frozen backbones, whose features were cached before training).

    With a ``decoder`` (``comodal.platform.decoder.SequenceDecoder``) it is an encoder-decoder
    for sequence tasks: ``sequence(batch, modality)``; ``transcript_head`` maps the decoder's
    pooled token embeddings of a transcript into the joint space (COCONUT's text side).
    """

    def __init__(
        self,
        in_dims: dict[str, int],
        joint_dim: int,
        encoders: dict[str, nn.Module] | None = None,
        temperature: float = 0.07,
        learnable_temperature: bool = True,
        score: str = "cosine",
        head_init: str = "auto",
        head_bias: bool = False,
        decoder: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if score not in SCORES:
            raise ConfigError(f"model.score: unknown value {score!r} (valid: {', '.join(SCORES)})")
        self.score = score
        self.encoders = nn.ModuleDict(encoders or {})
        self.heads = nn.ModuleDict()
        for name, dim in in_dims.items():
            head = nn.Linear(dim, joint_dim, bias=head_bias)
            init_head(head, head_init, name)
            self.heads[name] = head
        self.log_scale = nn.Parameter(
            torch.tensor(math.log(1.0 / temperature)), requires_grad=learnable_temperature
        )
        self.joint_dim = joint_dim
        self.classifier: nn.Linear | None = None  # created by the first grow()
        self.register_buffer("class_ids", torch.zeros(0, dtype=torch.long))
        self._rows: torch.Tensor | None = None  # class id -> classifier row, made once per grow
        self.decoder = decoder
        self.transcript_head: nn.Linear | None = None
        if decoder is not None:
            self.transcript_head = nn.Linear(decoder.dim, joint_dim, bias=False)
            init_head(self.transcript_head, head_init if head_init != "identity" else "auto",
                      "transcript")

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(self.heads)

    @property
    def scale(self) -> torch.Tensor:
        """Logit scale 1/temperature, clamped at 100 as in CLIP."""
        return self.log_scale.exp().clamp(max=100.0)

    def backbone(self, x: Any, modality: str) -> torch.Tensor:
        """Input to ``modality``'s head: the trainable encoder's output, or ``x`` itself."""
        return self.encoders[modality](x) if modality in self.encoders else x

    @property
    def normalizes(self) -> bool:
        """Whether scores compare L2-normalised embeddings (``cosine``) or raw ones (``dot``)."""
        return self.score == "cosine"

    def scored(self, z: torch.Tensor) -> torch.Tensor:
        """Joint embeddings ``z`` (the heads' outputs) as the model scores them: the score of
        two rows is the dot product of their ``scored`` forms (cosine: unit norm; dot: as
        they are)."""
        return F.normalize(z, dim=-1) if self.normalizes else z

    def encode(self, batch: dict[str, Any], modality: str,
               normalize: bool | None = None) -> torch.Tensor:
        """Joint embeddings of ``batch[modality]``, by default as the model scores them
        (``scored``); ``normalize`` True or False asks for unit-norm or raw ones. Under
        torchrun each rank encodes its share of the rows and every rank gets all of them
        (``comodal.platform.distributed``)."""
        x = batch[modality]
        world = distributed.current()
        if world is None:
            z = self.heads[modality](self.backbone(x, modality))
        else:
            n = distributed.rows_of(x)
            local = distributed.take_rows(x, world.share(n))
            z = world.gather(self.heads[modality](self.backbone(local, modality)), n)
        if normalize is None:
            return self.scored(z)
        return F.normalize(z, dim=-1) if normalize else z

    def frames(self, batch: dict[str, Any], modality: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The trained ``modality`` encoder's frames ``[B, T, D]`` and which are real
        ``[B, T]``, before pooling; under torchrun each rank encodes its share of the rows and
        every rank gets all of them (as ``encode``)."""
        return self._frames(batch, modality)[:2]

    def _frames(self, batch: dict[str, Any], modality: str,
                pooled: bool = False) -> tuple[torch.Tensor, ...]:
        """``frames``, and with ``pooled`` the joint features of the mean frame, computed as
        ``encode`` computes them (the head on each rank's own rows, then gathered)."""
        x, encoder = batch[modality], self.encoders[modality]
        world = distributed.current()
        n = distributed.rows_of(x)
        if world is not None:
            x = distributed.take_rows(x, world.share(n))
        hidden, valid = encoder.sequence(x)
        out = (hidden, valid.to(hidden.dtype))
        if pooled:
            out += (self.heads[modality](masked_mean(hidden, valid)),)
        if world is not None:
            out = tuple(world.gather(part, n) for part in out)
        return (out[0], out[1].bool(), *out[2:])

    def sequence(self, batch: dict[str, Any], modality: str) -> SequenceOutput:
        """A sequence batch through the encoder-decoder, teacher-forced on ``batch["tokens"]``
        (``[SOS] ... [EOS] [PAD]...`` rows): the logits of every target token but the first."""
        frames, valid, features = self._frames(batch, modality, pooled=True)
        memory = self.decoder.memory(frames, valid)
        return SequenceOutput(self.decoder(*memory, batch["tokens"][:, :-1]), features, memory)

    def forward(self, batch: Any) -> torch.Tensor:
        """What Avalanche's plugins call (``avalanche_forward(model, x, t)``) on a
        ``comodal.core.data.Batch``: a class-incremental batch's logits over the classes
        grown so far, a sequence batch's teacher-forced token logits, or a pair batch's
        ``[B, 2, D]`` un-normalised joint embeddings (first modality, then second), whose norm
        methods such as MAS can differentiate. A batch mixing modality pairs is forwarded part
        by part, rows back in their places."""
        if batch.parts:
            outputs = [(rows, self(part)) for rows, part in batch.parts]
            out = outputs[0][1].new_empty((len(batch), *outputs[0][1].shape[1:]))
            for rows, part in outputs:
                out[rows] = part
            return out
        if batch.kind == "classify":
            return self.classify(self.encode(batch, batch.modalities[0], normalize=False))
        if batch.kind == "sequence":
            return self.sequence(batch, batch.modalities[0]).logits
        return torch.stack([self.encode(batch, m, normalize=False) for m in batch.modalities],
                           dim=1)

    def grow(self, classes: list[int]) -> None:
        """Add a classifier row per class not seen yet; old rows are kept as they are."""
        known = set(self.class_ids.tolist())
        new = [c for c in dict.fromkeys(classes) if c not in known]
        if not new:
            return
        device = self.class_ids.device
        grown = nn.Linear(self.joint_dim, len(known) + len(new)).to(device)
        if self.classifier is not None:
            with torch.no_grad():
                grown.weight[: len(known)] = self.classifier.weight
                grown.bias[: len(known)] = self.classifier.bias
        self.classifier = grown
        self.class_ids = torch.cat([self.class_ids, torch.tensor(new, device=device)])
        self._rows = None

    def classify(self, z: torch.Tensor) -> torch.Tensor:
        """Logits over the classes grown so far from joint features ``z`` (before
        normalisation): the classifier on the unit-norm features, times the logit scale, so
        that it reads the geometry cosine-scored contrastive losses shape (under either
        ``score``: the class-incremental classifier is not a pair score)."""
        return self.classifier(F.normalize(z, dim=-1)) * self.scale

    def class_rows(self, labels: torch.Tensor) -> torch.Tensor:
        """Classifier row of each class id in ``labels``; -1 for a class not grown yet. The
        lookup table is made once per growth (one host synchronisation), not per batch."""
        if self._rows is None or self._rows.device != self.class_ids.device:
            size = int(self.class_ids.max()) + 1 if len(self.class_ids) else 0
            self._rows = torch.full((size + 1,), -1, dtype=torch.long,
                                    device=self.class_ids.device)  # last slot: unknown ids
            self._rows[self.class_ids] = torch.arange(len(self.class_ids),
                                                      device=self.class_ids.device)
        labels = labels.to(self._rows.device)
        return self._rows[labels.clamp(max=len(self._rows) - 1)]


def frozen_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in eval mode with no gradients: a teacher."""
    teacher = copy.deepcopy(model).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher
