"""``der`` and ``derpp``: dark experience replay (Buzzega et al., "Dark Experience for General
Continual Learning: a Strong, Simple Baseline", NeurIPS 2020).

A reservoir buffer is filled during training: at each step the current task's rows of the batch
are offered to Algorithm R over every row seen so far, and a slot that keeps a row stores,
beside its reference (task, row, label), the model's outputs z for that row at that step (the
step's forward, before the update), never changed afterwards. Each step with a non-empty buffer
adds, on a memory batch M and (``derpp``) a second, independent one M',

    der:   α · mean_{(x, z) ∈ M} ‖f(x) − z‖²
    derpp: the above + β · mean_{(x', y') ∈ M'} ℓ(x', y')

the squared Euclidean distance of the paper's objective (Mammoth's code takes the mean over the
logits instead, ‖·‖² / dim z, which at 10 classes is a factor 10; on pair outputs of
2·joint_dim values it would leave the term at a few hundredths of a percent of the loss).

Adapted to pair tasks: f(x) is the pair's two joint embeddings as the heads give them, before
normalisation (``PairOutput.raw``), side by side (2·joint_dim values, the two rows of a
[2, joint_dim] output); ℓ is the task loss of the rows' own task, InfoNCE among M''s rows of that
task (the partner is the label), since tasks may pair other modalities. Memory rows are read back
per task, each task's rows as one batch of that task; rows weigh equally across tasks.
On class-incremental ``classify`` tasks, as in the paper: f(x) is the logits over the classes
grown when the row was stored (the classifier appends classes, so they are its first columns), and
only those columns are compared; ℓ is cross-entropy with the stored label over the classes now
known.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from comodal.errors import ConfigError
from comodal.platform.trainer import ClassifyOutput
from comodal.strategies.base import Strategy
from comodal.strategies.buffers import BufferBudget, ReplayBuffer
from comodal.strategies.replay import memory_batches


@dataclass
class DERConfig(BufferBudget):
    batch_size: int = 0  # rows of each memory batch; 0: the training batch size
    alpha: float = 0.3  # Mammoth's DER on seq-CIFAR-10, buffer 500 (models/config/der.yaml)

    strategy = "der"  # the name in error messages (a class attribute, not a config field)

    def __post_init__(self) -> None:
        where = f"strategy_args.{self.strategy}"
        self.check_budget(where)
        if self.batch_size < 0 or self.alpha < 0:
            raise ConfigError(f"{where}: batch_size and alpha must be >= 0, got "
                              f"{self.batch_size} and {self.alpha}")


@dataclass
class DERPPConfig(DERConfig):
    beta: float = 0.5  # Mammoth's DER++ (alpha 0.3, beta 0.5; models/config/derpp.yaml)

    strategy = "derpp"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.beta < 0:
            raise ConfigError(f"strategy_args.derpp.beta: must be >= 0, got {self.beta}")


def distilled(output: Any) -> torch.Tensor:
    """What DER stores and matches per row: a classify task's logits, or a pair's two raw
    joint embeddings side by side."""
    if isinstance(output, ClassifyOutput):
        return output.logits
    return torch.cat(output.raw, dim=1)


def squared_error(current: torch.Tensor, stored: torch.Tensor,
                  width: torch.Tensor) -> torch.Tensor:
    """Each row's squared distance ‖f(x) − z‖² over its first ``width`` columns (the classes
    it was stored with), ``stored`` padded beyond them."""
    columns = int(width.max())
    valid = (torch.arange(columns) < width[:, None]).to(current.device)
    error = (current[:, :columns].float() - stored[:, :columns]) ** 2
    return (error * valid).sum(1)


class DER(Strategy):
    """Dark experience replay: MSE to the outputs stored at insertion, on a memory batch."""

    name = "der"
    Config = DERConfig
    across_ranks = "replicated"  # outputs gathered full-batch on every rank; the shared seed
    kinds = ("pair", "classify")
    owns_buffer = True
    memory_batches = 1  # derpp: a second one for the task loss

    def __init__(self, config: DERConfig | None = None) -> None:
        super().__init__(config)
        self.buffer: ReplayBuffer | None = None
        self.outputs = torch.zeros(0, 0)  # per slot: distilled(output) at insertion, padded
        self.width = torch.zeros(0, dtype=torch.long)  # per slot: its valid columns
        # this step's rows to offer: (row indices, labels), the whole batch's
        self._offered: tuple[torch.Tensor, torch.Tensor] | None = None
        self._fresh: torch.Tensor | None = None  # the step's outputs of those rows
        self._memory: list[list[tuple[torch.Tensor, Any]]] = []  # (slots, batch) per draw

    def before_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        if self.buffer is None:
            self.buffer = ReplayBuffer(self.config.capacity(strategy.scenario), "reservoir")
        self.outputs = self.outputs.to(strategy.device)  # a resumed run's come from the CPU

    def before_training_iteration(self, strategy: Any, **kwargs: Any) -> None:
        """Note the batch's rows to offer and draw this step's memory batches, once per step
        (so that a strategy computing the gradient twice sees one loss)."""
        batch = strategy.mbatch
        self._offered = self._fresh = None
        if batch.get("task_id") == strategy.experience_index:  # not a joint run's older task
            # host copies once per step, before the step's work is queued on the device
            index = batch["index"].cpu()
            label = batch["label"].cpu() if "label" in batch else -torch.ones_like(index)
            self._offered = (index, label)
        self._memory = [self.draw(strategy) for _ in range(self.memory_batches)
                        if len(self.buffer)]

    def draw(self, strategy: Any) -> list[tuple[torch.Tensor, Any]]:
        """A memory batch: random slots, read back per task as batches of that task."""
        size = self.config.batch_size or strategy.train_mb_size
        return memory_batches(strategy, self.buffer, self.buffer.sample(size, strategy.generator))

    def after_forward(self, strategy: Any, **kwargs: Any) -> None:
        if self._offered is not None and self._fresh is None:  # the step's first forward
            self._fresh = distilled(strategy.outputs).detach().float()

    def before_backward(self, strategy: Any, **kwargs: Any) -> None:
        if self._memory and self.config.alpha:
            strategy.loss = strategy.loss + self.config.alpha * self.dark_loss(strategy)

    def dark_loss(self, strategy: Any) -> torch.Tensor:
        """Mean over the first memory batch's rows of their squared error to the stored
        outputs."""
        errors = [squared_error(distilled(strategy.forward(batch)), self.outputs[slots],
                                self.width[slots]) for slots, batch in self._memory[0]]
        return torch.cat(errors).mean()

    @torch.no_grad()
    def after_training_iteration(self, strategy: Any, **kwargs: Any) -> None:
        """Offer the step's rows; a kept one stores the step's outputs for it."""
        if self._offered is None:
            return
        index, label = self._offered
        slot = self.buffer.offer(strategy.experience_index, index, label, strategy.generator)
        kept = (slot >= 0).nonzero().flatten()
        if len(kept):
            self.store(slot[kept], self._fresh[kept.to(self._fresh.device)])

    def store(self, slots: torch.Tensor, values: torch.Tensor) -> None:
        """Write ``values`` (``[n, width]``) into ``slots``; the table grows to the buffer's
        length and the widest width so far (zeros past a slot's own width)."""
        rows, columns = len(self.buffer), max(self.outputs.shape[1], values.shape[1])
        self.outputs = F.pad(self.outputs, (0, columns - self.outputs.shape[1],
                                            0, rows - len(self.outputs)))
        self.width = F.pad(self.width, (0, rows - len(self.width)))
        self.outputs[slots] = F.pad(values, (0, columns - values.shape[1]))
        self.width[slots] = values.shape[1]

    def state_dict(self) -> dict[str, Any]:
        if self.buffer is None:
            return {}
        return {"buffer": self.buffer.state_dict(), "capacity": self.buffer.capacity,
                "outputs": self.outputs.cpu(), "width": self.width}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            self.buffer = ReplayBuffer(state["capacity"], "reservoir")
            self.buffer.load_state_dict(state["buffer"])
            self.outputs, self.width = state["outputs"], state["width"]

    def results(self) -> dict[str, Any]:
        buffer = self.buffer
        return {"capacity": buffer.capacity if buffer else 0,
                "slots": len(buffer) if buffer else 0,
                "slots_per_task": torch.bincount(buffer.task).tolist() if buffer else [],
                "alpha": self.config.alpha, "memory_batch": self.config.batch_size}


class DERPP(DER):
    """DER++: DER plus the task loss on a second memory batch, with the stored labels."""

    name = "derpp"
    Config = DERPPConfig
    memory_batches = 2

    def before_backward(self, strategy: Any, **kwargs: Any) -> None:
        super().before_backward(strategy, **kwargs)
        if self._memory and self.config.beta:
            groups = self._memory[1]
            rows = sum(len(slots) for slots, _ in groups)
            loss = sum(len(slots) / rows * strategy.task_loss(batch, strategy.forward(batch))
                       for slots, batch in groups)
            strategy.loss = strategy.loss + self.config.beta * loss

    def results(self) -> dict[str, Any]:
        return {**super().results(), "beta": self.config.beta}
