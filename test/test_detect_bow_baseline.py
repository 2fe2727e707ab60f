"""The ORB bag-of-binary-words baseline: tf-idf vectors, DBoW2's L1 score, and place recognition on real images."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from tscm_ros.detect.bow_baseline import BowLoopDetector, OrbVocabulary, l1_scores, orb_descriptors
from tscm_ros.detect.detection import MatchingConfig
from tscm_ros.errors import ConfigError

EVALUATION = MatchingConfig(k=3, min_score=0.0, exclude_recent_s=0.0)


def place_image(place: int, size=(240, 320)) -> np.ndarray:
    """A textured RGB image of a 'place': random rectangles, circles and lines seeded by the place."""
    rng = np.random.default_rng(place)
    image = np.full((*size, 3), rng.integers(60, 200, 3), dtype=np.uint8)
    for _ in range(40):
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        x, y = int(rng.integers(0, size[1])), int(rng.integers(0, size[0]))
        shape = rng.integers(0, 3)
        if shape == 0:
            cv2.rectangle(image, (x, y), (x + int(rng.integers(5, 40)), y + int(rng.integers(5, 40))), colour, -1)
        elif shape == 1:
            cv2.circle(image, (x, y), int(rng.integers(3, 20)), colour, -1)
        else:
            cv2.line(image, (x, y), (int(rng.integers(0, size[1])), int(rng.integers(0, size[0]))), colour, 2)
    return image


def revisit(image: np.ndarray, seed: int) -> np.ndarray:
    """The same place seen again: brighter, shifted by a few pixels, with sensor noise."""
    rng = np.random.default_rng(1000 + seed)
    shifted = np.roll(image, (int(rng.integers(-3, 4)), int(rng.integers(-3, 4))), axis=(0, 1)).astype(np.float32)
    noisy = shifted * 1.15 + 10 + rng.normal(0, 4, shifted.shape)
    return np.clip(noisy, 0, 255).astype(np.uint8)


def test_bow_vector_is_tf_idf_normalised_to_unit_l1():
    rng = np.random.default_rng(0)
    words = rng.integers(0, 256, (3, 32), dtype=np.uint8)
    vocabulary = OrbVocabulary(words, np.array([1.0, 2.0, 0.0]))
    # Occurrences 2, 1, 1 of 4 features: tf 0.5, 0.25, 0.25; times idf 1, 2, 0 -> 0.5, 0.5, 0.
    vector = vocabulary.bow_vector(words[[0, 0, 1, 2]])
    np.testing.assert_allclose(vector, [0.5, 0.5, 0.0])
    assert vocabulary.bow_vector(np.zeros((0, 32), dtype=np.uint8)).sum() == 0.0


def test_l1_score_is_dbow2s_one_minus_half_l1_distance():
    rng = np.random.default_rng(1)
    query = rng.random(50) * (rng.random(50) > 0.6)
    query /= query.sum()
    keyframes = rng.random((7, 50)) * (rng.random((7, 50)) > 0.5)
    keyframes /= keyframes.sum(axis=1, keepdims=True)
    expected = 1.0 - 0.5 * np.abs(keyframes - query).sum(axis=1)
    np.testing.assert_allclose(l1_scores(query, keyframes), expected, atol=1e-12)
    np.testing.assert_allclose(l1_scores(query, query[None, :]), [1.0])
    assert l1_scores(np.zeros(50), keyframes).tolist() == [0.0] * 7


def test_trained_idf_is_log_of_images_over_images_containing_the_word():
    descriptor_sets = [orb_descriptors(place_image(p)) for p in range(4)]
    vocabulary = OrbVocabulary.train(descriptor_sets, num_words=64, seed=0)
    assert 2 <= len(vocabulary) <= 64
    containing = np.zeros(len(vocabulary))
    for descriptors in descriptor_sets:
        containing[np.unique(vocabulary.assign(descriptors))] += 1
    expected = np.where(containing > 0, np.log(4 / np.maximum(containing, 1)), 0.0)
    np.testing.assert_allclose(vocabulary.idf, expected, rtol=1e-6)


def test_detector_recognises_revisited_places_and_ranks_them_first():
    places = range(8)
    reference = [orb_descriptors(place_image(p)) for p in places]
    assert all(len(d) > 100 for d in reference)
    vocabulary = OrbVocabulary.train(reference, num_words=200, seed=0)
    detector = BowLoopDetector(vocabulary, EVALUATION)
    for place, descriptors in zip(places, reference):
        assert detector.add_keyframe(descriptors, stamp_ns=place * 10**9) == place
    for place in places:
        detection = detector.process(revisit(place_image(place), place), stamp_ns=100 * 10**9)
        assert [c.keyframe_id for c in detection.candidates][0] == place
        scores = [c.score for c in detection.candidates]
        assert len(scores) == 3 and scores == sorted(scores, reverse=True)
        assert 0.0 <= scores[-1] <= scores[0] <= 1.0
        assert detection.candidates[0].distance == pytest.approx(2 * (1 - scores[0]))


def test_detector_excludes_recent_keyframes_and_low_scores():
    reference = [orb_descriptors(place_image(p)) for p in range(3)]
    vocabulary = OrbVocabulary.train(reference, num_words=100, seed=0)
    detector = BowLoopDetector(vocabulary, MatchingConfig(k=3, min_score=0.0, exclude_recent_s=5.0))
    for place, descriptors in enumerate(reference):
        detector.add_keyframe(descriptors, stamp_ns=place * 10 * 10**9)
    # The query at t = 12 s excludes keyframe 1 (t = 10 s) even though it shows the same place.
    ids = [c.keyframe_id for c in detector.process(place_image(1), stamp_ns=12 * 10**9).candidates]
    assert ids and 1 not in ids
    strict = BowLoopDetector(vocabulary, MatchingConfig(k=3, min_score=0.99, exclude_recent_s=0.0))
    strict.add_keyframe(reference[0], 0)
    blank = np.full((240, 320, 3), 128, dtype=np.uint8)  # no ORB features: scores 0
    assert strict.process(blank, 0).candidates == []
    assert [c.keyframe_id for c in strict.process(place_image(0), 0).candidates] == [0]


def test_bad_vocabulary_inputs_are_config_errors():
    with pytest.raises(ConfigError, match="no ORB features"):
        OrbVocabulary.train([np.zeros((0, 32), dtype=np.uint8)], num_words=10)
    with pytest.raises(ConfigError):
        OrbVocabulary(np.zeros((0, 32), dtype=np.uint8), np.zeros(0))
    with pytest.raises(ConfigError, match="exclude_within_m"):
        BowLoopDetector(OrbVocabulary(np.zeros((1, 32), dtype=np.uint8), np.ones(1)),
                        MatchingConfig(exclude_within_m=3.0))
