"""Losses against direct formulas, forward and backward."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from comodal.platform.losses import (
    MM,
    FeatureDistill,
    InfoNCE,
    PredictionDistill,
    RelationDistill,
    SupCon,
)


def _direct_infonce(a: torch.Tensor, b: torch.Tensor, scale: float, symmetric: bool):
    n = len(a)
    total = 0.0
    for i in range(n):
        row = [math.exp(scale * float(a[i] @ b[j])) for j in range(n)]
        total += -math.log(row[i] / sum(row))
    forward = total / n
    if not symmetric:
        return forward
    total = 0.0
    for j in range(n):
        col = [math.exp(scale * float(a[i] @ b[j])) for i in range(n)]
        total += -math.log(col[j] / sum(col))
    return (forward + total / n) / 2


def test_infonce_equals_the_direct_formula() -> None:
    torch.manual_seed(0)
    a = F.normalize(torch.randn(5, 4), dim=1)
    b = F.normalize(torch.randn(5, 4), dim=1)
    scale = torch.tensor(7.0)
    for symmetric in (True, False):
        got = InfoNCE(symmetric)(a, b, scale).item()
        assert abs(got - _direct_infonce(a, b, 7.0, symmetric)) < 1e-5


def test_infonce_gradient_matches_autograd_of_the_direct_form() -> None:
    torch.manual_seed(1)
    a = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    scale = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, y, s: InfoNCE(True)(x, y, s), (a, b, scale))
    # direct: -mean log softmax of the diagonal, both directions
    logits = scale * a @ b.T
    direct = -(logits.log_softmax(1).diagonal().mean() + logits.log_softmax(0).diagonal().mean())
    direct = direct / 2
    g_direct = torch.autograd.grad(direct, (a, b, scale))
    g_module = torch.autograd.grad(InfoNCE(True)(a, b, scale), (a, b, scale))
    for x, y in zip(g_direct, g_module, strict=True):
        assert torch.allclose(x, y)


def test_supcon_equals_the_direct_formula() -> None:
    torch.manual_seed(2)
    z = F.normalize(torch.randn(6, 4), dim=1)
    labels = torch.tensor([0, 1, 0, 2, 1, 0])  # anchor 3 has no positive and is skipped
    t = 0.5
    losses = []
    for i in range(6):
        positives = [p for p in range(6) if p != i and labels[p] == labels[i]]
        if not positives:
            continue
        denom = sum(math.exp(float(z[i] @ z[a]) / t) for a in range(6) if a != i)
        losses.append(-sum(math.log(math.exp(float(z[i] @ z[p]) / t) / denom)
                           for p in positives) / len(positives))
    assert abs(SupCon(t)(z, labels).item() - sum(losses) / len(losses)) < 1e-5


def test_supcon_without_positives_is_zero_not_nan() -> None:
    z = F.normalize(torch.randn(4, 3), dim=1).requires_grad_()
    loss = SupCon(0.1)(z, torch.arange(4))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(z.grad).all()


def test_prediction_distill_is_the_tempered_kl_times_the_squared_temperature() -> None:
    """Logits (0, 0) against (2 ln 3, 0) at τ = 2: p = (1/2, 1/2), q = (3/4, 1/4)."""
    student, teacher = torch.zeros(1, 2), torch.tensor([[2 * math.log(3.0), 0.0]])
    kl = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert abs(PredictionDistill(2.0)(student, teacher).item() - 4 * kl) < 1e-6


def test_feature_distill_is_the_mean_squared_error() -> None:
    student = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    teacher = torch.tensor([[1.0, 0.0], [0.0, 4.0]])
    assert FeatureDistill()(student, teacher).item() == (0 + 4 + 9 + 0) / 4


def test_relation_distill_on_swapped_partners() -> None:
    """Student similarities I, teacher's the swap, at τ = 1/2: each row's logits (2, 0) against
    (0, 2), a KL of 2 tanh(1) in both directions."""
    eye, swap = torch.eye(2), torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    got = RelationDistill(0.5)((eye, eye), (eye, swap)).item()
    assert abs(got - 2 * math.tanh(1.0)) < 1e-6


def test_mm_normalises_the_utterance_features_and_uses_the_given_scale() -> None:
    """Features (2, 0) and (0, 3) against transcripts e1, e2 at scale s: logits s·I, so each
    row's and column's loss is log(1 + e^-s)."""
    audio, text = torch.tensor([[2.0, 0.0], [0.0, 3.0]]), torch.eye(2)
    for symmetric in (True, False):
        for scale in (1.0, 2.0):
            got = MM(symmetric)(audio, text, torch.tensor(scale)).item()
            assert abs(got - math.log(1 + math.exp(-scale))) < 1e-6
