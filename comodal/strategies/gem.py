"""``gem``: gradient episodic memory (Lopez-Paz & Ranzato, NeurIPS 2017, "Gradient Episodic
Memory for Continual Learning").

An episodic memory keeps rows of every past task k (``er``'s buffer, filled the same way after
each task, by default an equal share per task). Each step, after the trainer has reduced and
clipped the step's gradient g, the gradient g_k of task k's own loss on up to ``memory_batch``
of its memory rows is taken at the current weights. If some ⟨g, g_k⟩ < 0, g is replaced by the
closest gradient (L2) that, to first order, increases no past task's memory loss,

  min ||g̃ - g||²  s.t.  G g̃ >= 0        (rows of G: the g_k),

found through its dual, as the GEM code: v* = argmin_v ½ vᵀ(GGᵀ + εI)v + gᵀGᵀv s.t. v >= m,
g̃ = Gᵀv* + g, with ``eps`` ε (a diagonal regulariser, 1e-3 in the GEM code; it leaves
⟨g̃, g_k⟩ >= -ε v_k) and ``margin`` m (the code's ``memory_strength``, 0.5 there, which adds at
least m·g_k for every k), solved by quadprog; m = 0 and a small ε give the exact projection.
``results()`` counts, per task, the steps that read the memory and those it projected.

Adapted to contrastive pair tasks: task k's loss is the trainer's task loss of task k's memory
rows read back as a batch of task k (InfoNCE between its two modalities, negatives from those
rows), so a memory batch never mixes modality pairs. On class-incremental ``classify`` tasks it
is the cross-entropy over the classes seen so far (the classifier grows; memory gradients are
taken on the current parameters, so rows added later are simply part of every g_k). The
gradient vector is every trainable parameter's gradient, a missing one counted as zero.
The memory rows are never trained on directly: only their gradients constrain the step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import quadprog
import torch

from comodal.core.data import Batch
from comodal.errors import ConfigError
from comodal.strategies.base import Strategy
from comodal.strategies.buffers import BufferConfig
from comodal.strategies.replay import ER, memory_batches


@dataclass
class MemoryConfig(BufferConfig):
    """An episodic memory of ``size`` slots (or ``fraction`` of the training rows), an equal
    share per task by default, and the rows a memory gradient reads."""

    policy: str = "experience"
    # memory rows per gradient (all where fewer are kept): gem's per past task, as the GEM code
    # takes each task's gradient on its 256 memories; agem's in all, the A-GEM code's (MNIST)
    memory_batch: int = 256

    strategy = "gem"  # the name in error messages (a class attribute, not a config field)

    def __post_init__(self) -> None:
        self.check(f"strategy_args.{self.strategy}")
        if self.memory_batch < 1:
            raise ConfigError(f"strategy_args.{self.strategy}.memory_batch: must be >= 1, got "
                              f"{self.memory_batch}")


@dataclass
class GEMConfig(MemoryConfig):
    margin: float = 0.5  # the GEM code's memory_strength: v >= margin in the dual
    eps: float = 1e-3  # added to the dual's diagonal (GEM code), keeps it positive definite

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.margin < 0:
            raise ConfigError(f"strategy_args.gem.margin: must be >= 0, got {self.margin}")
        if self.eps <= 0:
            raise ConfigError(f"strategy_args.gem.eps: must be > 0 (quadprog needs a positive "
                              f"definite matrix), got {self.eps}")


def trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def flat_grad(params: list[torch.nn.Parameter]) -> torch.Tensor:
    """The parameters' gradients as one vector (float32), a missing gradient as zeros."""
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float()
                      for p in params])


def set_flat_grad(params: list[torch.nn.Parameter], flat: torch.Tensor) -> None:
    """Write ``flat`` back as the gradients; a parameter without one gets one only where its
    part of ``flat`` is not zero."""
    for p, part in zip(params, flat.split([p.numel() for p in params]), strict=True):
        if p.grad is not None:
            p.grad.copy_(part.view_as(p))
        elif bool(part.any()):
            p.grad = part.view_as(p).to(p.dtype).clone()


def solve_dual(g: torch.Tensor, memories: torch.Tensor, margin: float,
               eps: float) -> torch.Tensor:
    """GEM's projected gradient g̃ = Gᵀv + g, v = argmin ½ vᵀ(GGᵀ + εI)v + gᵀGᵀv s.t.
    v >= margin (quadprog, float64)."""
    mem = memories.double().cpu().numpy()
    grad = g.double().cpu().numpy()
    k = len(mem)
    gram = mem @ mem.T
    gram = (gram + gram.T) / 2 + eps * np.eye(k)
    # quadprog: min ½ xᵀPx - aᵀx s.t. Cᵀx >= b
    v = quadprog.solve_qp(gram, -(mem @ grad), np.eye(k), np.full(k, margin))[0]
    return torch.from_numpy(mem.T @ v + grad).to(g)


class MemoryGradients(ER):
    """``er``'s buffer and its filling after each task, never joined to the training batches:
    the strategy reads it for gradients of the past tasks' losses (``memory_gradients``)
    and edits the step's gradient in ``after_backward``. Counts, per task, the steps that read
    the memory and the steps whose gradient it changed."""

    kinds = ("pair", "classify")
    # no memory rows in the training batches, so no side batches and no loss term to add:
    # Avalanche's no-ops, which the trainer does not call
    after_forward = Strategy.after_forward
    before_backward = Strategy.before_backward

    def __init__(self, config: MemoryConfig | None = None) -> None:
        super().__init__(config)
        self.steps: list[int] = []  # per task: steps with a memory to read
        self.projected: list[int] = []  # per task: steps whose gradient was changed

    def wrap_loader(self, strategy: Any, loader: Any) -> Any:
        return loader

    def before_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        super().before_training_exp(strategy, **kwargs)
        missing = strategy.experience_index + 1 - len(self.steps)
        self.steps += [0] * missing
        self.projected += [0] * missing

    def batches(self, strategy: Any, slots: torch.Tensor) -> list[Batch]:
        """The memory rows of ``slots``, one training batch per task, on the device."""
        return [batch for _, batch in memory_batches(strategy, self.buffer, slots)]

    def memory_gradients(self, strategy: Any, params: list[torch.nn.Parameter],
                         groups: list[list[Batch]]) -> torch.Tensor:
        """Row i: the gradient over ``params`` of group i's task losses, each batch's weighted
        by its share of the group's rows, at the current weights and in training mode as the
        step. The step's gradients are set aside and put back unchanged."""
        saved = [p.grad for p in params]
        rows = []
        try:
            for group in groups:
                for p in params:
                    p.grad = None
                total = sum(len(batch) for batch in group)
                with strategy.precision.autocast():
                    loss = sum(len(batch) / total * strategy.task_loss(batch,
                                                                       strategy.forward(batch))
                               for batch in group)
                loss.backward()  # unscaled under 16-mixed: these gradients are never stepped
                strategy.reduce_gradients()
                rows.append(flat_grad(params))
        finally:
            for p, grad in zip(params, saved, strict=True):
                p.grad = grad
        return torch.stack(rows)

    def step_gradient(self, strategy: Any) -> tuple[list[torch.nn.Parameter],
                                                    torch.Tensor] | None:
        """The trainable parameters and the step's gradient over them; None before there is a
        memory, or when the gradient is not finite (16-mixed: the scaler skips that step)."""
        if self.buffer is None or not len(self.buffer):
            return None
        params = trainable(strategy.model)
        g = flat_grad(params)
        return (params, g) if bool(torch.isfinite(g).all()) else None

    def count(self, strategy: Any, projected: bool) -> None:
        self.steps[strategy.experience_index] += 1
        self.projected[strategy.experience_index] += int(projected)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "steps": self.steps, "projected": self.projected}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps, self.projected = list(state["steps"]), list(state["projected"])
        super().load_state_dict({k: v for k, v in state.items() if k in ("buffer", "capacity")})

    def results(self) -> dict[str, Any]:
        buffer = self.buffer
        return {"capacity": buffer.capacity if buffer else 0, "policy": self.config.policy,
                "selection": self.config.selection, "slots": len(buffer) if buffer else 0,
                "memory_batch": self.config.memory_batch, "steps": self.steps,
                "projected": self.projected}


class GEM(MemoryGradients):
    """GEM: the step's gradient projected onto the cone of the past tasks' memory gradients."""

    name = "gem"
    across_ranks = "replicated"  # buffer from the shared seed, memory gradients reduced
    Config = GEMConfig

    def after_backward(self, strategy: Any, **kwargs: Any) -> None:
        step = self.step_gradient(strategy)
        if step is None:
            return
        params, g = step
        buffer, generator = self.buffer, strategy.generator
        groups = []
        for t in buffer.task.unique().tolist():
            slots = (buffer.task == t).nonzero().flatten()
            slots = slots[torch.randperm(len(slots), generator=generator)]
            groups.append(self.batches(strategy, slots[: self.config.memory_batch]))
        memories = self.memory_gradients(strategy, params, groups)
        conflict = bool((memories @ g < 0).any())
        if conflict:
            set_flat_grad(params, solve_dual(g, memories, self.config.margin, self.config.eps))
        self.count(strategy, conflict)

    def results(self) -> dict[str, Any]:
        return {**super().results(), "margin": self.config.margin, "eps": self.config.eps}
