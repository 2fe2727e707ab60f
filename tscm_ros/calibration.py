"""Score calibration: a candidate's raw similarity turned into the precision it can be trusted with.

A raw score (cosine similarity of unit-norm descriptors) means different things for different models:
an untrained model scores unrelated places 0.95, a trained one 0.6. A checkpoint therefore carries a
:class:`ScoreCalibration` fitted on its validation traversal(s): a monotone piecewise-linear map from
raw similarity to the *estimated precision of accepting every top-1 match at least that similar*. A
published score of 0.9 then means "about 9 in 10 matches scoring this or higher were true loops on
validation", and ``min_score`` is a precision target that holds across models.

Fitting: the probability that a top-1 match is a true loop is regressed on its similarity (isotonic,
pool-adjacent-violators: it never falls as similarity rises); the precision of accepting every
validation query down to each similarity is the running mean of those probabilities, shrunk towards
the overall precision by ``PRIOR_QUERIES`` pseudo-queries, so a handful of lucky matches cannot
claim 1.0.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tscm_ros.errors import CheckpointError

KNOTS = 32
PRIOR_QUERIES = 4.0


def _isotonic_non_increasing(values: np.ndarray) -> np.ndarray:
    """Least-squares non-increasing fit of ``values`` (pool adjacent violators)."""
    means, counts = [], []
    for value in values:
        means.append(float(value))
        counts.append(1)
        while len(means) > 1 and means[-2] < means[-1]:
            total = means[-2] * counts[-2] + means[-1] * counts[-1]
            counts[-2] += counts[-1]
            means[-2] = total / counts[-2]
            means.pop()
            counts.pop()
    return np.repeat(means, counts)


@dataclass(frozen=True)
class ScoreCalibration:
    """Monotone map raw similarity -> calibrated score in [0, 1] (``similarity`` ascending)."""

    similarity: tuple[float, ...]
    score: tuple[float, ...]
    fitted_on: str = ""
    queries: int = 0

    def __post_init__(self) -> None:
        sims, scores = np.asarray(self.similarity), np.asarray(self.score)
        if len(sims) < 1 or len(sims) != len(scores) or np.any(np.diff(sims) < 0) or np.any(np.diff(scores) < -1e-12):
            raise CheckpointError("score calibration must map ascending similarities to non-decreasing scores")
        if np.any(scores < 0) or np.any(scores > 1):
            raise CheckpointError("calibrated scores must lie in [0, 1]")

    @classmethod
    def fit(cls, top1_similarity: np.ndarray, top1_correct: np.ndarray, fitted_on: str = "") -> "ScoreCalibration":
        """Fit on the top-1 matches of validation queries (``top1_correct``: within the radius; a query
        with no true loop is never correct)."""
        similarity = np.asarray(top1_similarity, dtype=np.float64)
        correct = np.asarray(top1_correct, dtype=bool)
        if len(similarity) < 2:
            raise ValueError("score calibration needs at least two validation queries")
        order = np.argsort(-similarity, kind="stable")
        similarity, correct = similarity[order], correct[order]
        probability = _isotonic_non_increasing(correct.astype(np.float64))
        accepted = np.arange(1, len(similarity) + 1)
        overall = probability.mean()
        precision = (np.cumsum(probability) + PRIOR_QUERIES * overall) / (accepted + PRIOR_QUERIES)
        precision = np.maximum.accumulate(precision[::-1])[::-1]  # non-increasing as the threshold drops
        # Ties share the precision of accepting all of them (the last of the tie in this order).
        last_of_tie = np.r_[similarity[1:] != similarity[:-1], True]
        similarity, precision = similarity[last_of_tie], precision[last_of_tie]
        picks = np.unique(np.linspace(0, len(similarity) - 1, min(KNOTS, len(similarity))).round().astype(int))
        return cls(tuple(similarity[picks][::-1].tolist()), tuple(precision[picks][::-1].tolist()), fitted_on,
                   int(len(order)))

    def __call__(self, similarity: np.ndarray | float) -> np.ndarray:
        """Calibrated score(s) of raw similarity value(s); constant beyond the fitted range."""
        return np.interp(similarity, self.similarity, self.score)

    def min_similarity(self, min_score: float) -> float:
        """The lowest raw similarity whose calibrated score is >= ``min_score`` (inf when none)."""
        sims, scores = np.asarray(self.similarity), np.asarray(self.score)
        if min_score <= scores[0]:
            return -np.inf
        if min_score > scores[-1]:
            return np.inf
        upper = int(np.searchsorted(scores, min_score, side="left"))  # first knot with score >= min_score
        lower = upper - 1
        if scores[upper] == scores[lower]:
            return float(sims[upper])
        fraction = (min_score - scores[lower]) / (scores[upper] - scores[lower])
        return float(sims[lower] + fraction * (sims[upper] - sims[lower]))

    def to_dict(self) -> dict:
        return {"similarity": list(self.similarity), "score": list(self.score), "fitted_on": self.fitted_on,
                "queries": self.queries}

    @classmethod
    def from_dict(cls, values: dict, source: str) -> "ScoreCalibration":
        try:
            return cls(tuple(float(v) for v in values["similarity"]), tuple(float(v) for v in values["score"]),
                       str(values.get("fitted_on", "")), int(values.get("queries", 0)))
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{source}: malformed score calibration ({exc})") from exc
