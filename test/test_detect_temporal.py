"""Temporal consistency: a candidate's sequence score is the support of the images before it along the map."""

from __future__ import annotations

import numpy as np
import pytest

from tscm_ros.detect.temporal import TemporalConfig, TemporalConsistency
from tscm_ros.errors import ConfigError


def _drive(temporal: TemporalConsistency, false_at: int, with_poses: bool):
    """A robot driving along a map of keyframes every 2 m, one image per 2 m. Each image matches its true
    keyframe with similarity 0.80 (and its neighbours 0.6); image ``false_at`` matches a far-away look-alike
    better (0.90). Returns the best candidate's keyframe and sequence score for each image."""
    coordinates = np.arange(100) * 2.0
    best = []
    for t in range(20):
        true = 10 + t
        ids = np.array([true, true - 1, true + 1, 80])
        similarities = np.array([0.80, 0.60, 0.60, 0.90 if t == false_at else 0.30])
        position = np.array([2.0 * t, 0.0, 0.0]) if with_poses else None
        scores, consistent = temporal.update(t * 400_000_000, position, coordinates[ids], similarities)
        best.append((int(ids[np.argmax(scores)]), float(scores.max()), consistent))
    return best


@pytest.mark.parametrize("with_poses", [True, False])
def test_temporal_consistency_suppresses_an_isolated_false_match(with_poses):
    temporal = TemporalConsistency(TemporalConfig(window=5, tolerance_m=1.0, max_step_m=3.0))
    best = _drive(temporal, false_at=12, with_poses=with_poses)
    assert [keyframe for keyframe, _, _ in best] == [10 + t for t in range(20)]  # the look-alike never wins
    assert [consistent for _, _, consistent in best] == [t >= 4 for t in range(20)]
    assert best[12][1] == pytest.approx(0.80)  # the true keyframe keeps the support of the images before it


def test_a_gap_in_the_images_restarts_the_sequence():
    temporal = TemporalConsistency(TemporalConfig(window=3, max_gap_s=1.0))
    for t in range(3):
        _, consistent = temporal.update(t * 100_000_000, None, np.array([2.0 * t]), np.array([0.8]))
    assert consistent
    _, consistent = temporal.update(10_000_000_000, None, np.array([8.0]), np.array([0.8]))
    assert not consistent


def test_the_settings_are_checked():
    with pytest.raises(ConfigError, match="window"):
        TemporalConfig(window=0)
    with pytest.raises(ConfigError, match="tolerance_m"):
        TemporalConfig(tolerance_m=-1.0)
    with pytest.raises(ConfigError, match="max_gap_s"):
        TemporalConfig(max_gap_s=0.0)


def test_a_map_without_poses_is_followed_by_keyframe_order():
    """Coordinates are keyframe ids: each image's true keyframe is the next id; a look-alike far back in
    the map's order gets no support from the images before it."""
    temporal = TemporalConsistency(TemporalConfig(window=3))
    for t in range(3):
        ids = np.array([10.0 + t, 50.0])
        scores, consistent = temporal.update(t * 100_000_000, None, ids, np.array([0.7, 0.75 if t == 2 else 0.2]),
                                             by_order=True)
    assert consistent
    assert scores[0] == pytest.approx(0.7)  # supported by the two images before it
    assert scores[1] == pytest.approx((0.75 + 0.2 + 0.2) / 3)  # the images before it matched it weakly


def test_a_keyframe_without_a_pose_keeps_its_own_similarity():
    temporal = TemporalConsistency(TemporalConfig(window=2))
    temporal.update(0, np.zeros(3), np.array([0.0]), np.array([0.3]))
    scores, consistent = temporal.update(100_000_000, np.array([1.0, 0.0, 0.0]), np.array([1.0, np.nan]),
                                         np.array([0.4, 0.9]))
    assert consistent
    assert scores[1] == pytest.approx(0.9)


def test_an_image_without_candidates_enters_the_history():
    temporal = TemporalConsistency(TemporalConfig(window=2))
    scores, consistent = temporal.update(0, None, np.array([]), np.array([]))
    assert len(scores) == 0 and not consistent
    _, consistent = temporal.update(100_000_000, None, np.array([4.0]), np.array([0.8]))
    assert consistent  # the empty image counts towards the window, and lends no support
