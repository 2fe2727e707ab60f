"""Score calibration: a candidate's raw similarity turned into the precision it can be trusted with.

A raw score (cosine similarity of unit-norm descriptors) means different things for different models:
an untrained model scores unrelated places 0.95, a trained one 0.6. A checkpoint therefore carries a
:class:`ScoreCalibration` fitted on its validation traversal(s): a monotone piecewise-linear map from
raw similarity to the *estimated precision of accepting every top-1 match at least that similar*. A
published score of 0.9 then means "about 9 in 10 matches scoring this or higher were true loops on
validation", and ``min_score`` is a precision target that holds across models.

Fitting: the probability that a top-1 match is a true loop is regressed on its similarity (isotonic,
pool-adjacent-violators: it never falls as similarity rises); the precision of accepting every
validation query down to each similarity is the running mean of those probabilities, and the score
is its one-sided 95 % Wilson lower bound, so that "score >= 0.95" claims a precision of at least 0.95
with confidence, and a handful of lucky matches cannot claim 1.0.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tscm_ros.errors import CheckpointError

KNOTS = 32
WILSON_Z = 1.645  # one-sided 95 %
RAW_SHARE = 0.01  # keeps the map strictly increasing: scores rank candidates as raw similarity does


def _wilson_lower_bound(precision: np.ndarray, count: np.ndarray, z: float = WILSON_Z) -> np.ndarray:
    """Lower bound of the Wilson score interval of proportions ``precision`` measured on ``count`` trials."""
    centre = precision + z * z / (2 * count)
    spread = z * np.sqrt(precision * (1 - precision) / count + z * z / (4 * count * count))
    return np.clip((centre - spread) / (1 + z * z / count), 0.0, 1.0)


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
    def fit(cls, top1_similarity: np.ndarray, top1_correct: np.ndarray, fitted_on: str = "") -> ScoreCalibration:
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
        precision = _wilson_lower_bound(np.cumsum(probability) / accepted, accepted)
        precision = np.maximum.accumulate(precision[::-1])[::-1]  # non-increasing as the threshold drops
        # Ties share the precision of accepting all of them (the last of the tie in this order).
        last_of_tie = np.r_[similarity[1:] != similarity[:-1], True]
        similarity, precision = similarity[last_of_tie], precision[last_of_tie]
        picks = np.unique(np.linspace(0, len(similarity) - 1, min(KNOTS, len(similarity))).round().astype(int))
        return cls(tuple(similarity[picks][::-1].tolist()), tuple(precision[picks][::-1].tolist()), fitted_on,
                   int(len(order)))

    def __call__(self, similarity: np.ndarray | float) -> np.ndarray:
        """Calibrated score(s) of raw similarity value(s) in [-1, 1]. Mostly the fitted precision; a
        ``RAW_SHARE`` of the raw similarity keeps it strictly increasing (no ties where the fitted
        precision is flat), so scores rank candidates exactly as the descriptors do."""
        raw = np.clip(similarity, 0.0, 1.0)
        return (1.0 - RAW_SHARE) * np.interp(similarity, self.similarity, self.score) + RAW_SHARE * raw

    def min_similarity(self, min_score: float) -> float:
        """The lowest raw similarity whose calibrated score is >= ``min_score`` (-inf when every similarity
        reaches it, inf when none does)."""
        if self(-1.0) >= min_score:
            return -np.inf
        if self(1.0) < min_score:
            return np.inf
        low, high = -1.0, 1.0  # self(low) < min_score <= self(high); the map is non-decreasing
        for _ in range(60):
            middle = (low + high) / 2
            low, high = (middle, high) if self(middle) < min_score else (low, middle)
        return high

    def to_dict(self) -> dict:
        return {"similarity": list(self.similarity), "score": list(self.score), "fitted_on": self.fitted_on,
                "queries": self.queries}

    @classmethod
    def from_dict(cls, values: dict, source: str) -> ScoreCalibration:
        try:
            return cls(tuple(float(v) for v in values["similarity"]), tuple(float(v) for v in values["score"]),
                       str(values.get("fitted_on", "")), int(values.get("queries", 0)))
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{source}: malformed score calibration ({exc})") from exc
