"""Every metric comodal reports: retrieval recall, zero-shot and class-incremental accuracy,
and the continual summaries, all derived from one matrix ``R[after_task, eval_task]``.

``R`` has rows 0..T (row 0 = before any training, row i = after task i) and columns 1..T
(stored 0-based). Tasks where a metric does not apply hold NaN and are left out of means.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def recall_at_k(similarity: torch.Tensor, ks: Sequence[int]) -> dict[int, float]:
    """Fraction of rows whose paired column (the diagonal) ranks within the top k.

    Ties count against the pair, so a collapsed model cannot score by accident."""
    positive = similarity.diagonal().unsqueeze(1)
    rank = (similarity >= positive).sum(1) - 1  # other candidates at least as close as the pair
    return {k: (rank < k).float().mean().item() for k in ks}


def retrieval_recalls(
    a: torch.Tensor, b: torch.Tensor, ks: Sequence[int], pool_size: int, draws: int, seed: int
) -> dict[str, float]:
    """Recall@k in both directions (a->b and b->a) with the CMCL protocol: ``pool_size``
    randomly drawn test pairs as the candidate pool, averaged over ``draws`` seeded draws,
    or all pairs once if there are no more than ``pool_size``."""
    n = len(a)
    if n <= pool_size:
        pools = [torch.arange(n)]
    else:
        generator = torch.Generator().manual_seed(seed)
        pools = [torch.randperm(n, generator=generator)[:pool_size] for _ in range(draws)]
    totals: dict[str, float] = {}
    for pool in pools:
        sim = a[pool] @ b[pool].T
        for direction, matrix in (("ab", sim), ("ba", sim.T)):
            for k, value in recall_at_k(matrix, ks).items():
                key = f"recall@{k}_{direction}"
                totals[key] = totals.get(key, 0.0) + value / len(pools)
    for k in ks:
        totals[f"recall@{k}"] = (totals[f"recall@{k}_ab"] + totals[f"recall@{k}_ba"]) / 2
    return totals


def accuracy(predicted: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of predictions equal to their label."""
    return predicted.eq(labels).float().mean().item()


def zero_shot_accuracy(
    embeddings: torch.Tensor, prototypes: torch.Tensor, labels: torch.Tensor
) -> float:
    """Accuracy of assigning each embedding to its most similar class prototype."""
    return accuracy((embeddings @ prototypes.T).argmax(1), labels)


def _nanmean(values: list[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else math.nan


def final_average(R: torch.Tensor) -> float:
    """Acc = mean_j R[T, j]."""
    return _nanmean(R[-1].tolist())


def average_incremental(R: torch.Tensor) -> float:
    """Avg incremental Acc = mean_i mean_{j<=i} R[i, j] over i = 1..T."""
    T = R.shape[1]
    return _nanmean([_nanmean(R[i, :i].tolist()) for i in range(1, T + 1)])


def bwt(R: torch.Tensor) -> float:
    """BWT = mean_{j<T} (R[T, j] - R[j, j])."""
    T = R.shape[1]
    return _nanmean([(R[T, j - 1] - R[j, j - 1]).item() for j in range(1, T)])


def forgetting(R: torch.Tensor) -> float:
    """Forgetting = mean_{j<T} (max_{j<=l<T} R[l, j] - R[T, j])."""
    T = R.shape[1]
    return _nanmean([(R[j:T, j - 1].max() - R[T, j - 1]).item() for j in range(1, T)])


def fwt(R: torch.Tensor) -> float:
    """FWT = mean_{j>1} (R[j-1, j] - R[0, j])."""
    T = R.shape[1]
    return _nanmean([(R[j - 1, j - 1] - R[0, j - 1]).item() for j in range(2, T + 1)])


def plasticity(R: torch.Tensor) -> float:
    """Plasticity = mean_j R[j, j]."""
    T = R.shape[1]
    return _nanmean([R[j, j - 1].item() for j in range(1, T + 1)])


SUMMARIES = {
    "acc": final_average,
    "avg_inc_acc": average_incremental,
    "bwt": bwt,
    "fwt": fwt,
    "forgetting": forgetting,
    "plasticity": plasticity,
}


def summarize(R: torch.Tensor) -> dict[str, float]:
    """All continual summaries of one metric matrix."""
    return {name: fn(R) for name, fn in SUMMARIES.items()}
