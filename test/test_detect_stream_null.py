"""The stream's correction of the map's null: its contrast, its wrong places, and the larger of the two rates."""

from __future__ import annotations

import numpy as np
import pytest

from tscm_ros.detect.stream_null import MIN_CONTRAST, MIN_SAMPLES, WRONG_PLACE_SPAN, StreamNull, wrong_place_candidates
from tscm_ros.detect.temporal import Normaliser
from tscm_ros.map.calibration import MapCalibration
from tscm_ros.map.keyframe_map import KeyframeMap, KeyframeMeta

NULL = MapCalibration(np.linspace(0.0, 0.2, 200), 200)  # the map's own: a look-alike's evidence up to 0.2
KEY = (False, 5)


def test_the_contrast_is_the_recent_queries_spread_over_the_maps_within_bounds():
    stream = StreamNull()
    assert stream.contrast(1.0) == 1.0  # no query yet
    for spread in (0.6, 0.7, 0.8, np.nan):
        stream.observe(spread)
    assert stream.contrast(1.0) == pytest.approx(0.7)
    assert stream.contrast(0.35) == 1.0  # never more cautious than the map's own null
    assert stream.contrast(10.0) == MIN_CONTRAST  # never more than twice as lenient
    assert stream.contrast(0.0) == 1.0


def test_before_enough_wrong_places_the_rate_is_the_maps_null_as_it_is():
    stream = StreamNull()
    for _ in range(10):
        stream.observe(0.5)
    for _ in range(MIN_SAMPLES - 1):
        stream.add(KEY, 0.0)
    evidence = np.array([0.1, 0.25, 0.4])
    assert np.allclose(stream.false_alarm_rate(KEY, evidence, NULL, 1.0), NULL.false_alarm_rate(evidence))


def test_a_dim_stream_whose_wrong_places_score_low_is_read_at_its_contrast():
    stream = StreamNull()
    for _ in range(10):
        stream.observe(0.5)
    for value in np.linspace(0.0, 0.05, 50):
        stream.add(KEY, value)
    evidence = np.array([0.12, 0.15])
    rate = stream.false_alarm_rate(KEY, evidence, NULL, 1.0)
    assert np.allclose(rate, NULL.false_alarm_rate(evidence / 0.5))
    assert (rate < NULL.false_alarm_rate(evidence) / 10).all()


def test_wrong_places_that_score_high_keep_the_rate_high_whatever_the_contrast():
    """A garden under haze: the stream is dim, and its far look-alikes score as high as a revisit."""
    stream = StreamNull()
    for _ in range(10):
        stream.observe(0.5)
    for value in np.linspace(0.0, 0.3, 50):
        stream.add(KEY, value)
    evidence = np.array([0.15])
    rate = stream.false_alarm_rate(KEY, evidence, NULL, 1.0)
    assert rate[0] == pytest.approx(MapCalibration(np.linspace(0.0, 0.3, 50), 50).false_alarm_rate(evidence)[0])
    assert rate[0] > 0.3
    assert stream.samples((True, 5)) == 0 and stream.samples(KEY) == 50  # per way of placing and length


def test_the_wrong_places_leave_out_the_tops_place_its_look_alike_stretch_and_the_sequences_span():
    rng = np.random.default_rng(0)
    places = rng.random((100, 32)) ** 4
    places[26:59] = places[42] + 0.01 * rng.random((33, 32))  # a stretch that looks alike, wider than the span
    descriptors = (places / np.linalg.norm(places, axis=1, keepdims=True)).astype(np.float32)
    keyframe_map = KeyframeMap(32, "f" * 16, {})
    keyframe_map.add(descriptors, [KeyframeMeta(stamp_ns=i * 10**9, pose=None, bag="route") for i in range(100)])
    normaliser = Normaliser(descriptors)
    found = np.argsort(-(descriptors @ descriptors[42]))
    others = wrong_place_candidates(keyframe_map, normaliser, descriptors[42], found, 42, window=5, count=20)
    assert len(others) == 20
    assert WRONG_PLACE_SPAN * 5 < 16
    assert not ((others >= 26) & (others <= 58)).any()
    assert list(others) == [i for i in found if not 26 <= i <= 58][:20]  # best first


def test_a_querys_mean_lowest_and_spread_come_from_its_own_similarities_to_the_sample():
    rng = np.random.default_rng(1)
    sample = rng.random((300, 16)).astype(np.float32)
    normaliser = Normaliser(sample)
    queries = rng.random((3, 16)).astype(np.float32)
    means, lowest = normaliser.stats(queries)
    for i in (0, 1, 0, 2):  # one query at a time, asked again after another
        centred = sample @ queries[i] - sample @ sample.mean(axis=0)
        single_mean, single_lowest = normaliser.stats(queries[i][None, :])
        assert single_mean[0] == pytest.approx(means[i], rel=1e-5) == pytest.approx(centred.mean(), rel=1e-4)
        assert single_lowest[0] == pytest.approx(lowest[i], rel=1e-5)
        assert normaliser.spread(queries[i]) == pytest.approx(centred.std(), rel=1e-4)
    own = sample @ sample.T - (sample @ sample.mean(axis=0))[None, :]
    rows = np.unique(np.linspace(0, 299, 256).astype(np.int64))
    expected = np.median([np.delete(own[r], r).std() for r in rows])
    assert normaliser.map_spread == pytest.approx(expected, rel=1e-4)
