"""The device a run trains on and its numeric precision (``device``, ``train.precision``).

``32`` changes nothing: no autocast context is entered and no scaler exists, so results are
bit for bit those of a trainer without this module. ``bf16`` and ``16-mixed`` run the training
forward pass and loss, and evaluation's forward passes, under ``torch.autocast`` (bfloat16 or
float16; the weights, the optimizer and the gradients stay float32). ``16-mixed`` adds a
``torch.amp.GradScaler``: the loss is scaled for backward, the gradients are unscaled right
after it (so that plugins editing gradients see the true ones), and a step whose gradients hold
an inf or a NaN is skipped, with the scale backed off. Statistics that strategies take after a
task (DNS's and GPM's moments, their eigendecompositions) run outside autocast, in float32 and
float64.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from comodal.config import PRECISIONS, check_choice

_DTYPES = {"bf16": torch.bfloat16, "16-mixed": torch.float16}


def resolve_device(device: str | torch.device) -> torch.device:
    """``auto`` as ``cuda`` when CUDA is available, else ``cpu``; any other name as given."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class Precision:
    """Autocast and loss scaling of one trainer (see the module's docstring)."""

    def __init__(self, precision: str | int = "32", device: torch.device | str = "cpu") -> None:
        self.name = str(precision)
        check_choice("train.precision", self.name, PRECISIONS)
        self.device_type = torch.device(device).type
        self.dtype = _DTYPES.get(self.name)
        self.scaler = (torch.amp.GradScaler(self.device_type) if self.name == "16-mixed"
                       else None)

    def autocast(self) -> contextlib.AbstractContextManager:
        """``torch.autocast`` at the run's half dtype, or a context that does nothing (32)."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss to call ``backward`` on: scaled with 16-mixed, itself otherwise."""
        return loss if self.scaler is None else self.scaler.scale(loss)

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        """Divide the optimizer's gradients by the scale, in place (16-mixed; once per step)."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> bool:
        """``optimizer.step()``, through the scaler with 16-mixed; whether the step was taken
        (False: the gradients held an inf or a NaN, the scaler skipped it and backed off, so
        the learning-rate schedule must not advance either)."""
        if self.scaler is None:
            optimizer.step()
            return True
        before = self.scaler.get_scale()
        self.scaler.step(optimizer)
        self.scaler.update()
        return self.scaler.get_scale() >= before  # a skipped step lowers the scale

    def float32(self, value: Any) -> Any:
        """Floating tensors in ``value`` (a tensor or a tuple of them, such as the trainer's
        outputs, with the attributes a tuple subclass carries) as float32; unchanged with 32."""
        if self.dtype is None:
            return value
        if isinstance(value, torch.Tensor):
            return value.float() if value.is_floating_point() else value
        if isinstance(value, tuple):
            items = [self.float32(v) for v in value]
            out = type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
            for key, item in getattr(value, "__dict__", {}).items():
                setattr(out, key, self.float32(item))
            return out
        return value

    def state_dict(self) -> dict[str, Any] | None:
        """The scaler's state (its scale and growth tracker) for checkpoints; None without."""
        return None if self.scaler is None else self.scaler.state_dict()

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)
