"""Losses against hand-computed values on tiny tensors, and against a loop implementation on batches."""

from __future__ import annotations

import pytest
import torch

from tscm_ros.train.losses import (
    TripletDescriptors,
    cross_metric_loss,
    hard_triplet_loss,
    soft_loss,
    squared_distance,
    tscm_loss,
)


def triplets(anchor, positive, negatives) -> TripletDescriptors:
    return TripletDescriptors(torch.tensor(anchor), torch.tensor(positive), torch.tensor(negatives))


# One triplet, two 2-d negatives; every number below is worked out by hand.
STUDENT = triplets([[1.0, 0.0]], [[0.6, 0.8]], [[[0.0, 1.0], [1.0, 0.0]]])
TEACHER = triplets([[0.0, 1.0]], [[0.6, 0.8]], [[[0.0, -1.0], [0.8, 0.6]]])


def test_hard_triplet_loss_by_hand():
    # d(a, p) = 0.4^2 + 0.8^2 = 0.8; d(a, n1) = 2, d(a, n2) = 0.
    # hinges: max(0, 0.8 - 2 + 0.1) = 0, max(0, 0.8 - 0 + 0.1) = 0.9; mean over the 2 pairs = 0.45.
    assert hard_triplet_loss(STUDENT, margin=0.1).item() == pytest.approx(0.45)
    assert hard_triplet_loss(STUDENT, margin=0.3).item() == pytest.approx(0.55)


def test_soft_loss_by_hand():
    # d(Sa, Ta) = 1 + 1 = 2; d(Sp, Tp) = 0; d(Sn1, Tn1) = 0 + 4 = 4; d(Sn2, Tn2) = 0.04 + 0.36 = 0.4.
    # 2 + 0 + mean(4, 0.4) = 4.2
    assert soft_loss(STUDENT, TEACHER).item() == pytest.approx(4.2)


def test_cross_metric_loss_by_hand():
    # d(Sa, Tp) = 0.8; d(Sp, Ta) = 0.36 + 0.04 = 0.4; sum 1.2.
    assert cross_metric_loss(STUDENT, TEACHER).item() == pytest.approx(1.2)


def test_cross_metric_loss_is_zero_for_identical_pair_and_models():
    same = triplets([[0.6, 0.8]], [[0.6, 0.8]], [[[1.0, 0.0]]])
    assert cross_metric_loss(same, same).item() == 0.0
    assert soft_loss(same, same).item() == 0.0


def test_total_is_the_weighted_sum():
    terms = tscm_loss(STUDENT, TEACHER)
    assert terms.total.item() == pytest.approx(0.45 + 4.2 + 1.2)
    weighted = tscm_loss(STUDENT, TEACHER, hard_weight=2.0, soft_weight=0.0, cross_metric_weight=0.5)
    assert weighted.total.item() == pytest.approx(2 * 0.45 + 0.5 * 1.2)
    assert weighted.soft.item() == pytest.approx(4.2)
    teacher_only = tscm_loss(STUDENT, None)
    assert teacher_only.total.item() == pytest.approx(0.45) and teacher_only.soft.item() == 0.0


def test_batched_losses_match_a_loop_over_triplets_and_negatives():
    generator = torch.Generator().manual_seed(0)
    unit = lambda *shape: torch.nn.functional.normalize(torch.randn(*shape, generator=generator), dim=-1)  # noqa: E731
    batch, negatives, dim = 3, 4, 5
    student = TripletDescriptors(unit(batch, dim), unit(batch, dim), unit(batch, negatives, dim))
    teacher = TripletDescriptors(unit(batch, dim), unit(batch, dim), unit(batch, negatives, dim))
    d = lambda x, y: float(((x - y) ** 2).sum())  # noqa: E731
    hard, soft, cross = [], [], []
    for b in range(batch):
        a, p, ns = student.anchor[b], student.positive[b], student.negatives[b]
        hard += [max(0.0, d(a, p) - d(a, n) + 0.1) for n in ns]
        soft.append(d(a, teacher.anchor[b]) + d(p, teacher.positive[b])
                    + sum(d(ns[i], teacher.negatives[b, i]) for i in range(negatives)) / negatives)
        cross.append(d(a, teacher.positive[b]) + d(p, teacher.anchor[b]))
    assert hard_triplet_loss(student).item() == pytest.approx(sum(hard) / len(hard), rel=1e-5)
    assert soft_loss(student, teacher).item() == pytest.approx(sum(soft) / batch, rel=1e-5)
    assert cross_metric_loss(student, teacher).item() == pytest.approx(sum(cross) / batch, rel=1e-5)


def test_gradients_flow_to_the_student_only():
    def trainable(d: TripletDescriptors) -> TripletDescriptors:
        return TripletDescriptors(*(t.clone().requires_grad_() for t in (d.anchor, d.positive, d.negatives)))

    student, teacher = trainable(STUDENT), trainable(TEACHER)
    tscm_loss(student, teacher).total.backward()
    student_tensors = (student.anchor, student.positive, student.negatives)
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in student_tensors)
    assert all(t.grad is None for t in (teacher.anchor, teacher.positive, teacher.negatives))


def test_squared_distance_broadcasts():
    assert squared_distance(torch.zeros(2, 1, 3), torch.ones(2, 4, 3)).shape == (2, 4)


def test_mismatched_shapes_are_rejected():
    with pytest.raises(ValueError, match="negatives"):
        TripletDescriptors(torch.zeros(2, 4), torch.zeros(2, 4), torch.zeros(2, 4))
