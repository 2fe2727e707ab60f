"""LoopDetector on its own: a stand-in describer whose descriptor is written in the image, so every
similarity is known, and a small map of keyframes along a straight road."""

from __future__ import annotations

import numpy as np
import pytest

from tscm_ros.detect.detection import MatchingConfig
from tscm_ros.detect.loop_detector import LoopDetector
from tscm_ros.detect.temporal import TemporalConfig
from tscm_ros.detect.verification import VerificationConfig
from tscm_ros.errors import ConfigError
from tscm_ros.io.geometry import Pose
from tscm_ros.map.building import KeyframeSelector
from tscm_ros.map.keyframe_map import KeyframeMap, KeyframeMeta

DIM = 8
SECOND = 1_000_000_000


class Describer:
    """Reads an image's descriptor from its first ``DIM`` pixel values (unit-normed): ``image_of`` writes it."""

    model_name = "stand-in"
    fingerprint = "s" * 16
    dim = DIM
    device = "cpu"
    calibration = None
    adapts_to_map = False

    def describe(self, images) -> np.ndarray:
        vectors = np.stack([image.reshape(-1)[:DIM].astype(np.float32) for image in images])
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def image_of(vector) -> np.ndarray:
    image = np.zeros((4, 4, 3), np.uint8)
    image.reshape(-1)[:DIM] = np.round(np.asarray(vector, np.float64) / np.max(vector) * 200)
    return image


def pose_at(x: float) -> Pose:
    return Pose(np.array([x, 0.0, 0.0]), np.array([0.0, 0.0, 0.0, 1.0]))


def road_map() -> KeyframeMap:
    """Keyframes 0..7 every 10 m along x, stamped at t = 0..7 s; keyframe i's descriptor is e_i."""
    keyframe_map = KeyframeMap(DIM, Describer.fingerprint, {}, model_name=Describer.model_name)
    metas = [KeyframeMeta(stamp_ns=i * SECOND, pose=pose_at(10.0 * i), bag="road") for i in range(DIM)]
    keyframe_map.add(np.eye(DIM, dtype=np.float32), metas)
    return keyframe_map


def near(keyframe: int, other: int | None = None) -> np.ndarray:
    """A query looking like ``keyframe`` (similarity 0.8) and a little like ``other`` (0.6)."""
    vector = np.zeros(DIM)
    vector[keyframe] = 0.8
    if other is not None:
        vector[other] = 0.6
    return image_of(vector)


def test_the_best_candidates_come_first_within_k_and_min_score():
    detector = LoopDetector(Describer(), road_map(), MatchingConfig(k=2, min_score=0.5, exclude_recent_s=0.0))
    detection = detector.process(near(3, other=5), 100 * SECOND)
    assert detection.fingerprint == Describer.fingerprint
    assert [m.keyframe_id for m in detection.candidates] == [3, 5]
    assert [m.score for m in detection.candidates] == pytest.approx([0.8, 0.6], abs=0.01)
    assert detection.accepted == detection.candidates  # no verification, no temporal consistency
    detector.set_matching(MatchingConfig(k=2, min_score=0.7, exclude_recent_s=0.0))
    assert [m.keyframe_id for m in detector.process(near(3, other=5), 101 * SECOND).candidates] == [3]


def test_the_score_basis_says_what_a_map_too_small_to_calibrate_scores_with():
    raw = LoopDetector(Describer(), road_map(), MatchingConfig(exclude_recent_s=0.0))
    assert raw.score_basis == "none (fewer than 20 keyframes): raw similarity"
    calibrated = Describer()
    calibrated.calibration = lambda similarity: similarity
    prior = LoopDetector(calibrated, road_map(), MatchingConfig(exclude_recent_s=0.0))
    assert prior.score_basis == "none (fewer than 20 keyframes): the model's own calibration"


def test_recent_and_nearby_keyframes_are_excluded():
    detector = LoopDetector(Describer(), road_map(), MatchingConfig(k=3, min_score=0.0, exclude_recent_s=4.0))
    # at t = 7 s, keyframes stamped after 3 s are too recent: keyframe 5 is not returned, 3 is
    assert [m.keyframe_id for m in detector.process(near(5, other=3), 7 * SECOND).candidates][0] == 3
    nearby = LoopDetector(Describer(), road_map(), MatchingConfig(k=3, min_score=0.0, exclude_recent_s=0.0,
                                                                  exclude_within_m=15.0))
    # just after keyframe 5, 2 m on: keyframes 4, 5 and 6 are within 15 m along the path, 3 is 22 m back
    ids = [m.keyframe_id for m in nearby.process(near(5, other=3), 5 * SECOND + SECOND // 2, pose_at(52.0)).candidates]
    assert ids[0] == 3 and not {4, 5, 6} & set(ids)


def test_temporal_consistency_accepts_a_place_once_the_images_before_it_agree():
    detector = LoopDetector(Describer(), road_map(), MatchingConfig(k=1, min_score=0.0, exclude_recent_s=0.0),
                            temporal=TemporalConfig(window=3, tolerance_m=3.0))
    accepted = [bool(detector.process(near(2 + i), (100 + i) * SECOND, pose_at(20.0 + 10.0 * i)).accepted)
                for i in range(4)]
    assert accepted == [False, False, True, True]
    assert detector.temporal_basis == "path, odometry"


def test_a_map_of_another_model_or_without_local_features_is_refused():
    other = KeyframeMap(DIM, "o" * 16, {}, model_name="other")
    with pytest.raises(ConfigError, match="built with model other"):
        LoopDetector(Describer(), other, MatchingConfig())
    with pytest.raises(ConfigError, match="no local features"):
        LoopDetector(Describer(), road_map(), MatchingConfig(), verification=VerificationConfig())


def test_mapping_mode_adds_the_keyframes_its_selector_accepts():
    keyframe_map = KeyframeMap(DIM, Describer.fingerprint, {}, model_name=Describer.model_name)
    detector = LoopDetector(Describer(), keyframe_map, MatchingConfig(exclude_recent_s=0.0),
                            mapping=KeyframeSelector(min_interval_s=1.0))
    added = [detector.process(near(i % DIM), i * SECOND // 2, pose_at(float(i))).added_keyframe_id for i in range(6)]
    assert added == [0, None, 1, None, 2, None]
    assert len(keyframe_map) == 3
    assert keyframe_map.local_features(1) is not None


class WideDescriber(Describer):
    """The stand-in with 64-d descriptors, read from an 8x8 image."""

    dim = 64
    fingerprint = "w" * 16

    def describe(self, images) -> np.ndarray:
        vectors = np.stack([image.reshape(-1)[:64].astype(np.float32) for image in images])
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def wide_image(vector) -> np.ndarray:
    image = np.zeros((8, 8, 3), np.uint8)
    image.reshape(-1)[:64] = np.round(np.asarray(vector, np.float64) / np.max(vector) * 250)
    return image


def twin_route():
    """60 keyframes every 2 m, one a second, without poses; keyframe 45 looks exactly like keyframe 15."""
    places = np.random.default_rng(0).random((60, 64)) ** 4  # sparse-ish, non-negative: an image can hold them
    places[45] = places[15]
    keyframe_map = KeyframeMap(64, WideDescriber.fingerprint, {}, model_name=WideDescriber.model_name)
    descriptors = places / np.linalg.norm(places, axis=1, keepdims=True)
    keyframe_map.add(descriptors.astype(np.float32),
                     [KeyframeMeta(stamp_ns=i * SECOND, pose=None, bag="route") for i in range(60)])
    return places, keyframe_map


def test_the_default_gate_publishes_a_revisit_in_order_and_not_a_look_alike_without_the_images_before_it():
    """The node's defaults (min_score 0.99, temporal consistency along the map's order): a revisit through the
    twinned keyframe is published, right, once the images before it agree; a look-alike image after images of
    places the map does not hold is not, though it matches its keyframe as well as the revisit did."""
    places, keyframe_map = twin_route()
    rng = np.random.default_rng(1)

    def query(vector):
        return wide_image(vector + 0.05 * rng.random(64))

    detector = LoopDetector(WideDescriber(), keyframe_map, MatchingConfig(), temporal=TemporalConfig())
    assert detector.score_basis.startswith("sequence margins, along the map's order")
    revisit = [detector.process(query(places[k]), (1000 + t) * SECOND) for t, k in enumerate(range(8, 28))]
    published = [(t, d.accepted[0].keyframe_id) for t, d in enumerate(revisit) if d.accepted]
    assert all(t >= 4 for t, _ in published)  # the history is full from the fifth image on
    assert all(abs(keyframe - (8 + t)) <= 1 for t, keyframe in published)
    assert len(published) >= 12 and any(keyframe == 15 for _, keyframe in published)

    stranger = LoopDetector(WideDescriber(), keyframe_map, MatchingConfig(), temporal=TemporalConfig())
    unmapped = np.random.default_rng(2).random((4, 64)) ** 4
    for t, vector in enumerate(unmapped):
        assert not stranger.process(query(vector), (2000 + t) * SECOND).accepted
    look_alike = stranger.process(query(places[15]), 2004 * SECOND)
    assert not look_alike.accepted



def test_no_candidate_scores_above_the_best_sequences_keyframe():
    """On a route whose neighbours look alike, a neighbour of the best sequence's keyframe has that keyframe
    beside it, not among its other places, so its own margin can be the larger: it must not be published where
    the best one is not (6 of 58 images scored a neighbour higher before)."""
    rng = np.random.default_rng(0)
    raw = rng.random((60, 64)) ** 4
    places = raw.copy()
    for i in range(1, 60):
        places[i] = 0.7 * places[i - 1] + 0.3 * raw[i]
    keyframe_map = KeyframeMap(64, WideDescriber.fingerprint, {}, model_name=WideDescriber.model_name)
    keyframe_map.add((places / np.linalg.norm(places, axis=1, keepdims=True)).astype(np.float32),
                     [KeyframeMeta(stamp_ns=i * SECOND, pose=None, bag="route") for i in range(60)])
    noise = np.random.default_rng(5)
    detector = LoopDetector(WideDescriber(), keyframe_map, MatchingConfig(k=20, min_score=0.0),
                            temporal=TemporalConfig())
    checked = 0
    for t, k in enumerate(range(2, 60)):
        candidates = detector.process(wide_image(places[k] + noise.random(64)), (1000 + t) * SECOND).candidates
        if candidates and candidates[0].consistent:
            assert all(c.score <= candidates[0].score for c in candidates)
            checked += 1
    assert checked >= 40
