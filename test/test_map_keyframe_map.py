"""KeyframeMap: search against brute force, exclusion, index types, atomic save and validated load."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import faiss
import numpy as np
import pytest

from tscm_ros.describe.models.vlad import Vocabulary
from tscm_ros.errors import ConfigError, MapError
from tscm_ros.io.geometry import Pose
from tscm_ros.map.exclusion import Exclusion
from tscm_ros.map.index import IndexConfig, auto_index_config, fit_pca
from tscm_ros.map.keyframe_map import KeyframeMap, KeyframeMeta
from tscm_ros.map.storage import FORMAT_VERSION, INDEX_FILE, KEYFRAMES_FILE, MANIFEST_FILE, VOCABULARY_FILE

DIM = 64
PREPROCESS = {"height": 120, "width": 160, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
              "resize": "stretch"}
SECOND = 1_000_000_000



@pytest.fixture(autouse=True, scope="module")
def one_faiss_thread():
    """Small searches are fastest single-threaded, and the CI machine is shared."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def clustered(n: int, seed: int = 0, dim: int = DIM) -> np.ndarray:
    """Unit-norm descriptors in runs of 10 around shared centres, like frames seen around one place."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((-(-n // 10), dim))
    return unit(np.repeat(centres, 10, axis=0)[:n] + 0.5 * rng.standard_normal((n, dim)))


def low_rank(n: int, seed: int, rank: int = 12) -> np.ndarray:
    """Clustered descriptors living near a rank-``rank`` subspace, as real descriptors mostly do."""
    rng = np.random.default_rng(seed)
    basis = rng.standard_normal((rank, DIM))
    latent = np.repeat(rng.standard_normal((-(-n // 10), rank)), 10, axis=0)[:n] + 0.5 * rng.standard_normal((n, rank))
    return unit(latent @ basis + 0.3 * rng.standard_normal((n, DIM)))


def perturbed(x: np.ndarray, seed: int = 1, noise: float = 0.3) -> np.ndarray:
    return unit(x + noise * np.random.default_rng(seed).standard_normal(x.shape) / np.sqrt(x.shape[1]))


def metas(n: int, bag: str = "route.bag", start: int = 0, positions: np.ndarray | None = None) -> list[KeyframeMeta]:
    """Keyframes every 0.5 s; with positions, each gets a pose there."""
    out = []
    for i in range(n):
        pose = None
        if positions is not None:
            pose = Pose(position=np.asarray(positions[i], dtype=np.float64), orientation=np.array([0.0, 0.0, 0.0, 1.0]))
        out.append(KeyframeMeta(stamp_ns=(start + i) * SECOND // 2, pose=pose, bag=bag))
    return out


def new_map(index: str = "flat", **params) -> KeyframeMap:
    return KeyframeMap(DIM, "fp-student-a", PREPROCESS, IndexConfig(type=index, **params), model_name="student-a")


def brute_force(database: np.ndarray, query: np.ndarray,
                allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    distances = ((database.astype(np.float64) - query.astype(np.float64)) ** 2).sum(axis=1)
    ids = np.arange(len(database))
    if allowed is not None:
        ids, distances = ids[allowed], distances[allowed]
    order = np.argsort(distances, kind="stable")
    return ids[order], distances[order]


def rehash(directory: Path) -> None:
    """Update the manifest's checksums after a test edits a file on purpose."""
    manifest = json.loads((directory / MANIFEST_FILE).read_text())
    for name in manifest["files"]:
        data = (directory / name).read_bytes()
        manifest["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest))


def edit_manifest(directory: Path, **changes) -> None:
    manifest = json.loads((directory / MANIFEST_FILE).read_text())
    manifest.update(changes)
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest))


# ----- search ------------------------------------------------------------------------------------------


def test_flat_query_matches_brute_force_with_distance_and_score():
    database = clustered(500)
    keyframe_map = new_map()
    ids = keyframe_map.add(database, metas(500))
    assert ids.tolist() == list(range(500)) and len(keyframe_map) == 500
    query = perturbed(database[123:124])[0]
    candidates = keyframe_map.query(query, k=5)
    expected_ids, expected_distances = brute_force(database, query)
    assert [c.keyframe_id for c in candidates] == expected_ids[:5].tolist()
    np.testing.assert_allclose([c.distance for c in candidates], expected_distances[:5], rtol=1e-4, atol=1e-5)
    for c in candidates:
        assert c.score == pytest.approx(max(0.0, 1.0 - c.distance / 2.0), abs=1e-6)
        assert c.score == pytest.approx(float(database[c.keyframe_id] @ query), abs=1e-4)  # cosine similarity
        assert c.stamp_ns == c.keyframe_id * SECOND // 2 and c.pose is None
    assert [c.score for c in candidates] == sorted((c.score for c in candidates), reverse=True)


def test_search_gives_the_query_as_arrays_and_nothing_from_an_empty_map():
    database = clustered(200)
    keyframe_map = new_map()
    assert [len(a) for a in keyframe_map.search_batch(database[:1], 3)[0]] == [0, 0, 0]
    keyframe_map.add(database, metas(200))
    queries = perturbed(database[[7, 150]])
    exclusion = Exclusion(min_time_gap_s=5.0, min_distance_m=0.0, query_stamp_ns=7 * SECOND // 2, query_position=None)
    for (ids, distances, scores), candidates in zip(keyframe_map.search_batch(queries, 8, exclusion),
                                                    keyframe_map.query_batch(queries, 8, exclusion)):
        assert ids.tolist() == [c.keyframe_id for c in candidates] and ids.dtype == np.int64
        assert distances.tolist() == pytest.approx([c.distance for c in candidates])
        assert scores.tolist() == [c.score for c in candidates]


def test_online_adds_one_at_a_time_equal_one_bulk_add_and_batch_equals_single_queries():
    database = clustered(300)
    bulk, online = new_map(), new_map()
    bulk.add(database, metas(300))
    all_metas = metas(300)
    for i in range(300):
        assert online.add(database[i : i + 1], all_metas[i : i + 1]).tolist() == [i]
    queries = perturbed(database[::37])
    batched = online.query_batch(queries, k=3)
    for query, from_batch in zip(queries, batched):
        single = bulk.query(query, k=3)
        assert [c.keyframe_id for c in single] == [c.keyframe_id for c in from_batch]
    np.testing.assert_array_equal(online.stamps, bulk.stamps)


def test_min_score_threshold_and_empty_map():
    database = clustered(200)
    keyframe_map = new_map()
    assert keyframe_map.query(database[0], k=3) == []
    keyframe_map.add(database, metas(200))
    query = perturbed(database[:1], noise=0.2)[0]
    strict = keyframe_map.query(query, k=10, min_score=0.9)
    assert strict and all(c.score >= 0.9 for c in strict)
    assert len(strict) == int(np.sum(database @ query >= 0.9 + 1e-6)) or len(strict) < 10
    assert keyframe_map.query(-database[0], k=10, min_score=0.5) == []  # opposite descriptor: nothing close


def test_time_exclusion_returns_k_valid_candidates():
    # The robot sat still: the 60 most recent keyframes look like the query; they must not crowd out
    # the k valid (older) ones.
    rng = np.random.default_rng(3)
    old = clustered(200, seed=4)
    recent = unit(np.repeat(old[50:51], 60, axis=0) + 0.05 * rng.standard_normal((60, DIM)) / np.sqrt(DIM))
    database = np.vstack([old, recent])
    keyframe_map = new_map()
    keyframe_map.add(database, metas(260))
    query_stamp = 260 * SECOND // 2
    exclusion = Exclusion(min_time_gap_s=10.0, query_stamp_ns=query_stamp)
    candidates = keyframe_map.query(database[259], k=5, exclusion=exclusion)
    allowed = np.abs(keyframe_map.stamps - query_stamp) >= 10 * SECOND
    expected_ids, _ = brute_force(database, database[259], allowed)
    assert [c.keyframe_id for c in candidates] == expected_ids[:5].tolist()
    assert candidates[0].keyframe_id == 50
    assert all(query_stamp - c.stamp_ns >= 10 * SECOND for c in candidates)
    # Without the exclusion the recent copies crowd the top 5.
    assert sum(c.keyframe_id >= 200 for c in keyframe_map.query(database[259], k=5)) >= 4


def test_distance_exclusion_is_along_the_trajectory_not_straight_line():
    # One lap of a 20 m circle, a keyframe every ~0.63 m; the query is back at the start.
    n = 100
    angles = np.linspace(0, 2 * np.pi, n, endpoint=False)
    positions = np.stack([10 * np.cos(angles), 10 * np.sin(angles), np.zeros(n)], axis=1)
    database = clustered(n, seed=5)
    keyframe_map = new_map()
    keyframe_map.add(database, metas(n, positions=positions))
    query_position = np.array([10.0, 0.0, 0.0])  # 0.63 m after the last keyframe, on top of keyframe 0
    exclusion = Exclusion(min_distance_m=5.0, query_position=query_position)
    candidates = keyframe_map.query(database[0], k=n, exclusion=exclusion)
    returned = {c.keyframe_id for c in candidates}
    assert 0 in returned and candidates[0].keyframe_id == 0  # the revisit is a loop closure, not excluded
    # The last ~5 m of path (about 7 keyframes) are excluded, nothing else.
    path_to_query = (n - 1 - np.arange(n)) * (2 * np.pi * 10 / n) + np.linalg.norm(query_position - positions[-1])
    assert returned == set(np.flatnonzero(path_to_query >= 5.0).tolist())
    assert 6 <= n - len(returned) <= 9
    np.testing.assert_allclose(candidates[0].pose.position, positions[0])
    # With a query stamp inside the lap (offline evaluation), the query sits at that time on the path.
    middle = Exclusion(min_distance_m=3.0, query_stamp_ns=50 * SECOND // 2, query_position=positions[50])
    near_middle = {c.keyframe_id for c in keyframe_map.query(database[50], k=n, exclusion=middle)}
    assert not near_middle & set(range(46, 55)) and {44, 56} <= near_middle


def test_keyframes_without_pose_are_only_excluded_by_time():
    database = clustered(40, seed=6)
    positions = np.zeros((40, 3))
    positions[:, 0] = np.arange(40) * 0.1
    all_metas = metas(40, positions=positions)
    for i in range(30, 40):
        all_metas[i].pose = None
    keyframe_map = new_map()
    keyframe_map.add(database, all_metas)
    assert np.isnan(keyframe_map.positions[30:]).all() and not np.isnan(keyframe_map.positions[:30]).any()
    exclusion = Exclusion(min_distance_m=1.0, query_position=np.array([3.0, 0.0, 0.0]))
    returned = {c.keyframe_id for c in keyframe_map.query(database[35], k=40, exclusion=exclusion)}
    # Path to the query: keyframe i (x = 0.1 i) is 3.0 - 0.1 i m behind it, so 21..29 are within 1 m.
    assert returned == set(range(0, 21)) | set(range(30, 40))


def _reference_exclusion(keyframe_map: KeyframeMap, exclusion: Exclusion) -> np.ndarray:
    """What the exclusion rules say, computed the slow obvious way: a boolean mask over all keyframes."""
    stamps = keyframe_map.stamps
    mask = np.abs((stamps - exclusion.query_stamp_ns).astype(np.float64)) < exclusion.min_time_gap_s * 1e9
    positions = keyframe_map.positions
    posed = np.flatnonzero(~np.isnan(positions[:, 0]))
    path = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(positions[posed], axis=0), axis=1))])
    before = posed[stamps[posed] <= exclusion.query_stamp_ns]
    anchor = before[np.argmax(stamps[before])]
    query_path = path[np.searchsorted(posed, anchor)] + np.linalg.norm(exclusion.query_position - positions[anchor])
    mask[posed] |= np.abs(path - query_path) < exclusion.min_distance_m
    return mask


@pytest.mark.parametrize("index, params", [
    ("flat", {}),
    ("hnsw", {"ef_search": 256}),
    ("hnsw", {"pca_dim": 32, "train_size": 256, "k_factor": 8, "ef_search": 256}),
    ("ivfpq", {"nlist": 4, "nprobe": 4, "train_size": 400, "k_factor": 50}),
    ("pq", {"train_size": 400}),
])
def test_exclusion_skips_the_excluded_inside_every_index_type(index, params):
    """Time and path exclusion together, keyframes without poses among them: every index returns the k best
    valid keyframes (those of brute force over the allowed ones), never an excluded one."""
    n = 600
    database = low_rank(n, seed=11)
    positions = np.stack([np.arange(n) * 0.5, np.zeros(n), np.zeros(n)], axis=1)
    keyframe_map = new_map(index, **params)
    all_metas = metas(n, positions=positions)
    for i in range(300, 320):
        all_metas[i].pose = None
    keyframe_map.add(database, all_metas)
    assert keyframe_map.is_trained
    # the robot is back near keyframe 100 at the time of keyframe 400: the last 20 s and the 30 m of path
    # around keyframe 400 are excluded (and keyframes 300-319, without pose, only by time)
    exclusion = Exclusion(min_time_gap_s=20.0, min_distance_m=30.0, query_stamp_ns=400 * SECOND // 2,
                          query_position=positions[400] + [0.2, 0.0, 0.0])
    allowed = ~_reference_exclusion(keyframe_map, exclusion)
    assert 100 < n - allowed.sum() < 200
    excluded = keyframe_map._track.excluded(exclusion)
    assert not (excluded.contains(np.arange(n)) ^ ~allowed).any()
    for source in (100, 380, 405):
        candidates = keyframe_map.query(database[source], k=10, exclusion=exclusion)
        ids = [c.keyframe_id for c in candidates]
        assert len(ids) == 10 and allowed[ids].all()
        expected, _ = brute_force(database, database[source], allowed)
        assert ids[:5] == expected[:5].tolist()
    batch = keyframe_map.query_batch(database[[100, 380]], k=10, exclusion=[exclusion, None])
    assert [c.keyframe_id for c in batch[0]] == [c.keyframe_id for c in
                                                  keyframe_map.query(database[100], 10, exclusion)]
    assert batch[1][0].keyframe_id == 380  # no exclusion for that one


def test_exclusion_of_a_map_in_time_order_is_a_range_and_out_of_order_still_correct():
    n = 200
    database = clustered(n, seed=12)
    in_order = new_map()
    in_order.add(database, metas(n))
    exclusion = Exclusion(min_time_gap_s=5.0, query_stamp_ns=100 * SECOND // 2)  # stamps every 0.5 s
    excluded = in_order._track.excluded(exclusion)
    assert excluded.ranges == [(91, 110)] and not excluded.ids  # found by binary search, no pass over the map

    shuffled = np.random.default_rng(0).permutation(n)  # bags added out of time order
    out_of_order = new_map()
    out_of_order.add(database[shuffled], [metas(n)[i] for i in shuffled])
    expected = {int(np.flatnonzero(shuffled == i)[0]) for i in range(91, 110)}
    assert set(np.flatnonzero(out_of_order._track.excluded(exclusion).contains(np.arange(n))).tolist()) == expected
    candidates = out_of_order.query(database[100], k=n, exclusion=exclusion)
    assert {c.keyframe_id for c in candidates} == set(range(n)) - expected
    out_of_order.add(database[:1], [KeyframeMeta(stamp_ns=100 * SECOND // 2, pose=None, bag="late")])
    assert n in {c.keyframe_id for c in out_of_order.query(database[0], k=n + 1)}
    assert n not in {c.keyframe_id for c in out_of_order.query(database[0], k=n + 1, exclusion=exclusion)}


def test_faiss_thread_count_is_per_calling_thread():
    """DescriptorIndex.search runs single queries on one OpenMP thread by setting the calling thread's count;
    that must not change other threads' (it is OpenMP's per-thread nthreads-var, checked here)."""
    import threading

    faiss.omp_set_num_threads(2)
    try:
        seen = {}

        def worker():
            faiss.omp_set_num_threads(1)
            seen["worker"] = faiss.omp_get_max_threads()

        thread = threading.Thread(target=worker)
        thread.start()
        thread.join()
        assert seen["worker"] == 1 and faiss.omp_get_max_threads() == 2
        keyframe_map = new_map()
        keyframe_map.add(clustered(50), metas(50))
        keyframe_map.query(clustered(50)[0], k=3)
        assert faiss.omp_get_max_threads() == 2  # restored for batches
    finally:
        faiss.omp_set_num_threads(1)  # the module's setting


def test_bad_descriptors_and_metadata_raise_map_error():
    keyframe_map = new_map()
    with pytest.raises(MapError, match="64-d"):
        keyframe_map.add(clustered(3, dim=32), metas(3))
    with pytest.raises(MapError, match="3 descriptors but 2"):
        keyframe_map.add(clustered(3), metas(2))
    with pytest.raises(MapError, match="NaN"):
        keyframe_map.add(np.full((1, DIM), np.nan, np.float32), metas(1))
    keyframe_map.add(clustered(3), metas(3))
    with pytest.raises(MapError, match="64-d"):
        keyframe_map.query(np.ones(32, np.float32), k=1)
    with pytest.raises(MapError, match="keyframe id 7"):
        keyframe_map.keyframe(7)
    with pytest.raises(ConfigError, match="unknown index type"):
        new_map("annoy")
    with pytest.raises(ConfigError, match="whiten"):
        new_map("hnsw", pca_dim=16, whiten=True, rerank=False)
    with pytest.raises(ConfigError, match="pq_m"):
        new_map("ivfpq", pq_m=5)


# ----- approximate indexes -----------------------------------------------------------------------------


def recall_at_1(keyframe_map: KeyframeMap, database: np.ndarray, queries: np.ndarray) -> float:
    exact = faiss.IndexFlatL2(DIM)
    exact.add(database)
    _, truth = exact.search(queries, 1)
    found = [r[0].keyframe_id for r in keyframe_map.query_batch(queries, k=1)]
    return float(np.mean(np.array(found) == truth[:, 0]))


def test_hnsw_finds_the_exact_neighbours_with_exact_distances():
    database = clustered(2000, seed=7)
    queries = perturbed(database[::20], seed=8, noise=2.0)
    keyframe_map = new_map("hnsw")
    keyframe_map.add(database, metas(2000))
    assert keyframe_map.is_trained and keyframe_map.factory == "HNSW32"
    assert recall_at_1(keyframe_map, database, queries) >= 0.97
    for candidate in keyframe_map.query(queries[0], k=5):
        exact = float(((database[candidate.keyframe_id] - queries[0]) ** 2).sum())
        assert candidate.distance == pytest.approx(exact, abs=1e-4)


def test_pca_index_searches_exactly_until_trained_then_reranks_with_exact_distances():
    database = low_rank(1500, seed=9)
    queries = perturbed(database[::15], seed=10, noise=2.0)
    keyframe_map = new_map("hnsw", pca_dim=16, train_size=1000)
    keyframe_map.add(database[:600], metas(600))
    assert not keyframe_map.is_trained and keyframe_map.factory == "Flat"
    expected_ids, _ = brute_force(database[:600], queries[0])
    assert [c.keyframe_id for c in keyframe_map.query(queries[0], k=4)] == expected_ids[:4].tolist()
    all_metas = metas(1500)
    for start in range(600, 1500, 300):  # the add that crosses train_size trains; later ones just add
        keyframe_map.add(database[start : start + 300], all_metas[start : start + 300])
    assert keyframe_map.is_trained and keyframe_map.factory == "PCA16,HNSW32,RFlat"
    assert len(keyframe_map) == 1500
    assert recall_at_1(keyframe_map, database, queries) >= 0.9
    for candidate in keyframe_map.query(queries[3], k=5):  # re-ranked: exact full-dimension distances
        exact = float(((database[candidate.keyframe_id] - queries[3]) ** 2).sum())
        assert candidate.distance == pytest.approx(exact, abs=1e-4)


def test_half_precision_rerank_distances_are_close_to_exact():
    database = low_rank(1200, seed=18)
    keyframe_map = new_map("hnsw", pca_dim=16, rerank_dtype="float16", train_size=1000)
    keyframe_map.add(database, metas(1200))
    assert keyframe_map.factory == "PCA16,HNSW32,Refine(SQfp16)"
    query = perturbed(database[5:6], seed=19)[0]
    candidates = keyframe_map.query(query, k=5)
    assert candidates[0].keyframe_id == 5
    for candidate in candidates:
        exact = float(((database[candidate.keyframe_id] - query) ** 2).sum())
        assert candidate.distance == pytest.approx(exact, abs=2e-3)


@pytest.mark.parametrize("index, exact", [
    (dict(), True), (dict(index="hnsw"), True), (dict(index="hnsw", pca_dim=16), True),
    (dict(index="hnsw", pca_dim=16, rerank_dtype="float16"), False),
    (dict(index="ivfpq", nlist=4, rerank=False), False),
])
def test_the_descriptors_of_chosen_keyframes_come_back_without_reconstructing_the_map(index, exact):
    database = low_rank(1200, seed=20)
    keyframe_map = new_map(**index, **({"train_size": 1000} if index.get("pca_dim") or index.get("nlist") else {}))
    keyframe_map.add(database, metas(1200))
    ids = np.array([1199, 3, 600])
    got = keyframe_map.contents().index.descriptors(ids)
    assert got.shape == (3, DIM) and got.dtype == np.float32
    if exact:
        np.testing.assert_array_equal(got, database[ids])
    else:  # half precision, or the quantiser's reconstruction: close, and nearest to its own keyframe
        assert np.abs(got - database[ids]).max() < (2e-3 if index.get("rerank_dtype") else 0.5)
        nearest = np.argmin(((got[:, None, :] - database[None, :, :]) ** 2).sum(axis=2), axis=1)
        np.testing.assert_array_equal(nearest, ids)
    assert keyframe_map.contents().index.descriptors(np.array([], np.int64)).shape == (0, DIM)


@pytest.mark.parametrize("count", [300, 40])  # more descriptors than dimensions, and fewer
def test_the_pca_is_fitted_as_faiss_fits_it(count):
    sample = low_rank(count, seed=21)
    ours, theirs = faiss.PCAMatrix(DIM, 16), faiss.PCAMatrix(DIM, 16)
    fit_pca(ours, sample)
    theirs.train(sample)
    assert ours.is_trained
    np.testing.assert_allclose(faiss.vector_to_array(ours.eigenvalues)[:16],
                               faiss.vector_to_array(theirs.eigenvalues)[:16], rtol=1e-3)
    projected, expected = ours.apply(sample[:20]), theirs.apply(sample[:20])  # the same up to each axis' sign
    np.testing.assert_allclose(np.abs(projected), np.abs(expected), atol=1e-4)


def test_a_pca_fitted_on_identical_descriptors_projects_without_nan():
    pca = faiss.PCAMatrix(DIM, 16)
    fit_pca(pca, np.repeat(low_rank(1, seed=22), 50, axis=0))
    assert np.isfinite(pca.apply(low_rank(5, seed=23))).all()


def test_pca_without_rerank_reports_projected_distance_lower_bound():
    database = clustered(1200, seed=11)
    keyframe_map = new_map("flat", pca_dim=16, rerank=False, train_size=1000)
    keyframe_map.add(database, metas(1200))
    assert keyframe_map.factory == "PCA16,Flat"
    query = perturbed(database[:1], seed=12, noise=2.0)[0]
    for candidate in keyframe_map.query(query, k=5):
        exact = float(((database[candidate.keyframe_id] - query) ** 2).sum())
        assert candidate.distance <= exact + 1e-5


def test_pq_scans_every_code_and_reranks_exactly_saved_and_loaded(tmp_path):
    """The pq index: exact until train_size, then 4-bit codes of every keyframe re-ranked by exact distance;
    saved, loaded and grown again it answers the same; k beyond the keyframes allowed by an exclusion pads
    nothing in."""
    database = low_rank(1200, seed=24)
    queries = perturbed(database[::40], seed=25, noise=2.0)
    keyframe_map = new_map("pq", train_size=1000)
    assert keyframe_map.index_config.pq_m == DIM // 4
    keyframe_map.add(database[:700], metas(700))
    assert not keyframe_map.is_trained and keyframe_map.factory == "Flat"
    keyframe_map.add(database[700:], metas(500, start=700))
    assert keyframe_map.is_trained and keyframe_map.factory == f"PQ{DIM // 4}x4fs,RFlat"
    assert recall_at_1(keyframe_map, database, queries) >= 0.95
    for candidate in keyframe_map.query(queries[3], k=5):
        exact = float(((database[candidate.keyframe_id] - queries[3]) ** 2).sum())
        assert candidate.distance == pytest.approx(exact, abs=1e-4)
    keyframe_map.save(tmp_path / "map")
    loaded = KeyframeMap.load(tmp_path / "map")
    assert loaded.index_config == keyframe_map.index_config and loaded.factory == keyframe_map.factory
    for a, b in zip(loaded.query_batch(queries, k=3), keyframe_map.query_batch(queries, k=3)):
        assert [c.keyframe_id for c in a] == [c.keyframe_id for c in b]
    loaded.add(database[:10], metas(10, start=1200))
    assert loaded.query(database[5], k=1)[0].keyframe_id in (5, 1205)
    nearly_all = Exclusion(min_time_gap_s=590.0, query_stamp_ns=0)  # stamps every 0.5 s: all but the last 30
    allowed = ~loaded._track.excluded(nearly_all).contains(np.arange(len(loaded)))
    assert allowed.sum() == 30
    found = [c.keyframe_id for c in loaded.query(database[0], k=50, exclusion=nearly_all)]
    assert sorted(found) == np.flatnonzero(allowed).tolist()


def test_pq_needs_reranking_and_the_auto_index_of_compact_descriptors_is_pq():
    with pytest.raises(ConfigError, match="needs rerank=True"):
        IndexConfig(type="pq", rerank=False)
    assert auto_index_config(512) == IndexConfig(type="pq")
    assert auto_index_config(3840).type == "hnsw"


def test_ivfpq_save_load_before_and_after_training(tmp_path):
    database = low_rank(1200, seed=13)
    queries = perturbed(database[::40], seed=14, noise=2.0)
    keyframe_map = new_map("ivfpq", pq_m=8, nprobe=8, k_factor=16, train_size=1000)
    keyframe_map.add(database[:700], metas(700))
    keyframe_map.save(tmp_path / "map")
    staged = KeyframeMap.load(tmp_path / "map")
    assert not staged.is_trained and len(staged) == 700
    staged.add(database[700:], metas(500, start=700))  # crosses train_size after loading
    assert staged.is_trained and re.fullmatch(r"IVF\d+,PQ8np,RFlat", staged.factory)
    assert recall_at_1(staged, database, queries) >= 0.9
    staged.save(tmp_path / "map")
    loaded = KeyframeMap.load(tmp_path / "map")
    assert loaded.index_config == staged.index_config and loaded.factory == staged.factory
    for a, b in zip(loaded.query_batch(queries, k=3), staged.query_batch(queries, k=3)):
        assert [c.keyframe_id for c in a] == [c.keyframe_id for c in b]
    index = json.loads((tmp_path / "map" / MANIFEST_FILE).read_text())["index"]
    edit_manifest(tmp_path / "map", index={**index, "nlist": 2 * index["nlist"]})  # the factory string disagrees
    with pytest.raises(MapError, match="does not match its index settings"):
        KeyframeMap.load(tmp_path / "map")


# ----- save and load -----------------------------------------------------------------------------------


def saved_map(tmp_path: Path, n: int = 50, name: str = "map") -> tuple[KeyframeMap, Path]:
    database = clustered(n, seed=15)
    positions = np.stack([np.arange(n) * 1.0, np.zeros(n), np.zeros(n)], axis=1)
    all_metas = metas(n, positions=positions)
    all_metas[3].pose = None
    all_metas[4].bag = "other.bag"
    all_metas[5].thumbnail = np.arange(12 * 16 * 3, dtype=np.uint8).reshape(12, 16, 3)
    keyframe_map = new_map()
    keyframe_map.add(database, all_metas)
    keyframe_map.save(tmp_path / name)
    return keyframe_map, tmp_path / name


def test_save_load_round_trip_keeps_everything(tmp_path):
    original, directory = saved_map(tmp_path)
    assert sorted(p.name for p in directory.iterdir()) == [INDEX_FILE, KEYFRAMES_FILE, MANIFEST_FILE, "thumbnails.npz"]
    manifest = json.loads((directory / MANIFEST_FILE).read_text())
    assert manifest["format_version"] == FORMAT_VERSION and manifest["dim"] == DIM and manifest["count"] == 50
    assert manifest["model_fingerprint"] == "fp-student-a" and manifest["model_name"] == "student-a"
    assert manifest["preprocess"] == PREPROCESS and manifest["index"]["type"] == "flat"
    assert {"created", "tscm_ros_version"} <= set(manifest)
    loaded = KeyframeMap.load(directory, expected_fingerprint="fp-student-a")
    assert len(loaded) == 50 and loaded.preprocess == PREPROCESS and loaded.dim == DIM
    np.testing.assert_array_equal(loaded.stamps, original.stamps)
    np.testing.assert_array_equal(loaded.positions, original.positions)
    assert loaded.keyframe(3).pose is None and np.isnan(loaded.positions[3]).all()
    np.testing.assert_array_equal(loaded.keyframe(7).pose.position, [7.0, 0.0, 0.0])
    np.testing.assert_array_equal(loaded.keyframe(7).pose.orientation, [0.0, 0.0, 0.0, 1.0])
    assert loaded.keyframe(4).bag == "other.bag" and loaded.keyframe(6).bag == "route.bag"
    np.testing.assert_array_equal(loaded.keyframe(5).thumbnail, original.keyframe(5).thumbnail)
    assert loaded.keyframe(6).thumbnail is None
    query = perturbed(clustered(50, seed=15)[10:11])[0]
    assert [c.keyframe_id for c in loaded.query(query, 5)] == [c.keyframe_id for c in original.query(query, 5)]
    # Path lengths are rebuilt on load: exclusion along the trajectory still works.
    exclusion = Exclusion(min_distance_m=2.5, query_position=np.array([50.0, 0.0, 0.0]))
    returned = {c.keyframe_id for c in loaded.query(query, 50, exclusion)}
    assert returned == set(range(48))  # 48 and 49 are within 2.5 m of path


def vocabulary(seed: int = 0, source: str = "map") -> Vocabulary:
    return Vocabulary(unit(np.random.default_rng(seed).standard_normal((4, 16))), images=30, source=source)


def test_a_vocabulary_round_trips_through_the_map_with_both_fingerprints(tmp_path):
    fitted = vocabulary()
    original = KeyframeMap(DIM, "fp-adapted", PREPROCESS, model_name="vlad", base_fingerprint="fp-vlad",
                           vocabulary=fitted)
    original.add(clustered(30, seed=3), metas(30))
    original.save(tmp_path / "map")
    manifest = json.loads((tmp_path / "map" / MANIFEST_FILE).read_text())
    assert manifest["model_fingerprint"] == "fp-adapted" and manifest["base_model_fingerprint"] == "fp-vlad"
    assert manifest["vocabulary"] == {"shapes": {"centres": [4, 16]}, "images": 30, "source": "map",
                                      "fingerprint": fitted.fingerprint()}
    assert VOCABULARY_FILE in manifest["files"]
    # The node loads the model by name: the map checks the model's own fingerprint, not the adapted one.
    loaded = KeyframeMap.load(tmp_path / "map", expected_fingerprint="fp-vlad")
    assert (loaded.model_fingerprint, loaded.base_fingerprint) == ("fp-adapted", "fp-vlad")
    np.testing.assert_array_equal(loaded.vocabulary.centres, fitted.centres)
    assert (loaded.vocabulary.images, loaded.vocabulary.source) == (30, "map")
    with pytest.raises(MapError, match="built with model vlad"):
        KeyframeMap.load(tmp_path / "map", expected_fingerprint="fp-adapted")


def test_a_damaged_vocabulary_is_refused_naming_the_file(tmp_path):
    keyframe_map = KeyframeMap(DIM, "fp-adapted", PREPROCESS, base_fingerprint="fp-vlad", vocabulary=vocabulary())
    keyframe_map.add(clustered(10), metas(10))
    keyframe_map.save(tmp_path / "map")
    np.savez(tmp_path / "map" / VOCABULARY_FILE, centres=vocabulary(seed=1).centres)
    rehash(tmp_path / "map")  # consistent checksums, but not the vocabulary the manifest describes
    with pytest.raises(MapError, match=f"{VOCABULARY_FILE} does not match the vocabulary"):
        KeyframeMap.load(tmp_path / "map")


def test_a_map_of_an_older_format_is_refused_with_a_message_to_rebuild_it(tmp_path):
    _, directory = saved_map(tmp_path)
    edit_manifest(directory, format_version=2, tscm_ros_version="0.6.0")
    with pytest.raises(MapError, match="format_version 2.*before maps fitted their own vocabulary.*rebuild the map "
                                       "with build_map"):
        KeyframeMap.load(directory)


def test_replacing_every_descriptor_rebuilds_the_index_and_keeps_the_keyframes(tmp_path):
    keyframe_map, _ = saved_map(tmp_path)
    replacement = clustered(50, seed=21)
    keyframe_map.replace_descriptors(replacement, "fp-refit", vocabulary())
    assert keyframe_map.model_fingerprint == "fp-refit" and keyframe_map.vocabulary.source == "map"
    best = keyframe_map.query(replacement[17], 1)[0]
    assert best.keyframe_id == 17 and best.distance < 1e-5
    assert keyframe_map.keyframe(4).bag == "other.bag" and len(keyframe_map) == 50
    with pytest.raises(MapError, match="49 descriptors for 50 keyframes"):
        keyframe_map.replace_descriptors(replacement[:49], "fp-refit", None)


def test_manifest_index_entry_keeps_its_layout_and_refuses_unknown_settings(tmp_path):
    _, directory = saved_map(tmp_path)
    index = json.loads((directory / MANIFEST_FILE).read_text())["index"]
    assert list(index.items()) == [
        ("type", "flat"), ("factory", "Flat"), ("trained", True), ("pca_dim", None), ("whiten", False),
        ("rerank", True), ("rerank_dtype", "float32"), ("k_factor", 4), ("hnsw_m", 32), ("ef_construction", 200),
        ("ef_search", 128), ("nlist", None), ("pq_m", 8), ("nprobe", 16), ("train_size", 0)]
    assert KeyframeMap.load(directory).index_config == IndexConfig(pq_m=8, train_size=0)
    edit_manifest(directory, index={**index, "colour": "red"})
    with pytest.raises(MapError, match="invalid index settings: unknown index settings colour"):
        KeyframeMap.load(directory)


def test_saving_over_a_map_replaces_it_and_a_failed_save_leaves_the_old_one(tmp_path, monkeypatch):
    _, directory = saved_map(tmp_path)
    bigger = new_map()
    bigger.add(clustered(80, seed=16), metas(80))
    bigger.save(directory)
    assert len(KeyframeMap.load(directory)) == 80

    # A crash while writing (here: the metadata write fails) must leave the complete old map in place.
    def failing_savez(*args, **kwargs):
        raise OSError("No space left on device")

    third = new_map()
    third.add(clustered(20, seed=17), metas(20))
    monkeypatch.setattr(np, "savez", failing_savez)
    with pytest.raises(OSError, match="No space"):
        third.save(directory)
    monkeypatch.undo()
    assert len(KeyframeMap.load(directory)) == 80
    assert sorted(p.name for p in tmp_path.iterdir()) == ["map"]  # no temp or backup directory left


def test_save_refuses_to_replace_something_that_is_not_a_map(tmp_path):
    precious = tmp_path / "home"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    keyframe_map = new_map()
    keyframe_map.add(clustered(5), metas(5))
    with pytest.raises(MapError, match="not a keyframe map"):
        keyframe_map.save(precious)
    assert (precious / "notes.txt").read_text() == "keep me"


def test_load_refuses_a_map_built_with_another_model(tmp_path):
    _, directory = saved_map(tmp_path)
    with pytest.raises(MapError) as error:
        KeyframeMap.load(directory, expected_fingerprint="fp-student-b", expected_model_name="student-b")
    message = str(error.value)
    assert str(directory) in message and "student-a" in message and "fp-student-a" in message
    assert "fp-student-b" in message and "--model" in message
    # Same model name, other weights (a map of the previous default model): say it is an older version.
    with pytest.raises(MapError, match="earlier version of student-a.*rebuild the map with build_map"):
        KeyframeMap.load(directory, expected_fingerprint="fp-student-a2", expected_model_name="student-a")


@pytest.mark.parametrize(
    "damage, expected",
    [
        (lambda d: (d / INDEX_FILE).unlink(), "index.faiss is missing"),
        (lambda d: (d / MANIFEST_FILE).unlink(), "no manifest.json"),
        (lambda d: (d / MANIFEST_FILE).write_text("{not json"), "not valid JSON"),
        (lambda d: edit_manifest(d, format_version=FORMAT_VERSION + 1, tscm_ros_version="9.0"),
         "newer|upgrade tscm_ros"),
        (lambda d: edit_manifest(d, dim="64"), "'dim'"),
        (lambda d: (d / INDEX_FILE).write_bytes((d / INDEX_FILE).read_bytes()[:-100]), "index.faiss is corrupt"),
        (lambda d: (d / KEYFRAMES_FILE).write_bytes(b"garbage"), "keyframes.npz is corrupt"),
    ],
    ids=["missing-index", "missing-manifest", "bad-json", "newer-version", "bad-field", "truncated-index",
         "garbage-keyframes"],
)
def test_load_rejects_damaged_maps_naming_the_file(tmp_path, damage, expected):
    _, directory = saved_map(tmp_path)
    damage(directory)
    with pytest.raises(MapError, match=expected) as error:
        KeyframeMap.load(directory)
    assert str(directory) in str(error.value)


def test_load_rejects_inconsistent_files_even_with_matching_checksums(tmp_path):
    _, directory = saved_map(tmp_path)
    good_index = (directory / INDEX_FILE).read_bytes()

    (directory / INDEX_FILE).write_bytes(good_index[:-100])  # truncated FAISS file, checksums updated
    rehash(directory)
    with pytest.raises(MapError, match="index.faiss is not a readable FAISS index"):
        KeyframeMap.load(directory)

    (directory / INDEX_FILE).write_bytes(good_index)
    edit_manifest(directory, dim=32)
    rehash(directory)
    with pytest.raises(MapError, match="holds 64-d vectors but .*dim 32"):
        KeyframeMap.load(directory)

    edit_manifest(directory, dim=DIM, count=51)
    with pytest.raises(MapError, match="holds 50 vectors but .*count 51"):
        KeyframeMap.load(directory)

    edit_manifest(directory, count=50)
    np.savez(directory / KEYFRAMES_FILE, stamp_ns=np.zeros(49, np.int64), position=np.zeros((49, 3)),
             orientation=np.zeros((49, 4)), bag_index=np.zeros(49, np.int32), bag_names=np.array(["a"]))
    rehash(directory)
    with pytest.raises(MapError, match="keyframes.npz does not describe the 50 keyframes"):
        KeyframeMap.load(directory)


def test_load_of_a_missing_map_mentions_an_interrupted_save(tmp_path):
    with pytest.raises(MapError, match="does not exist"):
        KeyframeMap.load(tmp_path / "nothing")
    _, directory = saved_map(tmp_path)
    # what a crash between the two renames leaves where the file system refuses an atomic exchange
    (tmp_path / ".map.tmp-1234abcd").mkdir()
    directory.rename(tmp_path / ".map.tmp-1234abcd" / "map.old")
    with pytest.raises(MapError, match=r"interrupted save left a map at .*\.map\.tmp-1234abcd/map\.old"):
        KeyframeMap.load(directory)
