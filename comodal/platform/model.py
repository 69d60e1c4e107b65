"""The shared multimodal encoder: per modality an optional trainable backbone and a linear
projection head into one joint space, a temperature, and for class-incremental work a linear
classifier over the joint space that grows as classes arrive.

Heads are bias-free linear maps (identity-initialised when widths match, as in CMCL) so that
gradient-projection strategies can reason about them exactly.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from comodal.platform import distributed


class MultimodalEncoder(nn.Module):
    """``encode(batch, modality)`` -> L2-normalised joint embeddings ``[B, joint_dim]``.

    ``batch[modality]`` holds either backbone input (trainable encoders) or the backbone's
    output (frozen backbones, whose features were cached before training).
    """

    def __init__(
        self,
        in_dims: dict[str, int],
        joint_dim: int,
        encoders: dict[str, nn.Module] | None = None,
        temperature: float = 0.07,
        learnable_temperature: bool = True,
    ) -> None:
        super().__init__()
        self.encoders = nn.ModuleDict(encoders or {})
        self.heads = nn.ModuleDict()
        for name, dim in in_dims.items():
            head = nn.Linear(dim, joint_dim, bias=False)
            if dim == joint_dim:
                nn.init.eye_(head.weight)
            else:
                nn.init.orthogonal_(head.weight)
            self.heads[name] = head
        self.log_scale = nn.Parameter(
            torch.tensor(math.log(1.0 / temperature)), requires_grad=learnable_temperature
        )
        self.joint_dim = joint_dim
        self.classifier: nn.Linear | None = None  # created by the first grow()
        self.register_buffer("class_ids", torch.zeros(0, dtype=torch.long))
        self._rows: torch.Tensor | None = None  # class id -> classifier row, made once per grow

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

    def encode(self, batch: dict[str, Any], modality: str, normalize: bool = True) -> torch.Tensor:
        """Joint embeddings of ``batch[modality]``. Under torchrun each rank encodes its share
        of the rows and every rank gets all of them (``comodal.platform.distributed``)."""
        x = batch[modality]
        world = distributed.current()
        if world is None:
            z = self.heads[modality](self.backbone(x, modality))
        else:
            n = distributed.rows_of(x)
            local = distributed.take_rows(x, world.share(n))
            z = world.gather(self.heads[modality](self.backbone(local, modality)), n)
        return F.normalize(z, dim=-1) if normalize else z

    def forward(self, batch: Any) -> torch.Tensor:
        """What Avalanche's plugins call (``avalanche_forward(model, x, t)``) on a
        ``comodal.core.data.Batch``: a class-incremental batch's logits over the classes
        grown so far, or a pair batch's ``[B, 2, D]`` un-normalised joint embeddings (first
        modality, then second), whose norm methods such as MAS can differentiate. A batch
        mixing modality pairs is forwarded part by part, rows back in their places."""
        if batch.parts:
            outputs = [(rows, self(part)) for rows, part in batch.parts]
            out = outputs[0][1].new_empty((len(batch), *outputs[0][1].shape[1:]))
            for rows, part in outputs:
                out[rows] = part
            return out
        if batch.kind == "classify":
            return self.classify(self.encode(batch, batch.modalities[0], normalize=False))
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
        that it reads the same geometry the contrastive losses shape."""
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
