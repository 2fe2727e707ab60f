"""TSCM's training losses: hard triplet, soft (regression to the teacher) and cross-metric distillation.

d(x, y) is the squared Euclidean distance between L2-normalised descriptors. For a batch of B triplets
with N negatives each, descriptors come as anchor (B, D), positive (B, D), negatives (B, N, D), for the
student S and the frozen teacher T. Every loss is a mean over the batch; no Python loops.

- hard:  mean over (b, i) of max(0, d(Sa, Sp) - d(Sa, Sn_i) + margin)            (margin 0.1)
- soft:  mean over b of d(Sa, Ta) + d(Sp, Tp) + mean_i d(Sn_i, Tn_i)
- cross-metric: mean over b of d(Sa, Tp) + d(Sp, Ta)
- total: w_hard * hard + w_soft * soft + w_cm * cross-metric (all weights 1 by default)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TripletDescriptors:
    """Descriptors of a batch of triplets: anchor (B, D), positive (B, D), negatives (B, N, D)."""

    anchor: torch.Tensor
    positive: torch.Tensor
    negatives: torch.Tensor

    def __post_init__(self) -> None:
        b, d = self.anchor.shape
        negatives_ok = self.negatives.ndim == 3 and self.negatives.shape[0] == b and self.negatives.shape[2] == d
        if self.positive.shape != (b, d) or not negatives_ok:
            raise ValueError(
                f"triplet descriptors need anchor (B, D), positive (B, D), negatives (B, N, D); got "
                f"{tuple(self.anchor.shape)}, {tuple(self.positive.shape)}, {tuple(self.negatives.shape)}"
            )

    def detach(self) -> TripletDescriptors:
        """The same descriptors cut from the autograd graph (for the frozen teacher)."""
        return TripletDescriptors(self.anchor.detach(), self.positive.detach(), self.negatives.detach())


@dataclass
class LossTerms:
    """The weighted total and each unweighted term (scalars)."""

    total: torch.Tensor
    hard: torch.Tensor
    soft: torch.Tensor
    cross_metric: torch.Tensor


def squared_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distance along the last axis (broadcasting)."""
    return (x - y).pow(2).sum(dim=-1)


def hard_triplet_loss(student: TripletDescriptors, margin: float = 0.1) -> torch.Tensor:
    """Triplet margin loss over all (anchor, negative) pairs, averaged over the B*N pairs."""
    positive = squared_distance(student.anchor, student.positive)  # (B,)
    negative = squared_distance(student.anchor.unsqueeze(1), student.negatives)  # (B, N)
    return torch.relu(positive.unsqueeze(1) - negative + margin).mean()


def soft_loss(student: TripletDescriptors, teacher: TripletDescriptors) -> torch.Tensor:
    """Regression of each student descriptor onto the teacher's descriptor of the same image."""
    teacher = teacher.detach()
    per_triplet = (
        squared_distance(student.anchor, teacher.anchor)
        + squared_distance(student.positive, teacher.positive)
        + squared_distance(student.negatives, teacher.negatives).mean(dim=1)
    )
    return per_triplet.mean()


def cross_metric_loss(student: TripletDescriptors, teacher: TripletDescriptors) -> torch.Tensor:
    """TSCM's cross-metric term: the student's anchor near the teacher's positive, and vice versa."""
    teacher = teacher.detach()
    anchor_to_positive = squared_distance(student.anchor, teacher.positive)
    positive_to_anchor = squared_distance(student.positive, teacher.anchor)
    return (anchor_to_positive + positive_to_anchor).mean()


def tscm_loss(
    student: TripletDescriptors,
    teacher: TripletDescriptors | None,
    margin: float = 0.1,
    hard_weight: float = 1.0,
    soft_weight: float = 1.0,
    cross_metric_weight: float = 1.0,
) -> LossTerms:
    """L_total = w_hard L_hard + w_soft L_soft + w_cm L_cm. With ``teacher=None`` (training the teacher
    itself) only the hard triplet term is used and the other two are reported as 0."""
    hard = hard_triplet_loss(student, margin)
    if teacher is None:
        zero = hard.new_zeros(())
        return LossTerms(hard_weight * hard, hard, zero, zero)
    soft = soft_loss(student, teacher)
    cross = cross_metric_loss(student, teacher)
    return LossTerms(hard_weight * hard + soft_weight * soft + cross_metric_weight * cross, hard, soft, cross)
