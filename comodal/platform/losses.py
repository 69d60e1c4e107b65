"""Contrastive and distillation losses, each a small module with its formula in the docstring."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class InfoNCE(nn.Module):
    """InfoNCE over a batch of B pairs (van den Oord et al. 2018; CLIP, Radford et al. 2021).

    logits = s * A Bᵀ with A, B the [B, D] embeddings as the model scores them (L2-normalised
    under ``model.score: cosine``, the heads' raw outputs under ``dot``) and s = 1/temperature;
    the positive of row i is column i. With ``dot``, ``symmetric: false`` and a fixed temperature
    of 1 this is the CMCL code's loss.
      one-directional:  L = CE(logits, arange(B))                        (A retrieves B)
      symmetric:        L = (CE(logits, arange(B)) + CE(logitsᵀ, arange(B))) / 2
    """

    def __init__(self, symmetric: bool = True) -> None:
        super().__init__()
        self.symmetric = symmetric

    def forward(self, a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        logits = scale * a @ b.T
        targets = torch.arange(len(a), device=a.device)
        loss = F.cross_entropy(logits, targets)
        if self.symmetric:
            loss = (loss + F.cross_entropy(logits.T, targets)) / 2
        return loss


class AsymmetricInfoNCE(InfoNCE):
    """Co2L's asymmetric contrastive loss (Cha et al. 2021) on a batch of B pairs: only the
    rows in ``anchors`` (the current task's) are anchors; every row's partner is a candidate.
    With logits = s * A Bᵀ as in ``InfoNCE`` and C = {i : anchors_i},
      one-directional:  L = mean_{i in C} -log softmax_k(logits_{i,k})[i]        (k over all B)
      symmetric:        L = (that + the same over logitsᵀ) / 2
    Without ``anchors`` (or with every row an anchor) it is ``InfoNCE`` itself, bitwise.
    """

    def forward(self, a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor,
                anchors: torch.Tensor | None = None) -> torch.Tensor:
        if anchors is None:
            return super().forward(a, b, scale)
        logits = scale * a @ b.T
        # a non-anchor row's target is ignored: it only adds its column to the others' sums
        targets = torch.arange(len(a), device=a.device).masked_fill(~anchors.to(a.device), -1)
        loss = F.cross_entropy(logits, targets, ignore_index=-1)
        if self.symmetric:
            loss = (loss + F.cross_entropy(logits.T, targets, ignore_index=-1)) / 2
        return loss


class MM(InfoNCE):
    """COCONUT's audio-text (MM) loss (Cappellazzo et al. 2024): InfoNCE between utterance
    features a, L2-normalised here, and transcript embeddings b (already normalised).

      L = InfoNCE(a / ||a||, b, s)

    The logit scale s is an argument: COCONUT passes the trained model's own (learnable)
    scale, so this loss moves it as the task loss does. ``normalize=False`` (a model scoring
    by raw dot products) takes a as it is, and b raw too.
    """

    def __init__(self, symmetric: bool = True, normalize: bool = True) -> None:
        super().__init__(symmetric)
        self.normalize = normalize

    def forward(self, a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return super().forward(F.normalize(a, dim=1) if self.normalize else a, b, scale)


class SupCon(nn.Module):
    """Supervised contrastive loss (Khosla et al. 2020, the L_out form).

    For anchors i with P(i) = {p != i : y_p = y_i} and A(i) = {a != i}, on normalised z:
      L = mean_{i : |P(i)| > 0}  -1/|P(i)| sum_{p in P(i)} log softmax_i(p)
      softmax_i(p) = exp(z_i·z_p / t) / sum_{a in A(i)} exp(z_i·z_a / t)
    """

    def __init__(self, temperature: float = 0.1) -> None:
        super().__init__()
        self.temperature = temperature

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = z @ z.T / self.temperature
        self_mask = torch.eye(len(z), dtype=torch.bool, device=z.device)
        logits = logits.masked_fill(self_mask, float("-inf"))
        log_prob = logits - logits.logsumexp(dim=1, keepdim=True)
        positives = (labels[:, None] == labels[None, :]) & ~self_mask
        count = positives.sum(1)
        has_pos = count > 0
        if not has_pos.any():  # no anchor has a positive: nothing to pull together
            return z.sum() * 0.0
        summed = log_prob.masked_fill(~positives, 0.0).sum(1)
        return -(summed[has_pos] / count[has_pos]).mean()


class NSPT(nn.Module):
    """COCONUT's supervised contrastive loss on rehearsal anchors (Cappellazzo et al. 2024):
    negatives from the student, positives from the teacher ("NSPT"); ``negatives="teacher"``
    gives the NTPT ablation.

    For anchors i in R (the rehearsal rows), P(i) = {p : y_p = y_i} (i itself included) and
    N(i) = {n : y_n != y_i}, with s the student's and t the teacher's normalised features:
      L = mean_{i in R}  -1/|P(i)| sum_{p in P(i)} log  e^{s_i·t_p/τ} /
                                  (e^{s_i·t_p/τ} + sum_{n in N(i)} e^{s_i·u_n/τ}),
    u = s (NSPT) or t (NTPT). Each teacher positive competes only with the negatives, so the
    anchor is pulled to where its class was, and pushed from the other classes' current
    features.
    """

    def __init__(self, temperature: float = 0.1, negatives: str = "student") -> None:
        super().__init__()
        self.temperature, self.negatives = temperature, negatives

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor,
                anchors: torch.Tensor) -> torch.Tensor:
        s, t = F.normalize(student, dim=1), F.normalize(teacher, dim=1)
        u = s if self.negatives == "student" else t
        if not bool(anchors.any()):
            return student.sum() * 0.0
        positive = s[anchors] @ t.T / self.temperature  # [A, B]
        negative = s[anchors] @ u.T / self.temperature
        same = labels[anchors][:, None] == labels[None, :]
        negatives = negative.masked_fill(same, float("-inf")).logsumexp(dim=1, keepdim=True)
        log_prob = positive - torch.logaddexp(positive, negatives)
        return -((log_prob * same).sum(1) / same.sum(1)).mean()


class PredictionDistill(nn.Module):
    """Prediction KD (Hinton et al. 2015): the student's softmax at temperature τ pulled to the
    teacher's, over rows i of logits s (student) and t (teacher):
      L = τ² · mean_i KL(softmax(t_i / τ) || softmax(s_i / τ))
    (the τ² keeps the gradient's scale independent of τ).
    """

    def __init__(self, temperature: float = 1.0) -> None:
        super().__init__()
        self.temperature = temperature

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        log_p = F.log_softmax(student / self.temperature, dim=1)
        q = F.softmax(teacher / self.temperature, dim=1)
        return F.kl_div(log_p, q, reduction="batchmean") * self.temperature**2


class FeatureDistill(nn.Module):
    """Feature KD: the mean squared error between student features s and teacher features t,
      L = mean_{i,j} (s_ij - t_ij)².
    """

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(student, teacher)


class RelationDistill(nn.Module):
    """Instance-relation distillation (Co2L, Cha et al. 2021) on a batch of pairs (a_i, b_i) as
    the model scores them (normalised under cosine scoring, raw under dot): with similarities
    S = a bᵀ / τ (student) and T = a' b'ᵀ / τ* (teacher; τ* = τ unless ``teacher_temperature``
    is given, as Co2L's κ = 0.2, κ* = 0.01),
      L = (mean_i KL(softmax(T_i) || softmax(S_i)) + mean_j KL(softmax(T_j) || softmax(S_j))) / 2
    over rows i (a retrieves b) and columns j (b retrieves a).
    """

    def __init__(self, temperature: float = 0.1, teacher_temperature: float | None = None) -> None:
        super().__init__()
        self.temperature = temperature
        self.teacher_temperature = temperature if teacher_temperature is None \
            else teacher_temperature
        self.kl = PredictionDistill(1.0)

    def forward(self, student: tuple[torch.Tensor, torch.Tensor],
                teacher: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        s = student[0] @ student[1].T / self.temperature
        t = teacher[0] @ teacher[1].T / self.teacher_temperature
        return (self.kl(s, t) + self.kl(s.T, t.T)) / 2
