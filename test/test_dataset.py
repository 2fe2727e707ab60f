"""Dataset extraction from real rosbag2 files, place splits, triplet mining and recall@N."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from tscm_ros.dataset import (
    FRAME_COLUMNS,
    MiningConfig,
    PlaceGraph,
    SplitConfig,
    assign_splits,
    buffer_mask,
    load_dataset,
    mine_triplets,
    yaw_from_quaternion,
)
from tscm_ros.errors import ConfigError, DatasetError
from tscm_ros.recall import evaluate_descriptors, recall_at_n, retrieve


def _loop(n: int, radius: float = 60.0, noise: float = 0.0, seed: int = 0) -> np.ndarray:
    angle = np.linspace(0, 2 * np.pi, n, endpoint=False)
    points = np.c_[radius * np.cos(angle), radius * np.sin(angle), np.zeros(n)]
    return points + np.random.default_rng(seed).normal(0, noise, points.shape) * [1, 1, 0]


def _yaw_quaternion(yaw: np.ndarray) -> np.ndarray:
    return np.c_[np.zeros_like(yaw), np.zeros_like(yaw), np.sin(yaw / 2), np.cos(yaw / 2)]


# ---------------------------------------------------------------- recall


def test_recall_at_n_counts_hits_in_top_n_and_skips_unanswerable_queries():
    retrieved = np.array([[3, 1, 2], [0, 2, 1], [2, 0, 1], [0, 1, 2]])
    ground_truth = [np.array([3]), np.array([1]), np.array([5]), np.array([], dtype=int)]
    result = recall_at_n(retrieved, ground_truth, ns=(1, 2, 3))
    # query 0: hit at rank 1; query 1: hit at rank 3; query 2: never; query 3: no match, skipped
    assert result.recall == {1: pytest.approx(1 / 3), 2: pytest.approx(1 / 3), 3: pytest.approx(2 / 3)}
    assert (result.num_queries, result.num_skipped) == (3, 1)


def test_evaluate_descriptors_uses_exact_faiss_search_and_position_ground_truth():
    rng = np.random.default_rng(1)
    database = rng.normal(size=(50, 16)).astype(np.float32)
    database /= np.linalg.norm(database, axis=1, keepdims=True)
    positions = np.c_[np.arange(50) * 30.0, np.zeros(50), np.zeros(50)]
    # queries: exact copies of database 0..9 (found at rank 1), then 10..19 shifted to a wrong place
    queries = database[:20].copy()
    query_positions = positions[:20].copy()
    query_positions[10:, 0] += 30.0 * 7
    assert (retrieve(queries, database, 1)[:, 0] == np.arange(20)).all()
    result = evaluate_descriptors(queries, database, query_positions, positions, radius_m=25.0, ns=(1, 5))
    assert result.recall[1] == pytest.approx(0.5)
    assert result.num_queries == 20


# ---------------------------------------------------------------- splits


def test_place_split_keeps_whole_cells_together_and_is_seeded():
    positions = np.r_[_loop(200, radius=150), _loop(200, radius=150, noise=1.5, seed=2)]
    cfg = SplitConfig(cell_m=40, val_fraction=0.2, test_fraction=0.2, seed=3)
    splits = assign_splits(positions, cfg)
    assert set(splits) == {"train", "val", "test"}
    cells = [tuple(c) for c in np.floor(positions[:, :2] / 40).astype(int)]
    for cell in set(cells):
        assert len({s for s, c in zip(splits, cells) if c == cell}) == 1
    assert (assign_splits(positions, cfg) == splits).all()
    assert not (assign_splits(positions, SplitConfig(cell_m=40, val_fraction=0.2, test_fraction=0.2, seed=4)) == splits).all()
    assert 0.4 < (splits == "train").mean() < 0.8


def test_split_buffer_keeps_places_of_different_splits_apart():
    positions = np.r_[_loop(300, radius=150), _loop(300, radius=150, noise=2.0, seed=5)]
    splits = assign_splits(positions, SplitConfig(cell_m=40, seed=1))
    keep = buffer_mask(positions, splits, buffer_m=10.0)
    assert 0 < (~keep).sum() < len(keep) // 2
    kept_xy, kept_split = positions[keep, :2], splits[keep]
    distance = np.linalg.norm(kept_xy[:, None] - kept_xy[None], axis=2)
    different = kept_split[:, None] != kept_split[None]
    assert distance[different].min() >= 10.0
    assert (splits[~keep] != "test").all()  # test frames are never the ones dropped


def test_bad_split_settings_are_rejected():
    with pytest.raises(ConfigError, match="fractions"):
        SplitConfig(val_fraction=0.6, test_fraction=0.5)
    with pytest.raises(ConfigError, match="positive_radius_m"):
        MiningConfig(positive_radius_m=30, negative_radius_m=25)


# ---------------------------------------------------------------- mining


def test_positives_are_near_and_from_another_traversal_negatives_are_far():
    positions = np.r_[_loop(60), _loop(60, noise=1.0, seed=1)]
    sequences = np.r_[np.zeros(60, int), np.ones(60, int)]
    graph = PlaceGraph(positions, sequences, np.zeros(120), MiningConfig())
    rng = np.random.default_rng(0)
    embeddings = rng.normal(size=(120, 8)).astype(np.float32)
    triplets = mine_triplets(embeddings, graph, rng)
    assert len(triplets) == 120 and triplets.negatives.shape == (120, 10)
    xy = positions[:, :2]
    for a, p, negatives in zip(triplets.anchors, triplets.positives, triplets.negatives):
        assert sequences[a] != sequences[p]
        assert np.linalg.norm(xy[a] - xy[p]) <= 10.0
        assert (np.linalg.norm(xy[negatives] - xy[a], axis=1) > 25.0).all()


def test_mining_picks_the_nearest_positive_and_the_hardest_negatives_in_embedding_space():
    positions = np.r_[_loop(40), _loop(40)]
    sequences = np.r_[np.zeros(40, int), np.ones(40, int)]
    graph = PlaceGraph(positions, sequences, np.zeros(80), MiningConfig(negatives_per_triplet=3, negative_candidates=1000))
    embeddings = np.eye(80, dtype=np.float32)
    hard = [20, 21, 22]  # far from frame 0 on the loop; make them look like it
    embeddings[hard] = 0.9 * embeddings[0] + 0.1 * embeddings[hard]
    embeddings[40] = embeddings[0]  # the same place in the other traversal, identical look
    triplets = mine_triplets(embeddings, graph, np.random.default_rng(0))
    row = list(triplets.anchors).index(0)
    assert triplets.positives[row] == 40
    assert sorted(triplets.negatives[row]) == hard


def test_heading_aware_mining_refuses_positives_facing_away():
    positions = np.r_[_loop(40), _loop(40)]
    sequences = np.r_[np.zeros(40, int), np.ones(40, int)]
    headings = np.r_[np.zeros(40), np.full(40, np.pi)]  # second traversal drives the other way
    graph = PlaceGraph(positions, sequences, headings, MiningConfig(heading_deg=45))
    assert len(graph.usable_anchors()) == 0
    same_way = PlaceGraph(positions, sequences, np.zeros(80), MiningConfig(heading_deg=45))
    assert len(same_way.usable_anchors()) == 80


def test_yaw_from_quaternion_round_trips():
    yaw = np.array([0.0, 0.5, -2.0, 3.0])
    assert np.allclose(yaw_from_quaternion(_yaw_quaternion(yaw)), yaw)


# ---------------------------------------------------------------- loading


def test_load_dataset_rejects_missing_empty_and_incomplete_directories(tmp_path: Path):
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset(tmp_path / "nowhere")
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "tscm_ros.dataset", "version": 1}))
    with pytest.raises(DatasetError, match="frames.csv is missing"):
        load_dataset(tmp_path)
    with open(tmp_path / "frames.csv", "w", newline="") as stream:
        csv.writer(stream).writerow(FRAME_COLUMNS)
    with pytest.raises(DatasetError, match="empty dataset"):
        load_dataset(tmp_path)
    with open(tmp_path / "frames.csv", "a", newline="") as stream:
        csv.writer(stream).writerow(["images/a.png", 1, 0, 0, 0, 0, 0, 0, 1, "bag", 0, "train", "database"])
    with pytest.raises(DatasetError, match="images/a.png"):
        load_dataset(tmp_path)
