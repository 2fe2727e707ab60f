"""Scores calibrated per map without labels: the null margins, their tail, the round trip through a map, and on
real photographs (RTAB-Map's indoor loop, test/data/rtabmap_loop) queries from places the map never saw
scoring below the node's min_score while revisits pass it; geometric verification on real image pairs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tscm_ros.describe.describer import DEFAULT_MODEL, describer_for
from tscm_ros.describe.local_features import extract_local_features
from tscm_ros.detect.detection import DEFAULT_MIN_SCORE, MatchingConfig
from tscm_ros.detect.loop_detector import LoopDetector
from tscm_ros.detect.temporal import TemporalConfig
from tscm_ros.detect.verification import VerificationConfig, verify
from tscm_ros.errors import MapError
from tscm_ros.evaluate.loop_evaluation import build_descriptor_map
from tscm_ros.io.revisit_set import RevisitSet, read_rgb
from tscm_ros.map.calibration import MapCalibration, candidate_margins
from tscm_ros.map.keyframe_map import KeyframeMap
from tscm_ros.map.storage import CALIBRATION_FILE, MANIFEST_FILE

RTABMAP_LOOP = Path(__file__).parent / "data" / "rtabmap_loop"


def test_margins_compare_each_candidate_with_the_best_of_another_place():
    similarities = np.array([0.9, 0.85, 0.6, 0.5])
    same_place = np.array([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=bool)
    np.testing.assert_allclose(candidate_margins(similarities, same_place), [0.3, 0.25, -0.3, -0.4])
    everywhere = np.ones((2, 2), dtype=bool)  # every candidate of one place: the margin is at least to the lowest
    np.testing.assert_allclose(candidate_margins(np.array([0.9, 0.7]), everywhere), [0.2, 0.0])


def test_the_false_alarm_rate_falls_with_the_margin_and_its_tail_goes_below_one_over_the_map():
    null = np.random.default_rng(0).exponential(0.02, 200)
    calibration = MapCalibration(null, keyframes=200)
    margins = np.array([0.0, 0.02, 0.05, 0.1, 0.2])
    rates = calibration.false_alarm_rate(margins)
    assert np.all(np.diff(rates) < 0) and rates[0] > 0.9
    assert rates[-1] < 1 / 200  # beyond the largest null margin: extrapolated, not stuck at 1 / (n + 1)
    assert rates[3] == pytest.approx(np.exp(-0.1 / 0.02), rel=0.5)  # the exponential tail it was drawn from
    np.testing.assert_allclose(calibration.score(margins), 1 - rates)
    with pytest.raises(MapError, match="at least 2"):
        MapCalibration(np.array([0.1]), keyframes=1)


@pytest.fixture(scope="module")
def rtabmap_map():
    revisit_set = RevisitSet.load(RTABMAP_LOOP)
    keyframe_map, describer = build_descriptor_map(describer_for(DEFAULT_MODEL, device="cpu"),
                                                   revisit_set.reference_frames())
    return revisit_set, keyframe_map, describer


def test_the_calibration_round_trips_through_the_map(tmp_path, rtabmap_map):
    _, keyframe_map, _ = rtabmap_map
    assert keyframe_map.calibration is not None and keyframe_map.calibration.keyframes == 40
    keyframe_map.save(tmp_path / "map")
    manifest = json.loads((tmp_path / "map" / MANIFEST_FILE).read_text())
    assert manifest["calibration"] == {"keyframes": 40, "samples": len(keyframe_map.calibration.null)}
    loaded = KeyframeMap.load(tmp_path / "map")
    np.testing.assert_array_equal(loaded.calibration.null, keyframe_map.calibration.null)
    np.savez(tmp_path / "map" / CALIBRATION_FILE, null_margins=np.zeros(3))
    with pytest.raises(MapError, match=CALIBRATION_FILE):
        KeyframeMap.load(tmp_path / "map")


def test_unmapped_places_score_below_min_score_and_revisits_pass_it(rtabmap_map, route_reference):
    from tscm_ros.io.bag import FrameSource

    revisit_set, keyframe_map, describer = rtabmap_map
    everything = MatchingConfig(k=5, min_score=0.0, exclude_recent_s=0.0)
    detector = LoopDetector(describer, keyframe_map, everything)
    # A rendered town is a place this indoor map never saw.
    unmapped = [detector.process(f.image, f.stamp_ns).candidates[0].score for f in FrameSource(route_reference).open()]
    assert max(unmapped) < DEFAULT_MIN_SCORE, unmapped
    revisits = [detector.process(f.image, f.stamp_ns).candidates[0] for f in revisit_set.query_frames()]
    published = [c for c in revisits if c.score >= DEFAULT_MIN_SCORE]
    within = revisit_set.ground_truth()
    right = [c for q, c in enumerate(revisits) if c.score >= DEFAULT_MIN_SCORE and within[q, c.keyframe_id]]
    print(f"{len(published)} of 44 revisits reach {DEFAULT_MIN_SCORE}, {len(right)} right")
    assert len(published) >= 15


def test_sequences_publish_most_revisits_of_a_map_without_poses_and_nothing_it_never_saw(rtabmap_map,
                                                                                          route_reference):
    """The node's defaults (min_score 0.99, temporal consistency along the map's order): the revisit is
    published for most of its images and always right; a sequence of a rendered town, a place this indoor
    map never saw, is never published."""
    from tscm_ros.io.bag import FrameSource

    revisit_set, keyframe_map, describer = rtabmap_map
    staged = LoopDetector(describer, keyframe_map, MatchingConfig(exclude_recent_s=0.0), temporal=TemporalConfig())
    assert "sequence margins, along the map's order" in staged.score_basis
    published = [staged.process(f.image, f.stamp_ns).accepted for f in revisit_set.query_frames()]
    assert staged.temporal_basis == "keyframe order (map without poses)"
    assert all(not accepted for accepted in published[:TemporalConfig().window - 1])  # history not yet full
    within = revisit_set.ground_truth()
    hits = [q for q, accepted in enumerate(published) if accepted]
    print(f"{len(hits)} of {len(published)} revisit images published")
    assert len(hits) >= 0.6 * len(published) and all(within[q, published[q][0].keyframe_id] for q in hits)
    unmapped = [staged.process(f.image, f.stamp_ns + 10**13) for f in FrameSource(route_reference).open()]
    assert len(unmapped) >= 10 and not any(d.accepted for d in unmapped)


@pytest.mark.parametrize("query, reference, expected", [
    ("query/041.jpg", "ref/002.jpg", True),  # the same place, driven again
    ("query/060.jpg", "ref/020.jpg", True),
    ("query/046.jpg", "ref/019.jpg", False),  # a blank wall against another blank wall
    ("query/060.jpg", "ref/005.jpg", False),  # another part of the loop
])
def test_verification_decides_real_image_pairs(query, reference, expected):
    check = verify(extract_local_features(read_rgb(RTABMAP_LOOP / query)),
                   extract_local_features(read_rgb(RTABMAP_LOOP / reference)), VerificationConfig())
    print(f"{query} vs {reference}: {check.inliers} inliers")
    assert check.verified == expected
