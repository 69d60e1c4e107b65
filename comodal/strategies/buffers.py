"""Replay buffers: which training rows to keep after each task, under a fixed budget.

A slot is a reference to a row (task, row index in that task's training data) with its label,
so the buffer holds four small integer tensors and never a copy of inputs or model tensors;
the row's sample (audio, transcript, features) is read back from the scenario when replayed.

Avalanche's storage policies (``ClassBalancedBuffer``, ``ExperienceBalancedBuffer``,
``ReservoirSamplingBuffer``, ``HerdingSelectionStrategy``) are not used: they keep
``AvalancheDataset`` subsets of ``strategy.experience.dataset`` and compute herding features by
calling the model on ``x`` unpacked from positional minibatches, neither of which fits
comodal's column datasets of dict samples, and pair tasks reuse label ids across datasets, so
a class is (task, label) here. The policies are small; they are written out below.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from comodal.config import check_choice
from comodal.errors import ConfigError

POLICIES = ("class", "experience", "reservoir")
SELECTIONS = ("random", "mean", "herding")


# ----------------------------------------------------------------------------- selection
def random_order(n: int, generator: torch.Generator) -> torch.Tensor:
    """Rows 0..n-1 in a seeded random order."""
    return torch.randperm(n, generator=generator)


def mean_order(features: torch.Tensor) -> torch.Tensor:
    """Rows by distance of their feature to the group's mean feature, closest first."""
    return (features - features.mean(0)).norm(dim=1).argsort(stable=True)


def herding_order(features: torch.Tensor, k: int) -> torch.Tensor:
    """iCaRL herding (Rebuffi et al. 2017): the i-th pick is the row that brings the mean of
    the picks closest to the group's mean feature; ``k`` picks."""
    mean = features.mean(0)
    picked: list[int] = []
    total = torch.zeros_like(mean)
    available = torch.ones(len(features), dtype=torch.bool)
    for i in range(min(k, len(features))):
        candidate = (total + features) / (i + 1)
        distance = (mean - candidate).norm(dim=1).masked_fill(~available, float("inf"))
        best = int(distance.argmin())
        picked.append(best)
        available[best] = False
        total += features[best]
    return torch.tensor(picked, dtype=torch.long)


def quotas(capacity: int, groups: list[tuple[int, int]]) -> dict[tuple[int, int], int]:
    """An even share of ``capacity`` per group, the remainder to the earliest groups."""
    share, extra = divmod(capacity, len(groups)) if groups else (0, 0)
    return {g: share + (1 if i < extra else 0) for i, g in enumerate(groups)}


# ----------------------------------------------------------------------------- buffer
@dataclass
class BufferBudget:
    """A buffer's budget: ``size`` slots, or ``fraction`` of the scenario's training rows."""

    size: int = 0
    fraction: float = 0.02

    def check_budget(self, where: str) -> None:
        if self.size < 0 or not 0 <= self.fraction <= 1 or (self.size == 0 and self.fraction == 0):
            raise ConfigError(f"{where}: give size (slots, > 0) or fraction (of the training "
                              f"rows, in (0, 1]), got size={self.size}, fraction={self.fraction}")

    def capacity(self, scenario: Any) -> int:
        """Slots for ``scenario``: ``size``, or ``fraction`` of all its tasks' training rows."""
        if self.size:
            return self.size
        return max(1, round(self.fraction * sum(len(t.train) for t in scenario.tasks)))


@dataclass
class BufferConfig(BufferBudget):
    """A replay buffer: its budget, how it shares the slots and how it picks rows."""

    policy: str = "class"  # class (balanced per class) | experience (per task) | reservoir
    selection: str = "random"  # random | mean (closest to the class mean) | herding

    def check(self, where: str) -> None:
        check_choice(f"{where}.policy", self.policy, POLICIES)
        check_choice(f"{where}.selection", self.selection, SELECTIONS)
        self.check_budget(where)
        if self.policy == "reservoir" and self.selection != "random":
            raise ConfigError(f"{where}.selection: reservoir sampling selects at random, got "
                              f"{self.selection!r}")


class ReplayBuffer:
    """Slots ``task``, ``index`` (row of that task's training data), ``label`` (-1 without
    labels) and ``rank`` (priority within its group: lower is kept longer)."""

    def __init__(self, capacity: int, policy: str = "class", selection: str = "random") -> None:
        self.capacity, self.policy, self.selection = capacity, policy, selection
        self.task = torch.zeros(0, dtype=torch.long)
        self.index = torch.zeros(0, dtype=torch.long)
        self.label = torch.zeros(0, dtype=torch.long)
        self.rank = torch.zeros(0, dtype=torch.long)
        self.seen = 0  # rows offered so far (reservoir sampling)

    def __len__(self) -> int:
        return len(self.task)

    def groups(self) -> torch.Tensor:
        """Each slot's group: (task, label) for ``class``, (task, -1) otherwise."""
        label = self.label if self.policy == "class" else torch.full_like(self.label, -1)
        return torch.stack([self.task, label], dim=1)

    def add_task(self, task: int, labels: torch.Tensor | None, features: Any,
                 generator: torch.Generator) -> None:
        """Offer every training row of ``task``. ``features()`` gives their ``[n, d]``
        features and is called only when the selection needs them."""
        n = len(labels) if labels is not None else features().shape[0]
        labels = labels if labels is not None else torch.full((n,), -1, dtype=torch.long)
        if self.policy == "class" and bool((labels < 0).any()):
            raise ConfigError(f"replay buffer: policy 'class' needs labels, and task {task} "
                              "has none (use policy: experience or reservoir)")
        if self.policy == "reservoir":
            self._reservoir(task, labels, generator)
            return
        key = labels if self.policy == "class" else torch.full_like(labels, -1)
        new_groups = [(task, int(c)) for c in key.unique().tolist()]
        old_groups = [tuple(g) for g in self.groups().unique(dim=0).tolist()] if len(self) else []
        quota = quotas(self.capacity, old_groups + new_groups)
        keep = torch.tensor([int(self.rank[i]) < quota[tuple(g)]
                             for i, g in enumerate(self.groups().tolist())], dtype=torch.bool)
        parts = [(self.task[keep], self.index[keep], self.label[keep], self.rank[keep])]
        feats = features() if self.selection != "random" else None
        for group in new_groups:
            rows = (key == group[1]).nonzero().flatten()
            order = self._order(rows, feats, quota[group], generator)[: quota[group]]
            chosen = rows[order]
            parts.append((torch.full_like(chosen, task), chosen, labels[chosen],
                          torch.arange(len(chosen))))
        columns = (torch.cat(p) for p in zip(*parts, strict=True))
        self.task, self.index, self.label, self.rank = columns

    def _order(self, rows: torch.Tensor, feats: torch.Tensor | None, k: int,
               generator: torch.Generator) -> torch.Tensor:
        if self.selection == "random":
            return random_order(len(rows), generator)
        if self.selection == "mean":
            return mean_order(feats[rows])
        return herding_order(feats[rows], k)

    def _reservoir(self, task: int, labels: torch.Tensor, generator: torch.Generator) -> None:
        """Every row of the task offered once, in a seeded order."""
        order = random_order(len(labels), generator)
        self.offer(task, order, labels[order], generator)

    def offer(self, task: int, rows: torch.Tensor, labels: torch.Tensor,
              generator: torch.Generator) -> torch.Tensor:
        """Algorithm R (Vitter 1985) over the stream of rows offered so far, in order: the
        first ``capacity`` rows fill the slots, then row number s of the stream replaces a
        random slot with probability capacity / s. Returns each row's slot after the offer,
        -1 for a row not kept or displaced by a later row of the same offer."""
        filled = len(self)
        free = min(len(rows), self.capacity - filled)
        owner = {filled + i: i for i in range(free)}  # slot -> position in ``rows``
        for i in range(free, len(rows)):
            j = int(torch.randint(self.seen + i + 1, (1,), generator=generator))
            if j < self.capacity:
                owner[j] = i
        self.seen += len(rows)
        slot = torch.full((len(rows),), -1, dtype=torch.long)
        if not owner:
            return slot
        slots, picked = torch.tensor(list(owner)), torch.tensor(list(owner.values()))
        slot[picked] = slots
        grown = torch.zeros(free, dtype=torch.long)
        self.task, self.index, self.label = (torch.cat([column, grown])
                                             for column in (self.task, self.index, self.label))
        self.rank = torch.zeros_like(self.task)
        self.task[slots], self.index[slots], self.label[slots] = task, rows[picked], labels[picked]
        return slot

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """Up to ``n`` distinct slots, at random."""
        return torch.randperm(len(self), generator=generator)[:n]

    def state_dict(self) -> dict[str, Any]:
        return {"task": self.task, "index": self.index, "label": self.label, "rank": self.rank,
                "seen": self.seen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)

    def nbytes(self) -> int:
        """Bytes held by the slots."""
        return sum(t.element_size() * t.numel() for t in (self.task, self.index, self.label,
                                                          self.rank))
