"""Loop-closure metrics: recall@N, the top-1 precision-recall curve, average precision and maximum recall at
100 % precision, from each query's ranked candidates and the ground truth. tscm_ros/evaluate/loop_evaluation.py runs
the methods that give them; training's validation uses them too.

Definitions (ground truth from the bags' poses)
-----------------------------------------------
- A candidate is *correct* when its keyframe lies within ``radius_m`` (straight-line, metres) of the
  query's ground-truth position. Keyframes without a pose are never correct.
- A query *has a true loop* when at least one map keyframe lies within ``radius_m`` of it. Queries
  without a true loop cannot be answered correctly: they are left out of every recall denominator, but
  their top-1 candidate still counts as a prediction in the precision-recall curve (always a false
  positive), because a loop-closure detector must reject them.
- ``recall@N``: the share of queries with a true loop whose N best candidates include a correct one.
  A query that returned fewer than N candidates (or none) is judged on those it returned.
- Precision-recall of the top-1 candidate's score: at threshold ``t`` every query whose top-1 score is
  ``>= t`` is *accepted*; ``precision(t) = correct accepted / accepted`` and ``recall(t) = correct
  accepted / queries with a true loop``. Thresholds are the distinct top-1 scores, highest first, so
  queries with *tied* scores are always accepted together (no threshold separates them, and no
  ordering within a tie is invented). Queries without any candidate are never accepted.
- Average precision (AP): the step-wise area under that curve, ``sum_i (R_i - R_{i-1}) * P_i`` with
  ``R_0 = 0`` over the thresholds, highest first: scikit-learn's ``average_precision_score`` (no
  interpolation) except that recall is relative to the queries with a true loop, so a detector that
  ranks every correct top-1 first still scores below 1 when some true loops got a wrong top-1.
- Maximum recall at 100 % precision: the highest ``recall(t)`` over thresholds where every accepted
  query is correct (0 when even the best-scored query is wrong), with the lowest such threshold: the
  operating point a SLAM back-end, which must not take a false loop closure, cares about.
- Latency: wall time of one ``process`` call (describe one image + search the map, plus the stages that
  are on), median over the queries, measured in the same run for every method.
- Stages: each descriptor method is also run with temporal consistency, with geometric verification, and
  with both (rows ``+ temporal``, ``+ verification``, ``+ verification + temporal``: the node's defaults),
  with the node's k = 5 candidates. Those rows count only the candidates the node would publish
  (``Detection.accepted``): a query whose candidates all fail a stage has none.
When no query has a true loop, recall, AP and maximum recall are undefined (NaN, shown as ``n/a``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from tscm_ros.evaluate.recall import ground_truth_within, recall_at_n

DEFAULT_NS = (1, 5, 10)


def within_radius(query_positions: np.ndarray, map_positions: np.ndarray, radius_m: float) -> np.ndarray:
    """Boolean (num_queries, num_keyframes): keyframe within ``radius_m`` of the query (NaN positions: never).

    Found with a k-d tree (``recall.ground_truth_within``): one byte per query and keyframe, no float
    (num_queries, num_keyframes, 3) intermediate."""
    queries = np.asarray(query_positions, dtype=np.float64).reshape(-1, 3)
    keyframes = np.asarray(map_positions, dtype=np.float64).reshape(-1, 3)
    within = np.zeros((len(queries), len(keyframes)), dtype=bool)
    for row, matches in enumerate(ground_truth_within(queries, keyframes, radius_m)):
        within[row, matches] = True
    return within


@dataclass(frozen=True)
class PRCurve:
    """Precision and recall of the top-1 candidate at each threshold (distinct top-1 scores, highest first)."""

    thresholds: np.ndarray
    precision: np.ndarray
    recall: np.ndarray


@dataclass(frozen=True)
class LoopMetrics:
    """Everything the evaluation reports for one method (see the module docstring for definitions)."""

    recall_at: dict[int, float]
    curve: PRCurve
    average_precision: float
    max_recall_at_full_precision: float
    full_precision_threshold: float
    num_queries: int
    num_with_loop: int
    num_without_candidates: int


def precision_recall_curve(top1_scores: np.ndarray, top1_correct: np.ndarray, has_loop: np.ndarray) -> PRCurve:
    """Precision/recall of accepting queries whose top-1 score is >= each threshold; NaN score = no candidate."""
    scores = np.asarray(top1_scores, dtype=np.float64)
    correct = np.asarray(top1_correct, dtype=bool)
    has_loop = np.asarray(has_loop, dtype=bool)
    if not (len(scores) == len(correct) == len(has_loop)):
        raise ValueError("top1_scores, top1_correct and has_loop must have one entry per query")
    if np.any(correct & ~has_loop):
        raise ValueError("a query without a true loop cannot have a correct top-1 candidate")
    answered = ~np.isnan(scores)
    thresholds = np.unique(scores[answered])[::-1]
    order = np.argsort(-scores[answered], kind="stable")
    sorted_scores = scores[answered][order]
    sorted_correct = correct[answered][order]
    # Index just past the last query scoring >= each threshold: ties enter together.
    ends = np.searchsorted(-sorted_scores, -thresholds, side="right")
    cumulative_correct = np.concatenate([[0], np.cumsum(sorted_correct)])
    true_positives = cumulative_correct[ends].astype(np.float64)
    precision = true_positives / ends if len(ends) else np.zeros(0)
    num_with_loop = int(has_loop.sum())
    recall = true_positives / num_with_loop if num_with_loop else np.full(len(ends), math.nan)
    return PRCurve(thresholds=thresholds, precision=precision, recall=recall)


def average_precision(curve: PRCurve) -> float:
    """Step-wise area under the PR curve: sum of (R_i - R_{i-1}) * P_i, R_0 = 0 (no interpolation)."""
    if len(curve.recall) and np.isnan(curve.recall).any():
        return math.nan
    recall_steps = np.diff(np.concatenate([[0.0], curve.recall]))
    return float(np.sum(recall_steps * curve.precision))


def max_recall_at_full_precision(curve: PRCurve) -> tuple[float, float]:
    """(highest recall among thresholds with precision 1, the lowest such threshold); (0, NaN) if none."""
    if len(curve.recall) and np.isnan(curve.recall).any():
        return math.nan, math.nan
    perfect = np.flatnonzero(curve.precision == 1.0)
    if len(perfect) == 0:
        return 0.0, math.nan
    # Recall never drops as the threshold drops, so the lowest perfect threshold has the highest recall.
    best = perfect[-1]
    return float(curve.recall[best]), float(curve.thresholds[best])


def at_threshold(curve: PRCurve, min_score: float) -> tuple[float, float]:
    """(precision, recall) of accepting the queries whose top-1 score is >= ``min_score``: the curve's point
    at the lowest threshold still >= ``min_score`` (NaN precision and 0 recall when no query scores that)."""
    reached = np.flatnonzero(curve.thresholds >= min_score)
    if len(reached) == 0:
        return math.nan, 0.0
    return float(curve.precision[reached[-1]]), float(curve.recall[reached[-1]])


def evaluate_loop_closures(ranked_ids: Sequence[np.ndarray], ranked_scores: Sequence[np.ndarray],
                           within: np.ndarray, ns: Sequence[int] = DEFAULT_NS) -> LoopMetrics:
    """All metrics from each query's ranked candidate keyframe ids and scores (best first) and the
    (num_queries, num_keyframes) ground truth from :func:`within_radius`."""
    within = np.asarray(within, dtype=bool)
    if not (len(ranked_ids) == len(ranked_scores) == len(within)):
        raise ValueError(f"{len(ranked_ids)} ranked id lists, {len(ranked_scores)} score lists, "
                         f"{len(within)} ground-truth rows: need one per query")
    has_loop = within.any(axis=1) if within.size else np.zeros(len(within), dtype=bool)
    ranked_correct = [within[q, np.asarray(ids, dtype=np.int64)] for q, ids in enumerate(ranked_ids)]
    true_keyframes = [np.flatnonzero(row) for row in within]
    top1_scores = np.array([float(s[0]) if len(s) else math.nan for s in ranked_scores])
    top1_correct = np.array([bool(flags[0]) if len(flags) else False for flags in ranked_correct])
    curve = precision_recall_curve(top1_scores, top1_correct, has_loop)
    max_recall, threshold = max_recall_at_full_precision(curve)
    return LoopMetrics(
        recall_at=recall_at_n(ranked_ids, true_keyframes, ns).recall,
        curve=curve,
        average_precision=average_precision(curve),
        max_recall_at_full_precision=max_recall,
        full_precision_threshold=threshold,
        num_queries=len(within),
        num_with_loop=int(has_loop.sum()),
        num_without_candidates=int(np.isnan(top1_scores).sum()),
    )
