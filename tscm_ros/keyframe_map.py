"""Keyframe map: global descriptors in a FAISS index plus per-keyframe metadata.

Distance and score
------------------
Descriptors are expected to be L2-normalised (the Describer's rows are). ``Candidate.distance`` is the
squared Euclidean distance ``d`` between the query descriptor and the keyframe descriptor, in [0, 4] for
unit-norm vectors, and ``Candidate.score = clip(1 - d / 2, 0, 1)``: their cosine similarity clipped at 0
(1 for identical descriptors, 0 for orthogonal or opposite ones). ``min_score`` drops candidates scoring
below it, which is the same as a distance threshold ``d <= 2 * (1 - min_score)``.

The distance is exact (computed from the full descriptors) for the ``flat`` and plain ``hnsw`` indexes, and
for every lossy index (PCA reduction or IVF-PQ) built with ``rerank=True``, the default: the lossy index
then only proposes a shortlist of ``k * k_factor`` keyframes, which FAISS re-ranks by their exact distance
to the query (``IndexRefineFlat``), so scores and thresholds mean the same for every index type.
``rerank_dtype='float16'`` keeps the full descriptors in half precision instead (half the memory: 4 GB for
1M 2048-d keyframes; distances then differ from exact by about 1e-3). With ``rerank=False`` the map does not
keep the full descriptors (``4 * dim`` bytes less per keyframe) and the distance is the lossy index's own
estimate: for PCA, the squared distance between the projections on the ``pca_dim`` principal components (a
lower bound of the true distance, so scores are slightly optimistic); for PQ, its quantised approximation of
that. Whitening changes the metric itself, so it requires ``rerank=True``.

Index types
-----------
- ``flat``: exact search (``IndexFlatL2``). Adding is an append, so online mapping one keyframe at a time
  between queries is cheap.
- ``hnsw``: graph search (``IndexHNSWFlat``: ``hnsw_m`` links per node, ``ef_construction``,
  ``ef_search``). Incremental adds, no training.
- ``ivfpq``: inverted lists with product quantisation (``nlist`` lists, ``pq_m`` bytes per vector,
  ``nprobe`` lists visited per query). Needs training.
Measured by ``bench/map_search.py`` (2048-d, PCA to 256, re-ranked, 2-core CPU): at 10k keyframes
``hnsw`` with the default ``ef_search`` 128 answers in about 0.3 ms with 99.5 % recall@1 against exact
search; at 100k it needs ``ef_search`` 512 (1.7 ms, 98.6 %), at 1M ``ef_search`` 512 gives 2.9 ms and
92.5 % (float16 re-ranking; 2048 reaches 97.9 % at about 14 ms: at 1M the graph search, not the
re-ranking shortlist, misses the neighbour, and a larger ``k_factor`` does not help). Queries with exclusion on
cost the same recall and 0.05-0.3 ms more, at any map size. ``ivfpq`` trails it in recall at equal latency (it needs ``nprobe`` of half ``nlist`` or more); it is
the choice when memory, not latency, is the limit.
Any type can put a PCA reduction to ``pca_dim`` (optionally whitened) in front; it is learned from the
map's own descriptors. Types that need training (``ivfpq``, or any with ``pca_dim``) keep an exact flat
index until the map holds ``train_size`` descriptors; the ``add`` that reaches it trains on them (at most
``MAX_TRAIN_POINTS``, sampled with a fixed seed) and moves them into the real index, so that one call takes
seconds on a big map. Later adds go straight in; the learned PCA and quantisers are not updated.
``nlist`` left at None is chosen at training time as the power of two nearest ``sqrt(n)`` for the ``n``
descriptors present then: set it explicitly for a map that will grow far beyond ``train_size``.

Exclusion
---------
So that a robot does not "close a loop" with what it has just seen, a query can exclude keyframes
(``Exclusion``): those whose stamp is within ``min_time_gap_s`` of ``query_stamp_ns`` (either side), and,
when the query position is known, those within ``min_distance_m`` *along the trajectory*: the path length
travelled between the keyframe and the query, not their straight-line distance (a real revisit is close
in space but far along the path). The path length is accumulated over the keyframes that have a pose, in
the order they were added (time order, as the bag reader and the node deliver them); the query is placed on
it after the latest posed keyframe not newer than ``query_stamp_ns`` (the last one when no stamp is given),
at the straight-line distance from it. Keyframes without a pose are only excluded by time.

Excluded keyframes are never returned, and the ``k`` candidates are the best valid ones: FAISS skips them
during the search itself (an ID selector in the search parameters), so neither ``k`` nor the work grows
with the number excluded. Finding them costs O(log n), not a pass over the map: path length only grows
with keyframe id, and stamps normally do too (the bag reader and the node add keyframes in time order), so
each rule excludes one contiguous range of ids found by binary search. A map whose stamps are not in id
order (bags given out of time order) sorts them once after each add and excludes the ids found there.

On disk
-------
A map is a directory written atomically (temp dir, then rename; an existing map is moved aside only once
the new one is complete, then deleted): ``manifest.json`` (``format_version``, model fingerprint and name,
``dim``, ``preprocess``, ``index`` type, parameters and FAISS factory string, ``count``, ``created``,
``tscm_ros_version``, size and SHA-256 of every file), ``index.faiss`` (FAISS's own format),
``keyframes.npz`` (stamps, positions, orientations with NaN for unknown poses, source bags), when any
keyframe has one, ``thumbnails.npz``, and when keyframes have them, ``local_features.npz``: the local
features geometric verification needs (tscm_ros/verification.py; per keyframe at most 500 ORB features
of 36 bytes: 18 kB). Nothing is pickled. ``KeyframeMap.load`` checks all of it. Maps of format_version 1
(before geometric verification) load without local features.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from tscm_ros import __version__
from tscm_ros.atomic import atomic_directory
from tscm_ros.errors import ConfigError, MapError
from tscm_ros.geometry import Pose
from tscm_ros.verification import LocalFeatures, Verification

FORMAT_VERSION = 2  # 2: local features for geometric verification
MANIFEST_FILE = "manifest.json"
INDEX_FILE = "index.faiss"
KEYFRAMES_FILE = "keyframes.npz"
THUMBNAILS_FILE = "thumbnails.npz"
LOCAL_FEATURES_FILE = "local_features.npz"
INDEX_TYPES = ("flat", "hnsw", "ivfpq")
MAX_TRAIN_POINTS = 100_000
SINGLE_THREAD_BELOW = 20  # queries per search below which FAISS runs single-threaded


@dataclass
class KeyframeMeta:
    """What the map knows about one keyframe besides its descriptor."""

    stamp_ns: int
    pose: Pose | None
    bag: str
    thumbnail: np.ndarray | None = None
    local_features: LocalFeatures | None = None


@dataclass
class Candidate:
    """One match of a query: the keyframe, its squared L2 ``distance`` and ``score`` (see module doc).

    The loop detector fills the rest: ``similarity`` (the raw score the map gave), the temporal
    ``sequence_score`` and ``consistent`` flag (tscm_ros/temporal.py) and the geometric ``verification``
    (tscm_ros/verification.py); None / NaN / False where that stage is off.
    """

    keyframe_id: int
    stamp_ns: int
    pose: Pose | None
    distance: float
    score: float
    similarity: float = math.nan
    sequence_score: float = math.nan
    consistent: bool = False
    verification: Verification | None = None


@dataclass
class Exclusion:
    """Keyframes a query must not return: too recent in time, or too close along the trajectory."""

    min_time_gap_s: float = 0.0
    min_distance_m: float = 0.0
    query_stamp_ns: int | None = None
    query_position: np.ndarray | None = None


def score_from_distance(distance: np.ndarray | float) -> np.ndarray:
    """Similarity score in [0, 1] from squared L2 distance between unit-norm descriptors."""
    return np.clip(1.0 - np.asarray(distance, dtype=np.float64) / 2.0, 0.0, 1.0)


class _Column:
    """A numpy array that grows by amortised doubling, so adding one row at a time stays cheap."""

    def __init__(self, row_shape: tuple[int, ...], dtype: Any) -> None:
        self._data = np.empty((0, *row_shape), dtype=dtype)
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def extend(self, rows: np.ndarray) -> None:
        needed = self._size + len(rows)
        if needed > len(self._data):
            grown = np.empty((max(needed, 2 * len(self._data), 64), *self._data.shape[1:]), self._data.dtype)
            grown[: self._size] = self._data[: self._size]
            self._data = grown
        self._data[self._size : needed] = rows
        self._size = needed

    @property
    def values(self) -> np.ndarray:
        return self._data[: self._size]


class _ExcludedIds:
    """Keyframe ids a query must not return: id ranges [start, stop) plus explicit ids."""

    def __init__(self) -> None:
        self.ranges: list[tuple[int, int]] = []
        self.ids: list[np.ndarray] = []

    def add_ids(self, ids: np.ndarray) -> None:
        """Add ids (ascending); a gap-free run is kept as a range."""
        if len(ids) == 0:
            return
        if int(ids[-1]) - int(ids[0]) == len(ids) - 1:
            self.ranges.append((int(ids[0]), int(ids[-1]) + 1))
        else:
            self.ids.append(np.asarray(ids, dtype=np.int64))

    def __bool__(self) -> bool:
        return bool(self.ranges or self.ids)

    def key(self) -> tuple:
        """Equal keys exclude the same ids (queries with equal keys are searched together)."""
        return (tuple(self.ranges), tuple(ids.tobytes() for ids in self.ids))

    def contains(self, ids: np.ndarray) -> np.ndarray:
        """Boolean mask: which of ``ids`` are excluded."""
        ids = np.asarray(ids, dtype=np.int64)
        mask = np.zeros(len(ids), dtype=bool)
        for start, stop in self.ranges:
            mask |= (ids >= start) & (ids < stop)
        for explicit in self.ids:
            mask |= np.isin(ids, explicit)
        return mask

    def selector(self) -> tuple[faiss.IDSelector, list]:
        """A FAISS selector accepting every id not excluded, and the objects it points to (keep them alive)."""
        parts: list = [faiss.IDSelectorRange(start, stop) for start, stop in self.ranges]
        for explicit in self.ids:
            parts.append(faiss.IDSelectorBatch(len(explicit), faiss.swig_ptr(explicit)))
        alive = list(parts)
        union = parts[0]
        for part in parts[1:]:
            union = faiss.IDSelectorOr(union, part)
            alive.append(union)
        keep = faiss.IDSelectorNot(union)
        alive.append(keep)
        return keep, alive


def _largest_divisor_at_most(n: int, limit: int) -> int:
    return max(d for d in range(1, max(1, limit) + 1) if n % d == 0)


def _nearest_power_of_two(x: float) -> int:
    return 2 ** max(0, round(math.log2(max(1.0, x))))


def _sub_indexes(index: faiss.Index) -> list[faiss.Index]:
    """The index and the ones it wraps (refinement, pre-transform), outermost first."""
    chain = [faiss.downcast_index(index)]
    while True:
        last = chain[-1]
        if isinstance(last, faiss.IndexRefine):
            chain.append(faiss.downcast_index(last.base_index))
        elif isinstance(last, faiss.IndexPreTransform):
            chain.append(faiss.downcast_index(last.index))
        else:
            return chain


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class KeyframeMap:
    """Descriptors of keyframes in a FAISS index, with their stamps, poses, source bags and thumbnails.

    Keyframe ids are consecutive integers in the order keyframes were added, starting at 0.
    """

    def __init__(
        self,
        dim: int,
        model_fingerprint: str,
        preprocess: dict,
        index: str = "flat",
        *,
        model_name: str = "",
        frame_id: str = "",
        pca_dim: int | None = None,
        whiten: bool = False,
        rerank: bool = True,
        rerank_dtype: str = "float32",
        k_factor: int = 4,
        hnsw_m: int = 32,
        ef_construction: int = 200,
        ef_search: int = 128,
        nlist: int | None = None,
        pq_m: int | None = None,
        nprobe: int = 16,
        train_size: int | None = None,
    ) -> None:
        """An empty map for ``dim``-d descriptors of the model with ``model_fingerprint``.

        ``index`` is 'flat', 'hnsw' or 'ivfpq'; the keyword parameters are described in the module doc.
        Raises ConfigError on invalid parameters.
        """
        dim, pca_dim, nlist, pq_m, train_size = (
            int(v) if isinstance(v, np.integer) else v for v in (dim, pca_dim, nlist, pq_m, train_size))
        if not isinstance(dim, int) or dim < 1:
            raise ConfigError(f"keyframe map: descriptor dimension must be a positive integer, got {dim!r}")
        if index not in INDEX_TYPES:
            raise ConfigError(f"keyframe map: unknown index type {index!r}; choose one of {', '.join(INDEX_TYPES)}")
        if pca_dim is not None and not (isinstance(pca_dim, int) and 1 <= pca_dim < dim):
            raise ConfigError(f"keyframe map: pca_dim must be an integer in [1, {dim - 1}] for {dim}-d descriptors, "
                              f"got {pca_dim!r}")
        if whiten and pca_dim is None:
            raise ConfigError("keyframe map: whiten=True needs pca_dim (whitening is part of the PCA reduction)")
        if whiten and not rerank:
            raise ConfigError("keyframe map: whiten=True needs rerank=True "
                              "(whitened distances are not descriptor distances)")
        if rerank_dtype not in ("float32", "float16"):
            raise ConfigError(f"keyframe map: rerank_dtype must be 'float32' or 'float16', got {rerank_dtype!r}")
        for name, value in (("k_factor", k_factor), ("hnsw_m", hnsw_m), ("ef_construction", ef_construction),
                            ("ef_search", ef_search), ("nprobe", nprobe)):
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"keyframe map: {name} must be a positive integer, got {value!r}")
        reduced_dim = pca_dim or dim
        if pq_m is None:
            pq_m = _largest_divisor_at_most(reduced_dim, reduced_dim // 8)
        if not isinstance(pq_m, int) or pq_m < 1 or reduced_dim % pq_m:
            raise ConfigError(f"keyframe map: pq_m must divide the indexed dimension {reduced_dim}, got {pq_m!r}")
        if nlist is not None and (not isinstance(nlist, int) or nlist < 1):
            raise ConfigError(f"keyframe map: nlist must be a positive integer or None, got {nlist!r}")
        needs_training = index == "ivfpq" or pca_dim is not None
        if train_size is None:
            train_size = 0
            if pca_dim is not None:
                train_size = max(1000, 4 * pca_dim)
            if index == "ivfpq":
                train_size = max(train_size, 10_000, 39 * (nlist or 0))
        least = max(256, nlist or 0, pca_dim or 0) if needs_training else 0
        if not isinstance(train_size, int) or train_size < least:
            raise ConfigError(f"keyframe map: train_size {train_size!r} is too small for index {index!r} "
                              f"(needs at least {least})")

        self.dim = dim
        self.model_fingerprint = str(model_fingerprint)
        self.model_name = str(model_name)
        self.frame_id = str(frame_id)  # frame of the keyframe poses (the recording's odometry/map frame)
        self.preprocess = dict(preprocess)
        self.index_type = index
        self._params: dict[str, Any] = {
            "pca_dim": pca_dim, "whiten": whiten, "rerank": rerank, "rerank_dtype": rerank_dtype,
            "k_factor": k_factor, "hnsw_m": hnsw_m,
            "ef_construction": ef_construction, "ef_search": ef_search, "nlist": nlist, "pq_m": pq_m,
            "nprobe": nprobe, "train_size": train_size,
        }
        self._source = "in-memory keyframe map"
        self._trained = not needs_training
        self._factory = self._factory_string(nlist) if self._trained else "Flat"
        self._index = faiss.index_factory(dim, self._factory, faiss.METRIC_L2)
        self._configure_index()
        self._stamps = _Column((), np.int64)
        self._bag_index = _Column((), np.int32)
        self._positions = _Column((3,), np.float64)
        self._orientations = _Column((4,), np.float64)
        # Keyframes with a pose: their ids, stamps and path length travelled up to them (non-decreasing).
        self._posed_ids = _Column((), np.int64)
        self._posed_stamps = _Column((), np.int64)
        self._posed_path = _Column((), np.float64)
        self._stamps_sorted = True  # stamps non-decreasing with id (time order): exclusion by binary search
        self._stamp_order: np.ndarray | None = None  # otherwise: ids by stamp, built on the first query after an add
        self._bags: list[str] = []
        self._bag_ids: dict[str, int] = {}
        self._thumbnails: dict[int, np.ndarray] = {}
        self._local_features: dict[int, LocalFeatures] = {}

    # ----- properties -------------------------------------------------------------------------------

    def __len__(self) -> int:
        return int(self._index.ntotal)

    @property
    def is_trained(self) -> bool:
        """False while a type that needs training still searches its exact flat fallback."""
        return self._trained

    @property
    def index_config(self) -> dict:
        """Index type, parameters and FAISS factory string, as recorded in the manifest."""
        return {"type": self.index_type, "factory": self._factory, "trained": self._trained, **self._params}

    @property
    def stamps(self) -> np.ndarray:
        """(N,) int64 stamps in nanoseconds, by keyframe id (a read-only view)."""
        return self._read_only(self._stamps.values)

    @property
    def positions(self) -> np.ndarray:
        """(N, 3) float64 keyframe positions by id, NaN rows for keyframes without a pose (read-only)."""
        return self._read_only(self._positions.values)

    def path_lengths(self, keyframe_ids) -> np.ndarray:
        """Path length travelled up to each of ``keyframe_ids`` (see Exclusion), NaN for those without a pose."""
        ids = np.asarray(keyframe_ids, dtype=np.int64)
        posed = self._posed_ids.values
        lengths = np.full(len(ids), np.nan)
        if len(posed):
            where = np.minimum(np.searchsorted(posed, ids), len(posed) - 1)
            found = posed[where] == ids
            lengths[found] = self._posed_path.values[where[found]]
        return lengths

    @property
    def has_local_features(self) -> bool:
        """Every keyframe has the local features geometric verification needs (False for an empty map)."""
        return len(self) > 0 and len(self._local_features) == len(self)

    def local_features(self, keyframe_id: int) -> LocalFeatures | None:
        """The local features stored for a keyframe, None when it has none."""
        return self._local_features.get(int(keyframe_id))

    @property
    def bags(self) -> list[str]:
        """Source bag of each keyframe, by id."""
        return [self._bags[i] for i in self._bag_index.values]

    @property
    def source(self) -> str:
        """Where the map lives, for messages: 'map <directory>' once saved or loaded."""
        return self._source

    def summary(self) -> str:
        """One line describing the map, for logs."""
        model = f"{self.model_name} " if self.model_name else ""
        state = "" if self._trained else f", exact until trained at {self._params['train_size']} keyframes"
        return (f"{len(self)} keyframes of {self.dim}-d descriptors, index {self.index_type} ({self._factory}{state}), "
                f"model {model}(fingerprint {self.model_fingerprint})")

    @staticmethod
    def _read_only(array: np.ndarray) -> np.ndarray:
        view = array.view()
        view.flags.writeable = False
        return view

    # ----- building ---------------------------------------------------------------------------------

    def _factory_string(self, nlist: int | None) -> str:
        p = self._params
        parts = []
        if p["pca_dim"]:
            parts.append(f"{'PCAW' if p['whiten'] else 'PCA'}{p['pca_dim']}")
        if self.index_type == "flat":
            parts.append("Flat")
        elif self.index_type == "hnsw":
            parts.append(f"HNSW{p['hnsw_m']}")
        else:
            parts.append(f"IVF{nlist},PQ{p['pq_m']}np")  # np: no polysemous training (slow, unused)
        if p["rerank"] and (p["pca_dim"] or self.index_type == "ivfpq"):
            parts.append("RFlat" if p["rerank_dtype"] == "float32" else "Refine(SQfp16)")
        return ",".join(parts)

    def _configure_index(self) -> None:
        for sub in _sub_indexes(self._index):
            if isinstance(sub, faiss.IndexRefine):
                sub.k_factor = float(self._params["k_factor"])
            elif isinstance(sub, faiss.IndexHNSW):
                sub.hnsw.efConstruction = self._params["ef_construction"]
                sub.hnsw.efSearch = self._params["ef_search"]
            elif isinstance(sub, faiss.IndexIVF):
                sub.nprobe = self._params["nprobe"]

    def set_search_params(self, *, ef_search: int | None = None, nprobe: int | None = None,
                          k_factor: int | None = None) -> None:
        """Change speed/recall trade-offs of an existing map (saved with it)."""
        for name, value in (("ef_search", ef_search), ("nprobe", nprobe), ("k_factor", k_factor)):
            if value is not None:
                if not isinstance(value, int) or value < 1:
                    raise ConfigError(f"keyframe map: {name} must be a positive integer, got {value!r}")
                self._params[name] = value
        self._configure_index()

    def _train(self) -> None:
        """Replace the exact fallback by the real index, trained on the descriptors held so far."""
        vectors = self._index.reconstruct_n(0, self._index.ntotal)
        sample = vectors
        if len(vectors) > MAX_TRAIN_POINTS:
            chosen = np.random.default_rng(0).choice(len(vectors), MAX_TRAIN_POINTS, replace=False)
            sample = vectors[np.sort(chosen)]
        nlist = self._params["nlist"]
        if self.index_type == "ivfpq" and nlist is None:
            nlist = min(_nearest_power_of_two(math.sqrt(len(vectors))), len(sample) // 39 or 1)
            self._params["nlist"] = nlist
        factory = self._factory_string(nlist)
        index = faiss.index_factory(self.dim, factory, faiss.METRIC_L2)
        self._index = index
        self._configure_index()
        index.train(np.ascontiguousarray(sample))
        index.add(vectors)
        self._factory = factory
        self._trained = True

    def _check_descriptors(self, descriptors: np.ndarray, what: str) -> np.ndarray:
        array = np.asarray(descriptors)
        if array.ndim != 2 or array.shape[1] != self.dim:
            raise MapError(f"{what} have shape {array.shape}; {self._source} holds {self.dim}-d descriptors "
                           f"(expected shape (N, {self.dim}))")
        if not np.issubdtype(array.dtype, np.number):
            raise MapError(f"{what} must be numbers, got dtype {array.dtype}")
        array = np.ascontiguousarray(array, dtype=np.float32)
        if not np.isfinite(array).all():
            raise MapError(f"{what} contain NaN or infinite values")
        return array

    def add(self, descriptors: np.ndarray, metas: Sequence[KeyframeMeta]) -> np.ndarray:
        """Add N keyframes: (N, dim) descriptors and their metadata. Returns their ids, (N,) int64."""
        vectors = self._check_descriptors(descriptors, "descriptors to add")
        if len(metas) != len(vectors):
            raise MapError(f"add: {len(vectors)} descriptors but {len(metas)} metadata entries")
        stamps = np.empty(len(metas), np.int64)
        positions = np.full((len(metas), 3), np.nan)
        orientations = np.full((len(metas), 4), np.nan)
        bag_index = np.empty(len(metas), np.int32)
        thumbnails: dict[int, np.ndarray] = {}
        first_id = len(self)
        for row, meta in enumerate(metas):
            stamps[row] = int(meta.stamp_ns)
            if meta.pose is not None:
                position = np.asarray(meta.pose.position, dtype=np.float64)
                orientation = np.asarray(meta.pose.orientation, dtype=np.float64)
                if position.shape != (3,) or orientation.shape != (4,) or not (
                        np.isfinite(position).all() and np.isfinite(orientation).all()):
                    raise MapError(f"add: keyframe at stamp {meta.stamp_ns} has an invalid pose "
                                   f"(need finite position (3,) and orientation (4,))")
                positions[row], orientations[row] = position, orientation
            bag = str(meta.bag)
            if bag not in self._bag_ids:
                self._bag_ids[bag] = len(self._bags)
                self._bags.append(bag)
            bag_index[row] = self._bag_ids[bag]
            if meta.thumbnail is not None:
                thumbnail = np.asarray(meta.thumbnail)
                if thumbnail.dtype != np.uint8 or thumbnail.ndim not in (2, 3):
                    raise MapError(f"add: thumbnail of keyframe at stamp {meta.stamp_ns} must be an HxW or HxWxC "
                                   f"uint8 image, got {thumbnail.dtype} {thumbnail.shape}")
                thumbnails[first_id + row] = thumbnail.copy()

        self._index.add(vectors)
        self._extend_keyframes(stamps, positions)
        self._orientations.extend(orientations)
        self._bag_index.extend(bag_index)
        self._thumbnails.update(thumbnails)
        self._local_features.update({first_id + row: meta.local_features for row, meta in enumerate(metas)
                                     if meta.local_features is not None})
        if not self._trained and len(self) >= self._params["train_size"]:
            self._train()
        return np.arange(first_id, first_id + len(vectors), dtype=np.int64)

    def _extend_keyframes(self, stamps: np.ndarray, positions: np.ndarray) -> None:
        """Append stamps and positions of new keyframes, and the path length travelled up to each posed one."""
        first_id = len(self._stamps)
        if len(stamps):
            previous = self._stamps.values[-1:] if first_id else stamps[:0]
            self._stamps_sorted = self._stamps_sorted and bool(np.all(np.diff(np.concatenate([previous, stamps])) >= 0))
            self._stamp_order = None
        self._stamps.extend(stamps)
        self._positions.extend(positions)
        posed = np.flatnonzero(~np.isnan(positions[:, 0]))
        if not len(posed):
            return
        if len(self._posed_ids):
            start = self._positions.values[self._posed_ids.values[-1]]
            start_length = float(self._posed_path.values[-1])
        else:
            start, start_length = positions[posed[0]], 0.0
        steps = np.linalg.norm(np.diff(np.vstack([start, positions[posed]]), axis=0), axis=1)
        self._posed_ids.extend(first_id + posed)
        self._posed_stamps.extend(stamps[posed])
        self._posed_path.extend(start_length + np.cumsum(steps))

    # ----- querying ---------------------------------------------------------------------------------

    def keyframe(self, keyframe_id: int) -> KeyframeMeta:
        """Metadata of one keyframe (pose None when unknown, thumbnail None when not stored)."""
        if not 0 <= int(keyframe_id) < len(self):
            raise MapError(f"keyframe id {keyframe_id} is not in {self._source} ({len(self)} keyframes)")
        i = int(keyframe_id)
        return KeyframeMeta(stamp_ns=int(self._stamps.values[i]), pose=self._pose(i),
                            bag=self._bags[self._bag_index.values[i]], thumbnail=self._thumbnails.get(i),
                            local_features=self._local_features.get(i))

    def _pose(self, i: int) -> Pose | None:
        position = self._positions.values[i]
        if np.isnan(position[0]):
            return None
        return Pose(position=position.copy(), orientation=self._orientations.values[i].copy())

    def _excluded(self, exclusion: Exclusion | None) -> _ExcludedIds | None:
        """The keyframe ids that ``exclusion`` removes, or None if it removes nothing; O(log n) for a map in
        time order (see "Exclusion" in the module doc)."""
        if exclusion is None or len(self) == 0:
            return None
        excluded = _ExcludedIds()
        stamps = self._stamps.values
        if exclusion.min_time_gap_s > 0 and exclusion.query_stamp_ns is not None:
            gap_ns = float(exclusion.min_time_gap_s) * 1e9
            query_ns = int(exclusion.query_stamp_ns)
            # |stamp - query| < gap for integer stamps: query + floor(-gap) + 1 <= stamp <= query + ceil(gap) - 1
            lowest, highest = query_ns + math.floor(-gap_ns) + 1, query_ns + math.ceil(gap_ns) - 1
            if self._stamps_sorted:
                start, stop = np.searchsorted(stamps, lowest, "left"), np.searchsorted(stamps, highest, "right")
                if stop > start:
                    excluded.ranges.append((int(start), int(stop)))
            else:
                if self._stamp_order is None:
                    self._stamp_order = np.argsort(stamps, kind="stable")
                by_stamp = stamps[self._stamp_order]
                start, stop = np.searchsorted(by_stamp, lowest, "left"), np.searchsorted(by_stamp, highest, "right")
                excluded.add_ids(np.sort(self._stamp_order[start:stop]))
        posed_ids = self._posed_ids.values
        if exclusion.min_distance_m > 0 and exclusion.query_position is not None and len(posed_ids):
            query_position = np.asarray(exclusion.query_position, dtype=np.float64).reshape(3)
            anchor, direction = self._path_anchor(exclusion.query_stamp_ns)
            offset = float(np.linalg.norm(query_position - self._positions.values[posed_ids[anchor]]))
            path = self._posed_path.values
            query_path = float(path[anchor]) + direction * offset
            distance = float(exclusion.min_distance_m)
            # |path - query_path| < distance; path is non-decreasing along posed keyframes
            start = np.searchsorted(path, query_path - distance, "right")
            stop = np.searchsorted(path, query_path + distance, "left")
            excluded.add_ids(posed_ids[start:stop])
        return excluded if excluded else None

    def _path_anchor(self, query_stamp_ns: int | None) -> tuple[int, float]:
        """Where the query sits on the path: (index among posed keyframes, +1 after it or -1 before it)."""
        posed_stamps = self._posed_stamps.values
        if query_stamp_ns is None:
            return len(posed_stamps) - 1, 1.0
        query_ns = int(query_stamp_ns)
        if self._stamps_sorted:
            after = int(np.searchsorted(posed_stamps, query_ns, "right"))
            if after == 0:
                return 0, -1.0
            # the first posed keyframe with the latest stamp not newer than the query
            return int(np.searchsorted(posed_stamps, posed_stamps[after - 1], "left")), 1.0
        before = np.flatnonzero(posed_stamps <= query_ns)  # a map out of time order: one pass
        if len(before):
            return int(before[np.argmax(posed_stamps[before])]), 1.0
        return int(np.argmin(posed_stamps)), -1.0

    def query(self, descriptor: np.ndarray, k: int, exclusion: Exclusion | None = None,
              min_score: float = 0.0) -> list[Candidate]:
        """The (up to) k keyframes most similar to one (dim,) descriptor, best first."""
        vector = np.asarray(descriptor)
        if vector.ndim != 1:
            raise MapError(f"query: descriptor must have shape ({self.dim},), got {vector.shape}")
        return self.query_batch(vector[None, :], k, exclusion, min_score)[0]

    def query_batch(self, descriptors: np.ndarray, k: int,
                    exclusion: Exclusion | Sequence[Exclusion | None] | None = None,
                    min_score: float = 0.0) -> list[list[Candidate]]:
        """``query`` for N descriptors (N, dim) in one FAISS call; ``exclusion`` is one for all or one per query."""
        vectors = self._check_descriptors(descriptors, "query descriptors")
        if not isinstance(k, (int, np.integer)) or k < 1:
            raise MapError(f"query: k must be a positive integer, got {k!r}")
        if isinstance(exclusion, Exclusion) or exclusion is None:
            exclusions = [exclusion] * len(vectors)
        else:
            exclusions = list(exclusion)
            if len(exclusions) != len(vectors):
                raise MapError(f"query: {len(vectors)} descriptors but {len(exclusions)} exclusions")
        results: list[list[Candidate]] = [[] for _ in vectors]
        if len(self) == 0:
            return results
        k = min(int(k), len(self))
        groups: dict[tuple, tuple[_ExcludedIds | None, list[int]]] = {}
        for row, item in enumerate(exclusions):
            excluded = self._excluded(item)
            groups.setdefault(excluded.key() if excluded else (), (excluded, []))[1].append(row)
        for excluded, rows in groups.values():
            distances, ids = self._search(vectors[rows], k, excluded)
            for row, row_distances, row_ids in zip(rows, distances, ids):
                found = row_ids >= 0
                row_ids = row_ids[found]
                row_distances = np.maximum(row_distances[found], 0.0)  # rounding can give -1e-7
                scores = score_from_distance(row_distances)
                results[row] = [
                    Candidate(keyframe_id=int(i), stamp_ns=int(self._stamps.values[i]), pose=self._pose(int(i)),
                              distance=float(d), score=float(score))
                    for i, d, score in zip(row_ids, row_distances, scores) if score >= min_score
                ]
        return results

    def _search_parameters(self, excluded: _ExcludedIds) -> tuple[faiss.SearchParameters, list]:
        """Search parameters for this map's index chain that skip the excluded ids, with the index's own
        settings (efSearch, nprobe, k_factor); and the objects they point to."""
        selector, alive = excluded.selector()
        params = None
        for sub in reversed(_sub_indexes(self._index)):
            if params is None:  # the innermost index does the selecting
                if isinstance(sub, faiss.IndexHNSW):
                    params = faiss.SearchParametersHNSW()
                    params.efSearch = self._params["ef_search"]
                elif isinstance(sub, faiss.IndexIVF):
                    params = faiss.SearchParametersIVF()
                    params.nprobe = self._params["nprobe"]
                else:
                    params = faiss.SearchParameters()
                params.sel = selector
            elif isinstance(sub, faiss.IndexPreTransform):
                params = faiss.SearchParametersPreTransform()
                params.index_params = alive[-1]
            elif isinstance(sub, faiss.IndexRefine):
                params = faiss.IndexRefineSearchParameters()
                params.k_factor = float(self._params["k_factor"])
                params.base_index_params = alive[-1]
            alive.append(params)
        return params, alive

    def _search(self, vectors: np.ndarray, k: int, excluded: _ExcludedIds | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
        """FAISS search skipping ``excluded``; a few queries run on one OpenMP thread.

        Measured here: one query through a PCA index took 8-16 ms with 2 threads on a busy 2-core machine
        (threads waiting for time slices) and 0.2 ms with one; batches still use every thread. The thread
        count set here is the calling thread's own (OpenMP's nthreads-var belongs to each thread's data
        environment, as test_keyframe_map checks), so concurrent queries from other threads are unaffected.
        """
        params, _alive = self._search_parameters(excluded) if excluded else (None, None)
        vectors = np.ascontiguousarray(vectors)
        if len(vectors) >= SINGLE_THREAD_BELOW:
            return self._index.search(vectors, k, params=params)
        threads = faiss.omp_get_max_threads()
        if threads != 1:
            faiss.omp_set_num_threads(1)
        try:
            return self._index.search(vectors, k, params=params)
        finally:
            if threads != 1:
                faiss.omp_set_num_threads(threads)

    # ----- saving and loading -----------------------------------------------------------------------

    def save(self, directory: str | os.PathLike) -> None:
        """Write the map to ``directory`` atomically, replacing a map already there only once complete."""
        target = Path(directory)
        if target.exists() and not (target.is_dir() and ((target / MANIFEST_FILE).is_file() or not any(target.iterdir()))):
            raise MapError(f"cannot save the map to {target}: it exists and is not a keyframe map; refusing to replace it")
        with atomic_directory(target) as staging:
            self._write(staging)
        self._source = f"map {target}"

    def _write(self, directory: Path) -> None:
        try:
            faiss.write_index(self._index, str(directory / INDEX_FILE))
        except RuntimeError as exc:
            raise MapError(f"cannot write {directory / INDEX_FILE}: {exc}") from exc
        np.savez(directory / KEYFRAMES_FILE, stamp_ns=self._stamps.values, position=self._positions.values,
                 orientation=self._orientations.values, bag_index=self._bag_index.values,
                 bag_names=np.array(self._bags, dtype=np.str_))
        files = [INDEX_FILE, KEYFRAMES_FILE]
        if self._thumbnails:
            np.savez(directory / THUMBNAILS_FILE, **{f"k{i}": image for i, image in sorted(self._thumbnails.items())})
            files.append(THUMBNAILS_FILE)
        if self._local_features:
            ids = np.array(sorted(self._local_features), dtype=np.int64)
            features = [self._local_features[i] for i in ids]
            np.savez(directory / LOCAL_FEATURES_FILE, keyframe_ids=ids,
                     counts=np.array([len(f) for f in features], dtype=np.int32),
                     keypoints=np.concatenate([f.packed_keypoints() for f in features]),
                     descriptors=np.concatenate([f.descriptors for f in features]))
            files.append(LOCAL_FEATURES_FILE)
        manifest = {
            "format_version": FORMAT_VERSION,
            "model_fingerprint": self.model_fingerprint,
            "model_name": self.model_name,
            "frame_id": self.frame_id,
            "dim": self.dim,
            "preprocess": self.preprocess,
            "index": self.index_config,
            "count": len(self),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "tscm_ros_version": __version__,
            "files": {name: {"bytes": (directory / name).stat().st_size, "sha256": _sha256(directory / name)}
                      for name in files},
        }
        (directory / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")

    @classmethod
    def load(cls, directory: str | os.PathLike, expected_fingerprint: str | None = None, *,
             expected_model_name: str | None = None) -> KeyframeMap:
        """Read a map saved by ``save``, checking every file; MapError if anything is wrong.

        With ``expected_fingerprint`` (the loaded model's), a map built with another model is refused with
        a message naming the model it needs (``expected_model_name`` names the loaded one in that message).
        """
        root = Path(directory)
        if not root.is_dir():
            leftovers = sorted(root.parent.glob(f".{root.name}.old-*"))
            hint = f"; an interrupted save left the previous map at {leftovers[0]}" if leftovers else ""
            raise MapError(f"map {root} does not exist or is not a directory{hint}")
        manifest = cls._read_manifest(root)
        if expected_fingerprint is not None and expected_fingerprint != manifest["model_fingerprint"]:
            built_with = manifest["model_name"] or "(unnamed)"
            loaded = f"{expected_model_name} " if expected_model_name else ""
            if expected_model_name and expected_model_name == manifest["model_name"]:
                raise MapError(
                    f"map {root} was built with an earlier version of {built_with} (fingerprint "
                    f"{manifest['model_fingerprint']}; the loaded one is {expected_fingerprint}), for example the "
                    f"previous default model: rebuild the map with build_map, or use --model with the checkpoint it "
                    f"was built with")
            raise MapError(
                f"map {root} was built with model {built_with} (fingerprint {manifest['model_fingerprint']}); "
                f"the loaded model {loaded}has fingerprint {expected_fingerprint}. Use --model with the checkpoint "
                f"the map was built with ({built_with}), or rebuild the map with this model (build_map)")
        for name, expected in manifest["files"].items():
            path = root / name
            if not path.is_file():
                raise MapError(f"map {root} is incomplete: {name} is missing")
            if path.stat().st_size != expected.get("bytes") or _sha256(path) != expected.get("sha256"):
                raise MapError(f"{path} is corrupt: its size or SHA-256 does not match {root / MANIFEST_FILE}")

        params = {key: value for key, value in manifest["index"].items() if key not in ("type", "factory", "trained")}
        try:
            keyframe_map = cls(manifest["dim"], manifest["model_fingerprint"], manifest["preprocess"],
                               manifest["index"]["type"], model_name=manifest["model_name"],
                               frame_id=str(manifest.get("frame_id", "")), **params)
        except (ConfigError, TypeError) as exc:
            raise MapError(f"{root / MANIFEST_FILE} has invalid index settings: {exc}") from exc
        keyframe_map._source = f"map {root}"
        keyframe_map._trained = manifest["index"]["trained"]
        keyframe_map._factory = manifest["index"]["factory"] if keyframe_map._trained else "Flat"
        keyframe_map._index = cls._read_index(root, manifest, keyframe_map._factory)
        keyframe_map._configure_index()
        keyframe_map._read_keyframes(root, manifest["count"])
        return keyframe_map

    @staticmethod
    def _read_manifest(root: Path) -> dict:
        path = root / MANIFEST_FILE
        if not path.is_file():
            raise MapError(f"map {root} has no {MANIFEST_FILE}: not a keyframe map, or an incomplete one")
        try:
            manifest = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise MapError(f"{path} is not valid JSON: {exc}") from exc
        if not isinstance(manifest, dict):
            raise MapError(f"{path} must hold a JSON object")
        version = manifest.get("format_version")
        if not isinstance(version, int) or version < 1:
            raise MapError(f"{path} has no valid format_version")
        if version > FORMAT_VERSION:
            raise MapError(f"{path} has format_version {version}, written by tscm_ros "
                           f"{manifest.get('tscm_ros_version', '?')}; this tscm_ros ({__version__}) reads up to "
                           f"format_version {FORMAT_VERSION}: upgrade tscm_ros to load this map")
        expected_types = {"model_fingerprint": str, "model_name": str, "dim": int, "preprocess": dict,
                          "index": dict, "count": int, "files": dict}
        for key, kind in expected_types.items():
            if not isinstance(manifest.get(key), kind) or isinstance(manifest.get(key), bool):
                raise MapError(f"{path}: field {key!r} is missing or not a {kind.__name__}")
        index = manifest["index"]
        if index.get("type") not in INDEX_TYPES or not isinstance(index.get("factory"), str) \
                or not isinstance(index.get("trained"), bool):
            raise MapError(f"{path}: field 'index' needs a type ({', '.join(INDEX_TYPES)}), a factory string and trained")
        for name in (INDEX_FILE, KEYFRAMES_FILE):
            if name not in manifest["files"]:
                raise MapError(f"{path} does not list {name}")
        if not set(manifest["files"]) <= {INDEX_FILE, KEYFRAMES_FILE, THUMBNAILS_FILE, LOCAL_FEATURES_FILE} or \
                not all(isinstance(entry, dict) for entry in manifest["files"].values()):
            raise MapError(f"{path}: field 'files' lists unexpected entries")
        return manifest

    @staticmethod
    def _read_index(root: Path, manifest: dict, factory: str) -> faiss.Index:
        path = root / INDEX_FILE
        try:
            index = faiss.read_index(str(path))
        except (RuntimeError, MemoryError) as exc:
            raise MapError(f"{path} is not a readable FAISS index: {str(exc).strip().splitlines()[0]}") from exc
        if index.d != manifest["dim"]:
            raise MapError(f"{path} holds {index.d}-d vectors but {root / MANIFEST_FILE} says dim {manifest['dim']}")
        if index.ntotal != manifest["count"]:
            raise MapError(f"{path} holds {index.ntotal} vectors but {root / MANIFEST_FILE} says count {manifest['count']}")
        try:
            expected = faiss.index_factory(manifest["dim"], factory, faiss.METRIC_L2)
        except RuntimeError as exc:
            raise MapError(f"{root / MANIFEST_FILE}: invalid index factory string {factory!r}") from exc
        found, wanted = _sub_indexes(index), _sub_indexes(expected)
        same_structure = len(found) == len(wanted) and all(isinstance(f, type(w)) for f, w in zip(found, wanted))
        if not same_structure or index.metric_type != faiss.METRIC_L2 or not index.is_trained:
            structure = " > ".join(type(sub).__name__ for sub in found)
            raise MapError(f"{path} is not the trained L2 index {factory!r} that {root / MANIFEST_FILE} describes "
                           f"(found {structure})")
        return index

    def _read_keyframes(self, root: Path, count: int) -> None:
        path = root / KEYFRAMES_FILE
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {key: data[key] for key in ("stamp_ns", "position", "orientation", "bag_index", "bag_names")}
        except (OSError, ValueError, KeyError, EOFError) as exc:
            raise MapError(f"{path} is not a valid keyframe table: {exc}") from exc
        shapes_ok = (arrays["stamp_ns"].shape == (count,) and arrays["position"].shape == (count, 3)
                     and arrays["orientation"].shape == (count, 4) and arrays["bag_index"].shape == (count,)
                     and arrays["bag_names"].ndim == 1 and arrays["stamp_ns"].dtype.kind == "i"
                     and arrays["bag_index"].dtype.kind == "i" and arrays["bag_names"].dtype.kind == "U")
        if not shapes_ok or (count and not (0 <= arrays["bag_index"].min() and arrays["bag_index"].max() < len(arrays["bag_names"]))):
            raise MapError(f"{path} does not describe the {count} keyframes of the index (wrong shapes or types)")
        self._bags = [str(name) for name in arrays["bag_names"]]
        self._bag_ids = {name: i for i, name in enumerate(self._bags)}
        self._extend_keyframes(arrays["stamp_ns"].astype(np.int64), arrays["position"].astype(np.float64))
        self._orientations.extend(arrays["orientation"].astype(np.float64))
        self._bag_index.extend(arrays["bag_index"].astype(np.int32))
        thumbnails_path = root / THUMBNAILS_FILE
        if thumbnails_path.is_file():
            try:
                with np.load(thumbnails_path, allow_pickle=False) as data:
                    for key in data.files:
                        if not (key.startswith("k") and key[1:].isdigit() and int(key[1:]) < count):
                            raise ValueError(f"unexpected entry {key}")
                        keyframe_id = int(key[1:])
                        self._thumbnails[keyframe_id] = data[key]
            except (OSError, ValueError, EOFError) as exc:
                raise MapError(f"{thumbnails_path} is not a valid thumbnail table: {exc}") from exc
        self._read_local_features(root / LOCAL_FEATURES_FILE, count)

    def _read_local_features(self, path: Path, count: int) -> None:
        if not path.is_file():
            return
        try:
            with np.load(path, allow_pickle=False) as data:
                ids, counts, keypoints, descriptors = (data[key] for key in
                                                       ("keyframe_ids", "counts", "keypoints", "descriptors"))
            valid = (ids.ndim == 1 and ids.dtype.kind == "i" and counts.shape == ids.shape and counts.dtype.kind == "i"
                     and keypoints.dtype == np.uint16 and keypoints.ndim == 2 and keypoints.shape[1] == 2
                     and descriptors.shape == (len(keypoints), 32) and descriptors.dtype == np.uint8
                     and int(counts.sum()) == len(keypoints) and (counts >= 0).all()
                     and (len(ids) == 0 or (ids.min() >= 0 and ids.max() < count and len(np.unique(ids)) == len(ids))))
            if not valid:
                raise ValueError("wrong shapes, types or keyframe ids")
        except (OSError, ValueError, KeyError, EOFError) as exc:
            raise MapError(f"{path} is not a valid local feature table: {exc}") from exc
        starts = np.concatenate([[0], np.cumsum(counts)])
        for i, keyframe_id in enumerate(ids):
            self._local_features[int(keyframe_id)] = LocalFeatures.unpack(
                keypoints[starts[i]:starts[i + 1]], descriptors[starts[i]:starts[i + 1]])
