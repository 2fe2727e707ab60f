"""Verification as evidence for camera-sized images: the map's own null of inliers (look-alikes of other
places), Fisher's combination with the sequence's rate, and what it does on RTAB-Map's real indoor loop
(test/data/rtabmap_loop, 512x384) and on camera-sized images of a place that map never saw."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tscm_ros.describe.describer import DEFAULT_MODEL, describer_for
from tscm_ros.detect.detection import DEFAULT_MIN_SCORE, MatchingConfig
from tscm_ros.detect.loop_detector import LoopDetector
from tscm_ros.detect.temporal import Normaliser, TemporalConfig, normalisation_sample
from tscm_ros.detect.verification import VerificationConfig
from tscm_ros.detect.verification_null import combined_rate, estimate_inlier_null
from tscm_ros.evaluate.loop_evaluation import build_descriptor_map
from tscm_ros.io.bag import FrameSource
from tscm_ros.io.revisit_set import RevisitSet
from tscm_ros.sim.simulate import simulate_route

RTABMAP_LOOP = Path(__file__).parent / "data" / "rtabmap_loop"


@pytest.fixture(scope="module")
def rtabmap_map():
    revisit_set = RevisitSet.load(RTABMAP_LOOP)
    keyframe_map, describer = build_descriptor_map(describer_for(DEFAULT_MODEL, device="cpu"),
                                                   revisit_set.reference_frames())
    return revisit_set, keyframe_map, describer


def _published(detector: LoopDetector, frames, offset_ns: int = 0) -> list:
    """Per frame, the top candidate the node would publish at its default min_score (None if none)."""
    out = []
    for frame in frames:
        accepted = [c for c in detector.process(frame.image, frame.stamp_ns + offset_ns).accepted
                    if c.score >= DEFAULT_MIN_SCORE]
        out.append(accepted[0] if accepted else None)
    return out


def test_fisher_combination_needs_both_to_be_small():
    assert combined_rate(0.01, 1.0) >= 0.01  # uninformative inliers add nothing
    assert combined_rate(0.01, 0.01) < 0.01
    assert combined_rate(0.3, 1e-6) < 1e-4  # decisive inliers decide
    assert combined_rate(1e-3, 1e-4) == pytest.approx(combined_rate(1e-4, 1e-3))
    assert 0.0 < combined_rate(1e-200, 1e-200) <= 1e-300 * 1e3


def test_look_alikes_of_other_places_give_few_inliers_in_a_real_map(rtabmap_map):
    _, keyframe_map, _ = rtabmap_map
    null = estimate_inlier_null(keyframe_map, Normaliser(normalisation_sample(keyframe_map)), VerificationConfig())
    assert null is not None and len(null.null) == 40
    print(f"inliers of look-alikes: median {np.median(null.null)}, max {null.null.max()}")
    assert np.median(null.null) < 15 and null.null.max() < 30  # true revisits: 47 and more at the 10th percentile
    assert null.false_alarm_rate(47) < 1e-3


def test_camera_sized_revisits_are_published_more_often_and_stay_right(rtabmap_map):
    revisit_set, keyframe_map, describer = rtabmap_map
    within = revisit_set.ground_truth()
    counts = {}
    for side in (0, 360):
        detector = LoopDetector(describer, keyframe_map, MatchingConfig(exclude_recent_s=0.0),
                                temporal=TemporalConfig(), auto_verify_min_side=side)
        published = _published(detector, revisit_set.query_frames())
        hits = [q for q, top in enumerate(published) if top is not None]
        assert all(within[q, published[q].keyframe_id] for q in hits)
        if side:
            assert "verification of images 360 px and larger" in detector.score_basis
            assert all(published[q].verification is not None for q in hits)
        counts[side] = len(hits)
    print(f"published of 44: {counts[0]} by the sequence alone, {counts[360]} with verification")
    assert counts[360] >= counts[0] + 3 and counts[360] >= 0.8 * 44


def test_a_longer_sequence_beside_the_short_one_publishes_more_of_a_real_loop_and_stays_right(rtabmap_map):
    revisit_set, keyframe_map, describer = rtabmap_map
    within = revisit_set.ground_truth()
    counts = {}
    for long_window in (0, 20):
        detector = LoopDetector(describer, keyframe_map, MatchingConfig(exclude_recent_s=0.0),
                                temporal=TemporalConfig(long_window=long_window), auto_verify_min_side=0)
        published = _published(detector, revisit_set.query_frames())
        hits = [q for q, top in enumerate(published) if top is not None]
        assert all(within[q, published[q].keyframe_id] for q in hits)
        counts[long_window] = len(hits)
        if long_window:
            assert "20 images" in detector.score_basis and "5 images" in detector.score_basis
    print(f"published of 44 by the sequence alone: {counts[0]} with 5 images, {counts[20]} with 5 and 20")
    assert counts[20] >= counts[0] + 2


def test_camera_sized_images_of_a_place_the_map_never_saw_are_not_published(rtabmap_map, tmp_path):
    _, keyframe_map, describer = rtabmap_map
    route = simulate_route(tmp_path / "town", frames=24, width=640, height=480, route_length_m=180.0,
                           progress=False)
    detector = LoopDetector(describer, keyframe_map, MatchingConfig(exclude_recent_s=0.0, min_score=0.0),
                            temporal=TemporalConfig())
    frames = list(FrameSource(route).open())
    verified = []
    for frame in frames:
        detection = detector.process(frame.image, frame.stamp_ns + 10**13)
        assert not [c for c in detection.accepted if c.score >= DEFAULT_MIN_SCORE]
        verified += [c.verification.inliers for c in detection.accepted[:1] if c.verification is not None]
    assert len(verified) >= len(frames) - TemporalConfig().window  # the evidence ran once the history was full
