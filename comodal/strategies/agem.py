"""``agem``: averaged gradient episodic memory (Chaudhry, Ranzato, Rohrbach & Elhoseiny, ICLR
2019, "Efficient Lifelong Learning with A-GEM").

GEM's episodic memory (``gem``'s, filled the same way), but one constraint instead of one per
past task: each step a single batch of ``memory_batch`` rows is drawn from the whole memory,
its loss's gradient g_ref taken at the current weights, and the step's gradient g (reduced and
clipped by the trainer) is projected only when it would increase that loss:

  g̃ = g - (gᵀg_ref / g_refᵀg_ref) g_ref   if gᵀg_ref < 0,   g̃ = g otherwise.

Adapted to contrastive pair tasks: the drawn rows are grouped by task (a memory batch never
mixes modality pairs), each group's loss is the trainer's task loss of that task (InfoNCE
between its two modalities, negatives from the group's rows), weighted by the group's share of
the drawn rows, as ``er`` weighs its side batches; g_ref is the gradient of that sum. On
class-incremental ``classify`` tasks each group's loss is the cross-entropy over the classes
seen so far (the classifier grows; g_ref is taken on the current parameters). The gradient
vector is every trainable parameter's gradient, a missing one counted as zero.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from comodal.strategies.gem import MemoryConfig, MemoryGradients, set_flat_grad


@dataclass
class AGEMConfig(MemoryConfig):
    strategy = "agem"


class AGEM(MemoryGradients):
    """A-GEM: the step's gradient loses its component against one reference memory gradient."""

    name = "agem"
    across_ranks = "replicated"  # buffer and memory batch from the shared seed, gradient reduced
    Config = AGEMConfig

    def after_backward(self, strategy: Any, **kwargs: Any) -> None:
        step = self.step_gradient(strategy)
        if step is None:
            return
        params, g = step
        slots = self.buffer.sample(self.config.memory_batch, strategy.generator)
        (reference,) = self.memory_gradients(strategy, params, [self.batches(strategy, slots)])
        dot = g @ reference
        conflict = bool(dot < 0)
        if conflict:
            set_flat_grad(params, g - dot / (reference @ reference) * reference)
        self.count(strategy, conflict)
