"""Dataset extraction from real rosbag2 files, place splits, triplet mining and recall@N."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tscm_ros.cli import extract_dataset
from tscm_ros.errors import ConfigError, DatasetError
from tscm_ros.evaluate.recall import evaluate_descriptors, recall_at_n, retrieve
from tscm_ros.io.dataset import FRAME_COLUMNS, load_dataset
from tscm_ros.io.dataset_extraction import SplitConfig, assign_splits, buffer_mask
from tscm_ros.io.geometry import yaw_from_quaternion
from tscm_ros.train.mining import MiningConfig, PlaceGraph, mine_triplets


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
    reseeded = SplitConfig(cell_m=40, val_fraction=0.2, test_fraction=0.2, seed=4)
    assert not (assign_splits(positions, reseeded) == splits).all()
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
    mining = MiningConfig(negatives_per_triplet=3, negative_candidates=1000)
    graph = PlaceGraph(positions, sequences, np.zeros(80), mining)
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


# ---------------------------------------------------------------- extraction from real rosbag2 files


def _write_image_bag(path: Path, frames: int = 5, encoding: str = "rgb8") -> Path:
    """A real rosbag2 (sqlite3) with images only, no pose topic."""
    from rosbags.rosbag2 import Writer
    from rosbags.typesys import Stores, get_typestore

    store = get_typestore(Stores.ROS2_KILTED)
    names = ("sensor_msgs/msg/Image", "std_msgs/msg/Header", "builtin_interfaces/msg/Time")
    Image, Header, Time = (store.types[name] for name in names)
    with Writer(path, version=9) as writer:
        connection = writer.add_connection("/camera/image_raw", Image.__msgtype__, typestore=store)
        for i in range(frames):
            stamp = 10**9 + i * 10**8
            pixels = np.full((12, 16, 3), 40 * i, dtype=np.uint8).reshape(-1)
            message = Image(Header(Time(stamp // 10**9, stamp % 10**9), "camera"), 12, 16, encoding, 0, 48, pixels)
            writer.write(connection, stamp, store.serialize_cdr(message, Image.__msgtype__))
    return path


def _extract(bags, out: Path, *extra: str) -> int:
    argv = [arg for bag in bags for arg in ("--bag", str(bag))] + ["--out", str(out), "--no-progress", *extra]
    return extract_dataset.main(argv)


def _leftovers(directory: Path, name: str) -> list[Path]:
    return [p for p in directory.iterdir() if p.name.startswith(f".{name}.")]


@pytest.fixture(scope="module")
def extracted(route_reference, route_query, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("extract") / "dataset"
    split = ("--cell-m", "20", "--val-fraction", "0.2", "--test-fraction", "0.2")
    assert _extract([route_reference, route_query], out, *split) == 0
    return out


def test_extract_writes_images_table_and_manifest_from_two_traversals(extracted: Path, route_reference: Path):
    manifest = json.loads((extracted / "manifest.json").read_text())
    assert manifest["format"] == "tscm_ros.dataset" and manifest["version"] == 1
    assert [bag["sequence"] for bag in manifest["bags"]] == [0, 1]
    assert manifest["bags"][0]["path"] == str(route_reference)
    assert manifest["bags"][0]["image_topic"] == "/camera/image_raw" and manifest["bags"][0]["pose_topic"] == "/odom"
    dataset = load_dataset(extracted)
    assert len(dataset) == manifest["counts"]["frames"]
    assert sum(c for split in manifest["counts"]["splits"].values() for c in split.values()) == len(dataset)
    assert set(dataset.splits) == {"train", "val", "test"}
    assert set(dataset.sequences[dataset.roles == "database"]) == {0}
    assert set(dataset.sequences[dataset.roles == "query"]) == {1}
    images = sorted(p.name for p in (extracted / "images").iterdir())
    assert images == sorted(Path(p).name for p in dataset.images)
    first = dataset.image(0)
    assert first.dtype == np.uint8 and first.ndim == 3 and first.shape[2] == 3 and first.std() > 0
    for sequence in (0, 1):
        assert (np.diff(dataset.stamps_ns[dataset.sequences == sequence]) > 0).all()
    xy = dataset.positions[:, :2]
    distance = np.linalg.norm(xy[:, None] - xy[None], axis=2)
    assert distance[dataset.splits[:, None] != dataset.splits[None]].min() >= manifest["split"]["buffer_m"]
    assert not _leftovers(extracted.parent, extracted.name)


def test_extract_samples_by_travelled_distance(route_reference: Path, tmp_path: Path):
    assert _extract([route_reference], tmp_path / "all", "--buffer-m", "0") == 0
    assert _extract([route_reference], tmp_path / "sparse", "--buffer-m", "0", "--every-m", "12") == 0
    every = load_dataset(tmp_path / "all")
    sparse = load_dataset(tmp_path / "sparse")
    assert 1 < len(sparse) < len(every)
    travelled = np.r_[0, np.cumsum(np.linalg.norm(np.diff(every.positions[:, :2], axis=0), axis=1))]
    kept = travelled[np.isin(every.stamps_ns, sparse.stamps_ns)]
    assert (np.diff(kept) >= 12 - 1e-6).all()


def test_extract_refuses_a_bag_without_poses_and_writes_nothing(tmp_path: Path, capsys):
    bag = _write_image_bag(tmp_path / "images_only")
    out = tmp_path / "dataset"
    assert _extract([bag], out) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and str(bag) in error and "pose" in error
    assert not out.exists() and not _leftovers(tmp_path, "dataset")


def test_extract_refuses_an_unknown_image_encoding(tmp_path: Path, capsys):
    bag = _write_image_bag(tmp_path / "weird", encoding="weird42")
    assert _extract([bag], tmp_path / "dataset") == 2
    assert str(bag) in capsys.readouterr().err
    assert not (tmp_path / "dataset").exists() and not _leftovers(tmp_path, "dataset")


def test_extract_refuses_a_truncated_bag_and_leaves_no_partial_output(
    route_reference: Path, route_query: Path, tmp_path: Path, capsys
):
    truncated = tmp_path / "truncated"
    shutil.copytree(route_query, truncated)
    storage = max((p for p in truncated.iterdir() if p.suffix in (".db3", ".mcap")), key=lambda p: p.stat().st_size)
    storage.write_bytes(storage.read_bytes()[: storage.stat().st_size // 3])
    out = tmp_path / "dataset"
    assert _extract([route_reference, truncated], out) == 2
    assert "truncated" in capsys.readouterr().err
    assert not out.exists() and not _leftovers(tmp_path, "dataset")


def test_extract_refuses_missing_bags_and_existing_output(route_reference: Path, tmp_path: Path, capsys):
    assert _extract([tmp_path / "no_such_bag"], tmp_path / "dataset") == 2
    assert "no_such_bag" in capsys.readouterr().err
    (tmp_path / "taken").mkdir()
    assert _extract([route_reference], tmp_path / "taken") == 2
    assert "already exists" in capsys.readouterr().err


def test_extract_skips_and_counts_odometry_with_nan_or_infinity(tmp_path: Path, caplog):
    from bag_support import BAD_POSES, write_drive

    caplog.set_level("INFO")
    bag = write_drive(tmp_path / "bag", images=6, bad_poses=BAD_POSES)
    assert _extract([bag], tmp_path / "dataset", "--buffer-m", "0") == 0
    dataset = load_dataset(tmp_path / "dataset")
    assert len(dataset) == 6 and np.isfinite(dataset.positions).all()
    manifest = json.loads((tmp_path / "dataset" / "manifest.json").read_text())
    assert manifest["bags"][0]["poses_invalid"] == 4
    assert f"{bag}: 6 frames from /camera/image_raw, poses from /odom (22 messages (4 more skipped" in caplog.text


def test_load_dataset_refuses_damaged_files_naming_them(tmp_path: Path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.png").write_bytes(b"")
    (tmp_path / "manifest.json").write_bytes(np.random.default_rng(0).bytes(300))
    (tmp_path / "frames.csv").write_text("")
    with pytest.raises(DatasetError, match="manifest.json is not valid JSON"):
        load_dataset(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "tscm_ros.dataset", "version": "one"}))
    with pytest.raises(DatasetError, match="format version 'one', not a number"):
        load_dataset(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "tscm_ros.dataset", "version": 1}))
    for damage in (np.random.default_rng(1).bytes(3000), b"image,x\n\x00\x00\n"):
        (tmp_path / "frames.csv").write_bytes(damage)
        with pytest.raises(DatasetError, match=r"frames.csv (is not a UTF-8 CSV table|lacks columns)"):
            load_dataset(tmp_path)
    good = ["images/a.png", 1, 0, 0, 0, 0, 0, 0, 1, "bag", 0, "train", "database"]
    for column, value, what in ((2, "nan", "position"), (4, "-inf", "position"), (8, "nan", "orientation")):
        row = list(good)
        row[column] = value
        with open(tmp_path / "frames.csv", "w", newline="") as stream:
            csv.writer(stream).writerows([FRAME_COLUMNS, good, row])
        with pytest.raises(DatasetError, match=f"frames.csv has a NaN or infinite {what} in 1 row"):
            load_dataset(tmp_path)
