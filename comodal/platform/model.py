"""The shared multimodal encoder: per modality an optional trainable backbone and a linear
projection head into one joint space, plus a temperature.

Heads are bias-free linear maps (identity-initialised when widths match, as in CMCL) so that
gradient-projection strategies can reason about them exactly.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


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
        z = self.heads[modality](self.backbone(batch[modality], modality))
        return F.normalize(z, dim=-1) if normalize else z
