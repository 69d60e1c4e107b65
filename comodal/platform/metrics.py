"""Every metric comodal reports: retrieval recall, zero-shot and class-incremental accuracy,
and the continual summaries, all derived from one matrix ``R[after_task, eval_task]``.

``R`` has rows 0..T (row 0 = before any training, row i = after task i) and columns 1..T
(stored 0-based). Tasks where a metric does not apply hold NaN and are left out of means.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch

from comodal.errors import DataError
from comodal.platform.sequences import parse_target

# class-incremental accuracy, and the error rates and intent-part accuracies of sequence tasks:
# Acc and Avg Acc pooled over test rows (of the intents seen so far)
POOLED = ("accuracy", "wer", "cer", "scenario_accuracy", "action_accuracy")


def _content_key(value: Any) -> Any:
    if isinstance(value, str):
        return value
    if isinstance(value, tuple):  # (waveform, sample_rate)
        wave, rate = value
        return _content_key(torch.as_tensor(wave)), rate
    tensor = torch.as_tensor(value)  # a digest, so the keys of a raw test set stay small
    digest = hashlib.blake2b(tensor.contiguous().numpy().tobytes(), digest_size=16).digest()
    return str(tensor.dtype), tuple(tensor.shape), digest


def content_ids(values: Sequence[Any] | torch.Tensor) -> torch.Tensor:
    """A group id per row, equal exactly when two rows hold identical content: strings as
    strings, tensor rows by exact equality, ``(waveform, rate)`` by the waveform's bytes and
    the rate. Retrieval counts a candidate of identical content as a positive too."""
    if isinstance(values, torch.Tensor):
        return torch.unique(values.reshape(len(values), -1), dim=0, return_inverse=True)[1]
    ids: dict[Any, int] = {}
    return torch.tensor([ids.setdefault(_content_key(v), len(ids)) for v in values],
                        dtype=torch.long)


def recall_at_k(similarity: torch.Tensor, ks: Sequence[int],
                positives: torch.Tensor | None = None) -> dict[int, float]:
    """Fraction of query rows whose best positive ranks within the top k candidates.

    ``positives[i, j]`` says whether candidate j is a correct answer to query i (default: only
    the diagonal, its pair). The rank is the number of non-positive candidates at least as
    similar as the best positive, so ties with a different candidate count against the pair
    and a collapsed model cannot score by accident. A row with any non-finite similarity is
    a miss."""
    if positives is None:
        positives = torch.eye(len(similarity), dtype=torch.bool, device=similarity.device)
    best = similarity.masked_fill(~positives, -math.inf).amax(1, keepdim=True)
    rank = ((similarity >= best) & ~positives).sum(1)
    finite = torch.isfinite(similarity).all(1)
    return {k: ((rank < k) & finite).float().mean().item() for k in ks}


def retrieval_recalls(
    a: torch.Tensor, b: torch.Tensor, ks: Sequence[int], pool_size: int, draws: int, seed: int,
    groups: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> dict[str, float]:
    """Recall@k in both directions (a->b and b->a) with the CMCL protocol: ``pool_size``
    randomly drawn test pairs as the candidate pool, averaged over ``draws`` seeded draws,
    or all pairs once if there are no more than ``pool_size``. Candidates rank by the dot
    products a bᵀ of the rows as given: the trainer passes the model's scored embeddings
    (unit-norm under ``model.score: cosine``, the heads' raw outputs under ``dot``).

    ``groups`` (the ``content_ids`` of the a and b rows) makes duplicate partners count as
    COCO/Flickr retrieval counts any of an image's captions: for query row i, candidate j is
    a positive too when row j's pair repeats row i's on either side (same caption,
    transcript or feature row as i's partner, or the same content as the query, so that j's
    partner is equally correct). Ties with other candidates still count against the pair."""
    n = len(a)
    if n <= pool_size:
        pools = [torch.arange(n)]
    else:
        generator = torch.Generator().manual_seed(seed)
        pools = [torch.randperm(n, generator=generator)[:pool_size] for _ in range(draws)]
    totals: dict[str, float] = {}
    for pool in pools:
        sim = a[pool] @ b[pool].T
        positives = None
        if groups is not None:
            ga, gb = (g[pool] for g in groups)
            positives = (ga[:, None] == ga[None, :]) | (gb[:, None] == gb[None, :])
        for direction, matrix in (("ab", sim), ("ba", sim.T)):
            # the positive relation is symmetric, so both directions share it
            for k, value in recall_at_k(matrix, ks, positives).items():
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
    """Accuracy of assigning each embedding to the class prototype with the largest dot
    product (cosine similarity when both are unit-norm, the raw score under dot scoring)."""
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


def pooled_accuracy(R: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
    """Accuracy after each task i = 1..T over all test rows of tasks 1..i (the classes seen so
    far), as continuum and CL_SLU define it: per-task accuracies weighted by test rows."""
    n = torch.as_tensor(sizes, dtype=R.dtype)
    out = []
    for i in range(1, R.shape[1] + 1):
        row, weight = R[i, :i], n[:i]
        kept = ~row.isnan()
        out.append((row[kept] * weight[kept]).sum() / weight[kept].sum())
    return torch.stack(out)


SUMMARIES = {
    "acc": final_average,
    "avg_inc_acc": average_incremental,
    "bwt": bwt,
    "fwt": fwt,
    "forgetting": forgetting,
    "plasticity": plasticity,
}


def summarize(R: torch.Tensor, sizes: Sequence[int] | None = None) -> dict[str, float]:
    """All continual summaries of one metric matrix; with each task's test row count
    ``sizes``, Acc (Last Acc) and Avg incremental Acc are pooled over test rows."""
    summary = {name: fn(R) for name, fn in SUMMARIES.items()}
    if sizes is not None:
        pooled = pooled_accuracy(R, sizes).tolist()
        summary["acc"], summary["avg_inc_acc"] = pooled[-1], _nanmean(pooled)
    return summary


def summaries(matrices: dict[str, torch.Tensor],
              sizes: Sequence[int]) -> dict[str, dict[str, float]]:
    """The summaries of every metric of a run, those in ``POOLED`` pooled over test rows."""
    return {m: summarize(R, sizes if m in POOLED else None) for m, R in matrices.items()}


def _matches(predicted: Sequence[str], reference: Sequence[str]) -> float:
    """Fraction of rows whose predicted field equals the reference's exactly."""
    return sum(p == r for p, r in zip(predicted, reference, strict=True)) / len(reference)


def _slot_f1(predicted: Sequence[list[tuple[str, str]]],
             reference: Sequence[list[tuple[str, str]]]) -> float:
    """Micro F1 of exact ``(type, value)`` slots counted as multisets per row:
    2 TP / (predicted + reference slots); 1.0 when neither side has any."""
    hits = sum(sum((Counter(p) & Counter(r)).values())
               for p, r in zip(predicted, reference, strict=True))
    total = sum(map(len, predicted)) + sum(map(len, reference))
    return 2 * hits / total if total else 1.0


def sequence_metrics(predicted: Sequence[str], reference: Sequence[str],
                     slots: bool = False) -> dict[str, float]:
    """The seq2seq SLU metrics of decoded targets against the true ones: intent "accuracy"
    (exact first field), corpus-level "wer" and "cer" of the transcriptions (torchmetrics; an
    empty predicted text counts as deletions) and, with ``slots`` (SLURP), scenario and action
    accuracy (the intent split at its first "_") and "slot_f1". NaN for no rows."""
    # torchmetrics' package import takes seconds (it loads torchvision): only seq2seq pays it
    from torchmetrics.functional.text import char_error_rate, word_error_rate

    if len(predicted) != len(reference):
        raise DataError(f"{len(predicted)} predicted targets for {len(reference)} references")
    keys = ["accuracy", "wer", "cer"]
    if slots:
        keys += ["scenario_accuracy", "action_accuracy", "slot_f1"]
    if not reference:
        return dict.fromkeys(keys, math.nan)
    pred, ref = [parse_target(p) for p in predicted], [parse_target(r) for r in reference]
    for i, r in enumerate(ref):
        if not r.text:
            raise DataError(f"reference target {i} ({reference[i]!r}) has no transcription "
                            "after its last _SEP; WER and CER need one")
    texts = [p.text for p in pred], [r.text for r in ref]
    out = {"accuracy": _matches([p.intent for p in pred], [r.intent for r in ref]),
           "wer": float(word_error_rate(*texts)), "cer": float(char_error_rate(*texts))}
    if slots:
        for name, part in (("scenario_accuracy", 0), ("action_accuracy", 2)):
            out[name] = _matches([p.intent.partition("_")[part] for p in pred],
                                 [r.intent.partition("_")[part] for r in ref])
        out["slot_f1"] = _slot_f1([p.slots for p in pred], [r.slots for r in ref])
    return out
