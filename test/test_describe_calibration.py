"""Score calibration: fitted precision, monotonicity, the inverse used for min_score, and the loop detector."""

from __future__ import annotations

import numpy as np
import pytest

from tscm_ros.describe.calibration import ScoreCalibration
from tscm_ros.errors import CheckpointError


def _synthetic(rng: np.random.Generator, count: int = 400) -> tuple[np.ndarray, np.ndarray]:
    """Similarities where true loops score higher on average, with overlap."""
    correct = rng.random(count) < 0.6
    similarity = np.where(correct, rng.normal(0.8, 0.06, count), rng.normal(0.65, 0.06, count))
    return similarity, correct


def test_accepting_scores_above_a_threshold_gives_at_least_that_precision_on_fresh_data():
    rng = np.random.default_rng(0)
    calibration = ScoreCalibration.fit(*_synthetic(rng), fitted_on="synthetic")
    similarity, correct = _synthetic(rng, 4000)  # held-out draw of the same distribution
    scores = calibration(similarity)
    for target in (0.8, 0.9, 0.95):
        accepted = scores >= target
        assert accepted.sum() > 50
        assert correct[accepted].mean() >= target - 0.03  # within sampling error of the promise
    assert np.all(np.diff(calibration(np.linspace(0, 1, 101))) > 0)  # strictly increasing: no ties


def test_min_similarity_inverts_the_map_and_round_trips_through_a_dict():
    calibration = ScoreCalibration.fit(*_synthetic(np.random.default_rng(1)))
    for target in (0.7, 0.9, 0.97):
        threshold = calibration.min_similarity(target)
        if np.isfinite(threshold):
            assert calibration(threshold) >= target and calibration(threshold) == pytest.approx(target, abs=1e-9)
            assert calibration(threshold - 1e-6) < target
    assert calibration.min_similarity(1.01) == np.inf
    assert calibration.min_similarity(0.0) == -np.inf
    assert ScoreCalibration.from_dict(calibration.to_dict(), "x") == calibration
    with pytest.raises(CheckpointError, match="x: malformed"):
        ScoreCalibration.from_dict({"similarity": [0.1]}, "x")
    with pytest.raises(CheckpointError, match="non-decreasing"):
        ScoreCalibration((0.1, 0.2), (0.9, 0.5))


def test_a_few_lucky_matches_cannot_claim_certainty():
    calibration = ScoreCalibration.fit(np.array([0.9, 0.8, 0.7, 0.6]), np.array([True, True, False, False]))
    # two correct matches out of two: the one-sided 95 % Wilson lower bound of 2/2 is 2 / (2 + 1.645^2)
    assert calibration(0.95) == pytest.approx(0.99 * 2 / (2 + 1.645**2) + 0.01 * 0.95)
