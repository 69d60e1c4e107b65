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


def test_an_all_nan_similarity_scores_zero_not_a_perfect_hit() -> None:
    nan = float("nan")
    assert metrics.recall_at_k(torch.full((4, 4), nan), [1, 5]) == {1: 0.0, 5: 0.0}
    sim = torch.eye(4)
    sim[2, 3] = nan  # one non-finite similarity makes that query row a miss
    assert metrics.recall_at_k(sim, [1, 4])[1] == pytest.approx(0.75)
    out = metrics.retrieval_recalls(torch.full((6, 3), nan), torch.eye(6, 3), [1, 5],
                                    pool_size=1000, draws=5, seed=0)
    assert out["recall@1"] == 0.0 and out["recall@5"] == 0.0


def test_content_ids_group_identical_strings_rows_and_waveforms() -> None:
    assert metrics.content_ids(["stop", "go", "stop", "Stop"]).tolist() == [0, 1, 0, 2]
    rows = torch.tensor([[1.0, 2.0], [1.0, 2.0], [1.0, 2.5]])
    ids = metrics.content_ids(rows)
    assert ids[0] == ids[1] != ids[2]
    wave = torch.tensor([[0.1, -0.2, 0.3]])
    waves = [(wave, 16000), (wave.clone(), 16000), (wave, 8000), (wave + 1e-7, 16000)]
    assert metrics.content_ids(waves).tolist() == [0, 0, 1, 2]


def test_a_candidate_identical_to_the_partner_is_a_positive() -> None:
    # images 0 and 1 share their caption (text group 0); image 2 has its own caption
    sim = torch.tensor([
        [0.5, 0.9, 0.1],   # image 0 is closest to text 1: the same caption as its own
        [0.9, 0.5, 0.1],
        [0.1, 0.2, 0.8],
    ])
    ga, gb = torch.tensor([0, 1, 2]), torch.tensor([0, 0, 1])
    positives = (ga[:, None] == ga[None, :]) | (gb[:, None] == gb[None, :])
    assert metrics.recall_at_k(sim, [1], positives)[1] == 1.0
    assert metrics.recall_at_k(sim, [1])[1] == pytest.approx(1 / 3)  # without the groups
    # text -> image: image 1's caption repeats text 0's, so image 1 answers text 0 as well
    assert metrics.recall_at_k(sim.T, [1], positives.T)[1] == 1.0


def test_a_tie_with_a_different_candidate_still_counts_against_the_pair() -> None:
    sim = torch.tensor([
        [0.7, 0.7, 0.7],   # ties with its duplicate (1) and with a different caption (2)
        [0.2, 0.9, 0.1],
        [0.1, 0.2, 0.8],
    ])
    gb = torch.tensor([0, 0, 1])
    positives = torch.eye(3, dtype=torch.bool) | (gb[:, None] == gb[None, :])
    assert metrics.recall_at_k(sim, [1, 2], positives) == pytest.approx({1: 2 / 3, 2: 1.0})


def test_retrieval_with_groups_counts_duplicate_partners_in_drawn_pools_too() -> None:
    # 40 pairs, 10 captions each shared by 4 rows; a perfect model: every embedding is the
    # one-hot of its caption, so identical captions tie exactly
    groups = torch.arange(40) % 10
    a = b = torch.eye(10)[groups]
    ids = (torch.arange(40), groups)
    for pool in (1000, 12):
        out = metrics.retrieval_recalls(a, b, [1], pool_size=pool, draws=3, seed=0, groups=ids)
        assert out["recall@1_ab"] == 1.0 and out["recall@1_ba"] == 1.0
    assert metrics.retrieval_recalls(a, b, [1], 1000, 3, 0)["recall@1"] == 0.0


def test_pooled_accuracy_weights_tasks_by_their_test_rows() -> None:
    # FSC's class-incremental split: 4 intents, then 3 per task, 10 test rows per intent
    sizes = [40] + [30] * 9
    final = torch.tensor([0.2] + [0.8] * 9)
    R = torch.zeros(11, 10)
    R[10] = final
    assert metrics.final_average(R) == pytest.approx(0.740)  # tasks weighted equally
    assert metrics.pooled_accuracy(R, sizes)[-1] == pytest.approx((0.2 * 40 + 0.8 * 270) / 310)
    assert metrics.summarize(R, sizes)["acc"] == pytest.approx(0.7226, abs=1e-4)
    R3 = torch.tensor([[0.0, 0.0, 0.0], [0.9, 0.0, 0.0], [0.5, 0.8, 0.0], [0.4, 0.6, 0.9]])
    pooled = [0.9, (0.5 * 40 + 0.8 * 30) / 70, (0.4 * 40 + 0.6 * 30 + 0.9 * 30) / 100]
    summary = metrics.summarize(R3, [40, 30, 30])
    assert summary["acc"] == pytest.approx(pooled[-1])
    assert summary["avg_inc_acc"] == pytest.approx(sum(pooled) / 3)
    assert summary["bwt"] == pytest.approx(metrics.bwt(R3))  # per-task measures unchanged
