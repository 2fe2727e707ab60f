"""Sequence evidence: a candidate's sequence score is the support of the images before it along the map, in
normalised similarity, and its margin is over the best sequence of another place."""

from __future__ import annotations

import numpy as np
import pytest

from tscm_ros.detect.temporal import (
    ORDER_SLOPES,
    Normaliser,
    SequenceMatcher,
    TemporalConfig,
    TemporalConsistency,
    sequence_evidence,
    sequence_margins,
)
from tscm_ros.errors import ConfigError

DIM = 64
KEYFRAMES = 60


def _unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def keyframes() -> np.ndarray:
    """A route of keyframes every 2 m; keyframe 45 is a twin of keyframe 15 (a look-alike far along the map)."""
    descriptors = _unit(np.random.default_rng(0).normal(size=(KEYFRAMES, DIM)))
    descriptors[45] = descriptors[15]
    return descriptors


def _query(keyframes: np.ndarray, keyframe: int, rng) -> np.ndarray:
    return _unit(keyframes[keyframe][None, :] + 0.6 * rng.normal(size=(1, DIM)) / np.sqrt(DIM))[0]


def _drive(keyframes, images: list[int], with_poses: bool, window: int = 5):
    """Images of the given keyframes, one per 2 m; per image the keyframe of the best sequence score and that
    score, its evidence (sequence_evidence), and whether the history was full."""
    rng = np.random.default_rng(1)
    temporal = TemporalConsistency(TemporalConfig(window=window, tolerance_m=1.0))
    positions = np.arange(KEYFRAMES) * 2.0
    matcher = SequenceMatcher(KEYFRAMES, positions if with_poses else None, 1.0)
    normaliser = Normaliser(keyframes)
    same_place = np.abs(positions[:, None] - positions[None, :]) <= 4.0
    out = []
    for t, keyframe in enumerate(images):
        descriptor = _query(keyframes, keyframe, rng)
        similarities = keyframes @ descriptor
        candidates = np.argsort(-similarities)[:10]
        position = np.array([2.0 * t, 0.0, 0.0]) if with_poses else None
        scores, unordered = temporal.update(t * 500_000_000, position, descriptor, normaliser, matcher,
                                            lambda ids: keyframes[ids], candidates)
        evidence = sequence_evidence(scores, unordered, same_place[np.ix_(candidates, candidates)])
        best = int(np.argmax(scores))
        out.append((int(candidates[best]), float(scores[best]), float(evidence[best]), temporal.full))
    return out


@pytest.mark.parametrize("with_poses", [True, False])
def test_a_revisit_in_order_wins_over_a_twin_that_only_one_image_supports(keyframes, with_poses):
    route = list(range(8, 24))  # drives through keyframe 15, whose twin is keyframe 45
    best = _drive(keyframes, route, with_poses)
    assert [keyframe for keyframe, *_ in best[4:]] == route[4:]
    assert [full for *_, full in best] == [t >= 4 for t in range(len(route))]
    at_twin = route.index(15)
    assert best[at_twin][2] > 0.5  # the images before it tell the place from its twin, in order


def test_a_look_alike_without_the_images_before_it_gets_no_evidence(keyframes):
    """Images of unrelated places, then one of the twinned keyframe: high on that one image, no sequence."""
    rng = np.random.default_rng(2)
    scattered = [int(k) for k in rng.choice(np.arange(30, 44), 4, replace=False)] + [15]
    best = _drive(keyframes, scattered, with_poses=False)
    keyframe, _, margin, full = best[-1]
    assert full and keyframe in (15, 45)
    assert margin < 0.2  # the twin scores about the same: nothing tells them apart (a revisit: > 0.5)


def test_the_matcher_places_earlier_images_on_a_straight_path_back():
    matcher = SequenceMatcher(10, np.arange(10) * 2.0, tolerance_m=1.0)
    values = {lag: np.zeros(10) for lag in range(3)}
    values[1][4], values[2][3] = 2.0, 2.0  # the images before the candidate 5 matched 4 and 3

    def table(ids):
        return np.stack([values[lag][ids] for lag in range(3)])

    forward, backward, still = matcher.scores(np.array([5]), np.array([2.0]), [0.0, 2.0, 4.0],
                                              table, np.array([-1.0, -1.0, -1.0]),
                                              (1.0, -1.0, 0.0))
    assert forward[0] == pytest.approx(2.0)
    assert backward[0] == pytest.approx(2.0 / 3) and still[0] == pytest.approx(2.0 / 3)  # 6 and 7 ahead, 5 itself
    off_path = matcher.scores(np.array([5]), np.array([2.0]), [0.0, 6.0, 12.0],
                              table, np.array([-1.0, -1.0, -1.0]))[0]
    assert off_path[0] == pytest.approx((2.0 + 0.0 - 1.0) / 3)  # 6 m back: keyframe 2; 12 m back: before the map
    by_order = SequenceMatcher(10, None, tolerance_m=1.0)
    assert not by_order.by_path and 1.0 in ORDER_SLOPES
    assert by_order.scores(np.array([5]), np.array([2.0]), None, table,
                           np.array([-1.0, -1.0, -1.0]))[0, 0] == pytest.approx(2.0)


def test_without_odometry_a_stretch_the_map_skips_is_a_gap_a_sequence_has_to_cross():
    """A map with poses queried without odometry: the keyframes after a 24 m stretch the map skips are not
    one keyframe further on. Images of the keyframes before the stretch support a candidate past it only
    along the plain order."""
    lengths = np.array([0.0, 2.0, 4.0, 6.0, 8.0, 32.0, 34.0, 36.0, 40.0, 44.0])  # 8 -> 32 m: skipped
    along_path = SequenceMatcher(10, lengths, tolerance_m=3.0, odometry=False)
    assert not along_path.by_path  # no offsets: the images' speed is one of the slopes
    np.testing.assert_allclose(along_path.coordinates[:5], np.arange(5))  # in median spacings (2 m)
    values = {lag: np.full(10, -1.0) for lag in range(4)}
    values[1][4], values[2][3], values[3][2] = 2.0, 2.0, 2.0  # the images before matched 4, 3 and 2

    def table(ids):
        return np.stack([values[lag][ids] for lag in range(4)])

    lowest = np.full(4, -1.0)
    plain = SequenceMatcher(10, None, tolerance_m=3.0, odometry=False)
    assert plain.scores(np.array([5]), np.array([2.0]), None, table, lowest)[0, 0] == pytest.approx(2.0)
    assert along_path.scores(np.array([5]), np.array([2.0]), None, table, lowest)[0, 0] == pytest.approx(-0.25)
    assert along_path.scores(np.array([4]), np.array([2.0]), None, table,
                             np.full(4, -1.0))[0, 0] < 2.0  # 4 itself: 3, 2, 1 should then have matched
    on_sparse_keyframes = along_path.scores(np.array([9]), np.array([2.0]), None,
                                            lambda ids: np.stack([np.where(ids >= 6, 2.0, -1.0)] * 4), lowest)
    assert on_sparse_keyframes[0, 0] == pytest.approx(2.0)  # 4 m apart at the end: still one a keyframe


def test_candidates_scored_again_for_the_same_image_give_what_a_fresh_history_gives(keyframes):
    """The detector scores the wrong places after the pool for one image: a candidate scored twice, or among
    others, keeps its score, and a new image scores afresh."""
    matcher, normaliser = SequenceMatcher(KEYFRAMES, None, 1.0), Normaliser(keyframes)
    rng = np.random.default_rng(3)
    images = [_query(keyframes, k, rng) for k in (20, 21, 22, 23, 24)]
    reused, fresh = TemporalConsistency(TemporalConfig(window=4)), None
    for t, descriptor in enumerate(images):
        reused.update(t * 100_000_000, None, descriptor, normaliser, matcher, lambda ids: keyframes[ids],
                      np.array([24, 40]))
        fresh = TemporalConsistency(TemporalConfig(window=4))
        for u in range(max(0, t - 3), t + 1):
            fresh.update(u * 100_000_000, None, images[u], normaliser, matcher, lambda ids: keyframes[ids],
                         np.zeros(0, dtype=np.int64))
        more = np.array([40, 23, 5, 24, 23])
        got = reused.scores(normaliser, matcher, lambda ids: keyframes[ids], more)
        expected = fresh.scores(normaliser, matcher, lambda ids: keyframes[ids], more)
        np.testing.assert_allclose(got, expected, rtol=1e-5)  # float32 products: the rounding of other rows
    assert got[0][1] == got[0][4] and got[0][3] == got[0].max()  # 24, where the images are, the best


def test_a_gap_in_the_images_restarts_the_sequence(keyframes):
    temporal = TemporalConsistency(TemporalConfig(window=3, max_gap_s=1.0))
    matcher, normaliser = SequenceMatcher(KEYFRAMES, None, 1.0), Normaliser(keyframes)
    for t in range(3):
        temporal.update(t * 100_000_000, None, keyframes[t], normaliser, matcher, lambda ids: keyframes[ids],
                        np.array([t]))
    assert temporal.full
    temporal.update(10_000_000_000, None, keyframes[3], normaliser, matcher, lambda ids: keyframes[ids],
                    np.array([3]))
    assert not temporal.full


def test_an_image_without_candidates_enters_the_history(keyframes):
    temporal = TemporalConsistency(TemporalConfig(window=2))
    matcher, normaliser = SequenceMatcher(KEYFRAMES, None, 1.0), Normaliser(keyframes)
    scores, _ = temporal.update(0, None, keyframes[0], normaliser, matcher, lambda ids: keyframes[ids],
                                np.zeros(0, dtype=np.int64))
    assert len(scores) == 0
    temporal.update(100_000_000, None, keyframes[1], normaliser, matcher, lambda ids: keyframes[ids], np.array([1]))
    assert temporal.full


def test_with_a_pose_missing_in_the_history_a_path_sequence_has_no_score(keyframes):
    temporal = TemporalConsistency(TemporalConfig(window=2))
    matcher, normaliser = SequenceMatcher(KEYFRAMES, np.arange(KEYFRAMES) * 2.0, 1.0), Normaliser(keyframes)
    temporal.update(0, None, keyframes[0], normaliser, matcher, lambda ids: keyframes[ids], np.array([0]))
    scores, _ = temporal.update(100_000_000, np.zeros(3), keyframes[1], normaliser, matcher,
                                lambda ids: keyframes[ids], np.array([1]))
    assert np.isnan(scores).all()


def test_evidence_is_the_smaller_of_the_margin_over_other_places_and_over_the_same_images_unordered():
    same_place = np.array([[1, 1, 0], [1, 1, 0], [0, 0, 1]], dtype=bool)
    np.testing.assert_allclose(sequence_margins(np.array([3.0, 2.5, 1.0]), same_place), [2.0, 1.5, -2.0])
    np.testing.assert_allclose(sequence_margins(np.array([3.0, 2.0]), np.ones((2, 2), dtype=bool)), [1.0, 0.0])
    np.testing.assert_allclose(sequence_evidence(np.array([3.0, 2.5, 1.0]), np.array([2.5, 0.0, 0.0]), same_place),
                               [0.5, 1.5, -2.0])


@pytest.mark.parametrize("settings, message", [
    ({"window": 1}, "window"), ({"window": 2.5}, "window"), ({"tolerance_m": -1.0}, "tolerance_m"),
    ({"tolerance_m": float("nan")}, "tolerance_m"), ({"max_gap_s": 0.0}, "max_gap_s"),
    ({"max_gap_s": float("inf")}, "max_gap_s"), ({"long_window": 5}, "long_window"),
    ({"window": 25}, "long_window"), ({"long_window": -1}, "long_window"), ({"long_window": 30.0}, "long_window"),
])
def test_the_settings_are_checked(settings, message):
    with pytest.raises(ConfigError, match=message):
        TemporalConfig(**settings)


def test_the_sequence_lengths_scored():
    assert TemporalConfig().windows == (5, 20)
    assert TemporalConfig(window=3, long_window=0).windows == (3,)
    assert TemporalConfig(window=25, long_window=40).windows == (25, 40)
