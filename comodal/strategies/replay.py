"""``er``: experience replay. After each task a buffer keeps references to some of its training
rows; every later step draws a memory batch from it.

Memory rows of tasks with the current task's kind and modalities join the training batch (one
collation; ``batch["rehearsal"]`` marks them), so a loss over the batch sees them as
negatives and positives like any other row. Rows of tasks with another modality pair cannot
share the batch: they form side batches, one per task, whose own task losses are added with
weight ``weight`` (their outputs are kept in ``strategy.side_outputs`` for distillation).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from comodal.core.data import BatchLoader, gather_parts
from comodal.errors import ConfigError
from comodal.strategies.base import Strategy
from comodal.strategies.buffers import BufferConfig, ReplayBuffer


@dataclass
class ERConfig(BufferConfig):
    batch_size: int = 0  # memory rows per step; 0: the training batch size
    weight: float = 1.0  # of the side batches' losses (memory of other modality pairs)

    def __post_init__(self) -> None:
        self.check(f"strategy_args.{self.strategy}")
        if self.batch_size < 0 or self.weight < 0:
            raise ConfigError(f"strategy_args.{self.strategy}: batch_size and weight must be "
                              f">= 0, got {self.batch_size} and {self.weight}")

    strategy = "er"  # the name in error messages (a class attribute, not a config field)


def memory_batches(trainer: Any, buffer: ReplayBuffer,
                   slots: torch.Tensor) -> list[tuple[torch.Tensor, Any]]:
    """The rows of ``slots`` read back through the scenario (cached features of frozen
    backbones), one training batch per task, so that no batch mixes modality pairs: each
    task's slots and its batch, on the device."""
    out = []
    for t in buffer.task[slots].unique().tolist():
        mine = slots[buffer.task[slots] == t]
        loader = trainer.ordered_loader(t)
        batch = gather_parts([(loader.dataset, buffer.index[mine])], loader.collate)
        batch["task_id"] = t
        out.append((mine, trainer.as_batch(batch)))
    return out


class ReplayLoader:
    """The training loader's batches with memory rows: compatible rows appended to the batch
    (``batch["rehearsal"]`` marks them, ``batch["slots"]`` names their buffer slots), the
    others as ``batch["replay"]``, a list of side batches."""

    def __init__(self, base: BatchLoader, trainer: Any, buffer: ReplayBuffer,
                 memory_batch: int) -> None:
        self.base, self.trainer, self.buffer = base, trainer, buffer
        self.memory_batch = memory_batch

    def __len__(self) -> int:
        return len(self.base)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        tasks = self.trainer.scenario.tasks
        current = tasks[self.base.task_id]
        collate = self.base.collate
        for rows in self.base.batch_indices():
            slots = self.buffer.sample(self.memory_batch, self.trainer.generator)
            parts, side, joined = [(self.base.dataset, rows)], [], []
            for t in self.buffer.task[slots].unique().tolist():
                mine = slots[self.buffer.task[slots] == t]
                index = self.buffer.index[mine]
                old = tasks[t]
                if old.kind == current.kind and old.modalities == current.modalities:
                    parts.append((old.train, index))
                    joined.append(mine)
                else:
                    side_batch = gather_parts([(old.train, index)], collate)
                    side_batch["task_id"] = t
                    side.append(side_batch)
            batch = gather_parts(parts, collate)
            batch["task_id"] = self.base.task_id
            batch["rehearsal"] = torch.arange(len(batch["index"])) >= len(rows)
            # the buffer slot of each rehearsal row, in order (seq_kd's pseudo-targets)
            batch["slots"] = torch.cat(joined) if joined else torch.zeros(0, dtype=torch.long)
            batch["replay"] = side
            yield batch


class ER(Strategy):
    """Experience replay with a class-balanced, experience-balanced or reservoir buffer."""

    name = "er"
    across_ranks = "replicated"  # selection from gathered features and the shared seed
    Config = ERConfig
    kinds = ("pair", "classify", "sequence")
    owns_buffer = True

    def __init__(self, config: ERConfig | None = None) -> None:
        super().__init__(config)
        self.buffer: ReplayBuffer | None = None

    def before_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        if self.buffer is None:
            cfg = self.config
            unlabelled = [t.name for t in strategy.scenario.tasks if t.train.labels is None]
            if cfg.policy == "class" and unlabelled:
                raise ConfigError(f"strategy_args.{self.name}.policy: 'class' balances the "
                                  f"buffer by label, and task {unlabelled[0]!r} has no labels "
                                  "(use policy: experience or reservoir)")
            self.buffer = ReplayBuffer(cfg.capacity(strategy.scenario), cfg.policy, cfg.selection)

    def wrap_loader(self, strategy: Any, loader: Any) -> Any:
        """The task's batches with memory rows, once the buffer holds some."""
        if self.buffer is not None and len(self.buffer) and isinstance(loader, BatchLoader):
            size = self.config.batch_size or strategy.train_mb_size
            return ReplayLoader(loader, strategy, self.buffer, size)
        return loader

    def after_forward(self, strategy: Any, **kwargs: Any) -> None:
        """Forward the side batches (memory of other modality pairs) with the batch."""
        side = [strategy.to_device(b) for b in strategy.mbatch.get("replay") or []]
        strategy.side_outputs = [(batch, strategy.forward(batch)) for batch in side]

    def before_backward(self, strategy: Any, **kwargs: Any) -> None:
        outputs = strategy.side_outputs
        if outputs:
            rows = sum(len(batch["index"]) for batch, _ in outputs)
            side = sum(len(batch["index"]) / rows * strategy.task_loss(batch, out)
                       for batch, out in outputs)
            strategy.loss = strategy.loss + self.config.weight * side

    @torch.no_grad()
    def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        index = strategy.experience_index
        task = strategy.scenario.tasks[index]
        modalities = task.modalities if task.kind == "pair" else task.modalities[:1]

        def features() -> torch.Tensor:
            """Each row's joint embeddings as the model scores them (unit-norm, or raw under
            dot scoring), side by side: ``mean`` and ``herding`` select in that space."""
            return torch.cat([torch.cat([strategy.model.encode(batch, m) for m in modalities],
                                        dim=1).cpu()
                              for batch in strategy.statistics_pass(index)])

        self.buffer.add_task(index, task.train.labels, features, strategy.generator)

    def state_dict(self) -> dict[str, Any]:
        return {} if self.buffer is None else {"buffer": self.buffer.state_dict(),
                                               "capacity": self.buffer.capacity}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            cfg = self.config
            self.buffer = ReplayBuffer(state["capacity"], cfg.policy, cfg.selection)
            self.buffer.load_state_dict(state["buffer"])

    def results(self) -> dict[str, Any]:
        buffer = self.buffer
        return {"capacity": buffer.capacity if buffer else 0, "policy": self.config.policy,
                "selection": self.config.selection, "slots": len(buffer) if buffer else 0,
                "memory_batch": self.config.batch_size}
