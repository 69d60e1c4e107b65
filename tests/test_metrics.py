"""Metrics against values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from comodal.platform import metrics

# R[after_task, eval_task]: row 0 before training, rows 1..3 after each of 3 tasks.
R = torch.tensor([
    [0.10, 0.20, 0.05],
    [0.80, 0.30, 0.10],
    [0.60, 0.90, 0.20],
    [0.50, 0.70, 0.95],
])


def test_summaries_equal_hand_computed_values() -> None:
    assert metrics.final_average(R) == pytest.approx((0.50 + 0.70 + 0.95) / 3)
    assert metrics.average_incremental(R) == pytest.approx(
        (0.80 + (0.60 + 0.90) / 2 + (0.50 + 0.70 + 0.95) / 3) / 3
    )
    assert metrics.bwt(R) == pytest.approx(((0.50 - 0.80) + (0.70 - 0.90)) / 2)
    # task 1 peaked at 0.80 (after task 1), task 2 at 0.90 (after task 2)
    assert metrics.forgetting(R) == pytest.approx(((0.80 - 0.50) + (0.90 - 0.70)) / 2)
    assert metrics.fwt(R) == pytest.approx(((0.30 - 0.20) + (0.20 - 0.05)) / 2)
    assert metrics.plasticity(R) == pytest.approx((0.80 + 0.90 + 0.95) / 3)


def test_forgetting_uses_the_best_earlier_row_not_the_diagonal() -> None:
    R2 = torch.tensor([[0.0, 0.0, 0.0], [0.5, 0.0, 0.0], [0.9, 0.4, 0.0], [0.6, 0.4, 0.3]])
    assert metrics.forgetting(R2) == pytest.approx(((0.9 - 0.6) + (0.4 - 0.4)) / 2)
    assert metrics.bwt(R2) == pytest.approx(((0.6 - 0.5) + (0.4 - 0.4)) / 2)


def test_nan_columns_are_left_out() -> None:
    nan = float("nan")
    R3 = torch.tensor([[0.1, nan], [0.8, nan], [0.6, nan]])
    assert metrics.final_average(R3) == pytest.approx(0.6)
    assert metrics.bwt(R3) == pytest.approx(-0.2)
    assert math.isnan(metrics.summarize(torch.full((3, 2), nan))["acc"])


def test_recall_at_k_on_a_known_similarity_matrix() -> None:
    sim = torch.tensor([
        [0.9, 0.1, 0.2],   # pair ranks 1st
        [0.8, 0.5, 0.1],   # pair ranks 2nd
        [0.7, 0.6, 0.1],   # pair ranks 3rd
    ])
    assert metrics.recall_at_k(sim, [1, 2, 3]) == pytest.approx({1: 1 / 3, 2: 2 / 3, 3: 1.0})


def test_ties_count_against_the_pair() -> None:
    assert metrics.recall_at_k(torch.ones(4, 4), [1, 3])[1] == 0.0


def test_retrieval_uses_every_item_when_the_pool_is_larger() -> None:
    a = torch.eye(4)
    b = torch.eye(4)[[0, 1, 3, 2]]  # items 2 and 3 are swapped on the b side
    out = metrics.retrieval_recalls(a, b, [1], pool_size=1000, draws=5, seed=0)
    assert out["recall@1_ab"] == pytest.approx(0.5)
    assert out["recall@1_ba"] == pytest.approx(0.5)
    assert out["recall@1"] == pytest.approx(0.5)


def test_retrieval_pools_are_seeded_draws_of_the_pool_size() -> None:
    torch.manual_seed(0)
    a = torch.nn.functional.normalize(torch.randn(50, 8), dim=1)
    b = a + 0.3 * torch.randn(50, 8)
    one = metrics.retrieval_recalls(a, b, [1, 5], pool_size=20, draws=3, seed=7)
    two = metrics.retrieval_recalls(a, b, [1, 5], pool_size=20, draws=3, seed=7)
    assert one == two
    # smaller pools are easier than the full set of 50 candidates
    full = metrics.retrieval_recalls(a, b, [1, 5], pool_size=50, draws=3, seed=7)
    assert one["recall@1"] >= full["recall@1"]


def test_zero_shot_accuracy() -> None:
    protos = torch.eye(3)
    z = torch.tensor([[1.0, 0.1, 0.0], [0.0, 0.2, 0.9], [0.6, 0.5, 0.0]])
    assert metrics.zero_shot_accuracy(z, protos, torch.tensor([0, 2, 1])) == pytest.approx(2 / 3)
