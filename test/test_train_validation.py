"""Validation while training: the top-1 match of each val query, recall and the score calibration fitted on it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tscm_ros.describe.preprocess import PreprocessConfig
from tscm_ros.train.feature_cache import FeatureCache
from tscm_ros.train.validation import MAX_RECALL_KEY, ValSplit, fit_calibration, top1_matches

CPU = torch.device("cpu")


def test_top1_matches_gives_the_raw_score_and_whether_the_match_is_a_true_one():
    database = np.eye(3, dtype=np.float32)
    queries = np.array([[0.6, 0.8, 0.0], [0.0, 0.0, 1.0]], np.float32)
    database_positions = np.array([[0.0, 0.0, 0.0], [10.0, 0.0, 0.0], [100.0, 0.0, 0.0]])
    query_positions = np.array([[1.0, 0.0, 0.0], [50.0, 0.0, 0.0]])
    similarity, correct, has_loop = top1_matches(database, queries, database_positions, query_positions, 5.0)
    # query 0's nearest is keyframe 1 (0.8 > 0.6), 9 m away; query 1's is keyframe 2, 50 m away
    assert similarity == pytest.approx([1 - (0.36 + 0.04) / 2, 1.0])
    assert correct.tolist() == [False, False]
    assert has_loop.tolist() == [True, False]


def test_the_calibration_is_fitted_on_the_top1_matches():
    rng = np.random.default_rng(0)
    database = rng.standard_normal((40, 8)).astype(np.float32)
    database /= np.linalg.norm(database, axis=1, keepdims=True)
    positions = np.stack([np.arange(40) * 10.0, np.zeros(40), np.zeros(40)], axis=1)
    queries = database + 0.05 * rng.standard_normal(database.shape).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    calibration = fit_calibration(database, queries, positions, positions, 5.0, "val")
    assert calibration(0.99) >= calibration(0.2)


class Frames:
    def __init__(self, images: list[np.ndarray]) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def load_images(self, indices) -> list[np.ndarray]:
        return [self.images[i] for i in indices]


class Heads(torch.nn.Module):
    """Stand-in trainable heads: the cached trunk output, L2-normalised."""

    def forward(self, cached: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(cached, dim=1)

    def freeze(self) -> Heads:
        return self


def _split(query_offset_m: float) -> ValSplit:
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, (16, 16, 3), dtype=np.uint8) for _ in range(12)]
    noisy = [np.clip(image.astype(int) + rng.integers(-3, 4, image.shape), 0, 255).astype(np.uint8)
             for image in images]
    preprocess_config = PreprocessConfig(height=8, width=8)

    def trunk(x):
        return (x.flatten(1),)

    database = FeatureCache(trunk, Frames(images), preprocess_config, CPU, batch_size=5)
    queries = FeatureCache(trunk, Frames(noisy), preprocess_config, CPU, batch_size=5)
    positions = np.stack([np.arange(12) * 20.0, np.zeros(12), np.zeros(12)], axis=1)
    return ValSplit(Heads(), database, queries, positions, positions + [query_offset_m, 0.0, 0.0], 5.0, CPU, 4, False)


def test_recall_of_queries_that_find_their_own_place():
    recall = _split(0.0).recall()
    assert recall[1] == recall[5] == recall[10] == 1.0
    assert recall[MAX_RECALL_KEY] == 1.0


def test_recall_of_queries_whose_place_the_database_does_not_hold():
    recall = _split(1000.0).recall()
    assert recall[1] == 0.0 or np.isnan(recall[1])
