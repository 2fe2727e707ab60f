"""Keyframe map: global descriptors in a FAISS index plus per-keyframe metadata.

Descriptors are expected to be L2-normalised (the Describer's rows are). ``Candidate.distance`` is the
squared Euclidean distance ``d`` between the query descriptor and the keyframe descriptor, in [0, 4] for
unit-norm vectors, and ``Candidate.score = clip(1 - d / 2, 0, 1)``: their cosine similarity clipped at 0
(1 for identical descriptors, 0 for orthogonal or opposite ones). ``min_score`` drops candidates scoring
below it, which is the same as a distance threshold ``d <= 2 * (1 - min_score)``. The distance is exact
unless a lossy index is configured without re-ranking.

The index and its settings are in tscm_ros/map/index.py, which keyframes a query excludes in
tscm_ros/map/exclusion.py, and the map's directory on disk in tscm_ros/map/storage.py.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from tscm_ros.describe.local_features import LocalFeatures
from tscm_ros.describe.models.vlad import Vocabulary
from tscm_ros.errors import ConfigError, MapError
from tscm_ros.io.geometry import Pose
from tscm_ros.map.calibration import MapCalibration
from tscm_ros.map.calibration import estimate as estimate_calibration
from tscm_ros.map.exclusion import ExcludedIds, Exclusion, KeyframeTrack
from tscm_ros.map.growing_array import GrowingArray
from tscm_ros.map.index import DescriptorIndex, IndexConfig
from tscm_ros.map.storage import KeyframeTable, MapContents, read_map, write_map


@dataclass
class KeyframeMeta:
    """What the map knows about one keyframe besides its descriptor."""

    stamp_ns: int
    pose: Pose | None
    bag: str
    thumbnail: np.ndarray | None = None
    local_features: LocalFeatures | None = None


@dataclass(frozen=True)
class Candidate:
    """One match of a query, as the map sees it: the keyframe, its squared L2 ``distance`` and ``score`` (see
    module doc). The loop detector judges it further and wraps it (``detection.Match``)."""

    keyframe_id: int
    stamp_ns: int
    pose: Pose | None
    distance: float
    score: float


SAME_PLACE_M = 10.0  # keyframes with poses this close show the same place (map calibration, temporal consistency)
SAME_PLACE_S = 3.0  # keyframes without poses: from one recording, this close in time


def score_from_distance(distance: np.ndarray | float) -> np.ndarray:
    """Similarity score in [0, 1] from squared L2 distance between unit-norm descriptors."""
    return np.clip(1.0 - np.asarray(distance, dtype=np.float64) / 2.0, 0.0, 1.0)


def _read_only(array: np.ndarray) -> np.ndarray:
    view = array.view()
    view.flags.writeable = False
    return view


class KeyframeMap:
    """Descriptors of keyframes in a FAISS index, with their stamps, poses, source bags and thumbnails.

    Keyframe ids are consecutive integers in the order keyframes were added, starting at 0.
    """

    def __init__(self, dim: int, model_fingerprint: str, preprocess: dict, index_config: IndexConfig | None = None,
                 *, model_name: str = "", frame_id: str = "", base_fingerprint: str | None = None,
                 vocabulary: Vocabulary | None = None) -> None:
        """An empty map for ``dim``-d descriptors of the model with ``model_fingerprint``, in the index
        ``index_config`` describes (default: exact flat search). Raises ConfigError on invalid settings.

        ``vocabulary`` is the VLAD vocabulary the descriptors were computed with (None for models without
        one), ``base_fingerprint`` the model's own fingerprint before that vocabulary replaced its own
        (default ``model_fingerprint``).
        """
        dim = int(dim) if isinstance(dim, np.integer) else dim
        if not isinstance(dim, int) or dim < 1:
            raise ConfigError(f"keyframe map: descriptor dimension must be a positive integer, got {dim!r}")
        self.dim = dim
        self.model_fingerprint = str(model_fingerprint)
        self.base_fingerprint = str(base_fingerprint or model_fingerprint)
        self.vocabulary = vocabulary
        self.calibration: MapCalibration | None = None  # scores of this map (map/calibration.py); calibrate()
        self.vocabulary_samples: list[tuple[np.ndarray, ...]] | None = None  # map/building.py, until it fits
        self.model_name = str(model_name)
        self.frame_id = str(frame_id)  # frame of the keyframe poses (the recording's odometry/map frame)
        self.preprocess = dict(preprocess)
        self._index = DescriptorIndex.empty(dim, (index_config or IndexConfig()).for_dim(dim))
        self._source = "in-memory keyframe map"
        self._track = KeyframeTrack()  # stamps, positions and path, for exclusion
        self._orientations = GrowingArray((4,), np.float64)
        self._bag_index = GrowingArray((), np.int32)
        self._bags: list[str] = []
        self._bag_ids: dict[str, int] = {}
        self._thumbnails: dict[int, np.ndarray] = {}
        self._local_features: dict[int, LocalFeatures] = {}

    @classmethod
    def for_describer(cls, describer, index_config: IndexConfig | None = None) -> KeyframeMap:
        """An empty map for the descriptors of ``describer`` (a :class:`~tscm_ros.describe.describer.Describer`)."""
        return cls(describer.dim, describer.fingerprint, describer.preprocess_config.to_dict(), index_config,
                   model_name=describer.model_name, base_fingerprint=describer.base_fingerprint,
                   vocabulary=describer.vocabulary if describer.adapts_to_map else None)

    @classmethod
    def from_contents(cls, contents: MapContents, source: str) -> KeyframeMap:
        """The map holding ``contents`` (what tscm_ros/map/storage.py read from ``source``)."""
        keyframe_map = cls(contents.dim, contents.model_fingerprint, contents.preprocess, contents.index.config,
                           model_name=contents.model_name, frame_id=contents.frame_id,
                           base_fingerprint=contents.base_fingerprint, vocabulary=contents.vocabulary)
        keyframe_map._index = contents.index
        keyframe_map._source = source
        keyframe_map.calibration = contents.calibration
        keyframe_map.vocabulary_samples = contents.vocabulary_samples
        keyframes = contents.keyframes
        keyframe_map._append(keyframes.stamp_ns, keyframes.position, keyframes.orientation, keyframes.bag_index)
        keyframe_map._bags = list(keyframes.bag_names)
        keyframe_map._bag_ids = {name: i for i, name in enumerate(keyframe_map._bags)}
        keyframe_map._thumbnails = dict(keyframes.thumbnails)
        keyframe_map._local_features = dict(keyframes.local_features)
        return keyframe_map

    def contents(self) -> MapContents:
        """Everything the map holds, in the form tscm_ros/map/storage.py writes (views, not copies)."""
        keyframes = KeyframeTable(stamp_ns=self._track.stamps, position=self._track.positions,
                                  orientation=self._orientations.values, bag_index=self._bag_index.values,
                                  bag_names=list(self._bags), thumbnails=dict(self._thumbnails),
                                  local_features=dict(self._local_features))
        return MapContents(dim=self.dim, model_fingerprint=self.model_fingerprint, model_name=self.model_name,
                           frame_id=self.frame_id, preprocess=self.preprocess, index=self._index,
                           keyframes=keyframes, base_fingerprint=self.base_fingerprint, vocabulary=self.vocabulary,
                           calibration=self.calibration, vocabulary_samples=(
                               None if self.vocabulary_samples is None else list(self.vocabulary_samples)))

    def snapshot(self) -> MapContents:
        """Everything the map holds, copied: it can be written while the map grows."""
        contents = self.contents()
        keyframes = contents.keyframes
        copied = KeyframeTable(stamp_ns=keyframes.stamp_ns.copy(), position=keyframes.position.copy(),
                               orientation=keyframes.orientation.copy(), bag_index=keyframes.bag_index.copy(),
                               bag_names=keyframes.bag_names, thumbnails=keyframes.thumbnails,
                               local_features=keyframes.local_features)
        return replace(contents, index=self._index.copy(), keyframes=copied, preprocess=dict(self.preprocess))

    def save(self, directory: str | os.PathLike) -> None:
        """Write the map to ``directory`` atomically, replacing a map already there only once complete."""
        write_map(self.contents(), directory)
        self._source = f"map {Path(directory)}"

    @classmethod
    def load(cls, directory: str | os.PathLike, expected_fingerprint: str | None = None, *,
             expected_model_name: str | None = None) -> KeyframeMap:
        """Read a map saved by ``save``, checking every file; MapError if anything is wrong.

        With ``expected_fingerprint`` (the loaded model's), a map built with another model is refused with
        a message naming the model it needs (``expected_model_name`` names the loaded one in that message).
        """
        contents = read_map(directory, expected_fingerprint, expected_model_name=expected_model_name)
        return cls.from_contents(contents, f"map {Path(directory)}")

    # ----- properties -------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._index)

    @property
    def index_config(self) -> IndexConfig:
        """Index type and settings, as recorded in the manifest."""
        return self._index.config

    @property
    def index_type(self) -> str:
        return self._index.config.type

    @property
    def is_trained(self) -> bool:
        """False while a type that needs training still searches its exact flat fallback."""
        return self._index.is_trained

    @property
    def factory(self) -> str:
        """The FAISS factory string of the index in use ('Flat' until trained)."""
        return self._index.factory

    @property
    def stamps(self) -> np.ndarray:
        """(N,) int64 stamps in nanoseconds, by keyframe id (a read-only view)."""
        return _read_only(self._track.stamps)

    @property
    def positions(self) -> np.ndarray:
        """(N, 3) float64 keyframe positions by id, NaN rows for keyframes without a pose (read-only)."""
        return _read_only(self._track.positions)

    def path_lengths(self, keyframe_ids) -> np.ndarray:
        """Path length travelled up to each of ``keyframe_ids`` (see map/exclusion.py), NaN for those without a pose."""
        return self._track.path_lengths(keyframe_ids)

    def descriptors(self, keyframe_ids) -> np.ndarray:
        """(N, dim) float32 descriptors of ``keyframe_ids`` as the index holds them (DescriptorIndex.descriptors)."""
        return self._index.descriptors(np.asarray(keyframe_ids, dtype=np.int64))

    def same_place(self, first_ids, second_ids) -> np.ndarray:
        """(len(first), len(second)) bool: the keyframes show the same place. With poses: within
        ``SAME_PLACE_M`` of each other; otherwise (a map without odometry): from the same recording, within
        ``SAME_PLACE_S`` of each other."""
        first, second = np.asarray(first_ids, dtype=np.int64), np.asarray(second_ids, dtype=np.int64)
        positions = self._track.positions
        a, b = positions[first][:, None, :], positions[second][None, :, :]
        near = ((a - b) ** 2).sum(axis=2) <= SAME_PLACE_M ** 2
        posed = ~np.isnan(a[..., 0]) & ~np.isnan(b[..., 0])
        stamps, bags = self._track.stamps, self._bag_index.values
        close_in_time = (np.abs(stamps[first][:, None] - stamps[second][None, :]) <= SAME_PLACE_S * 1e9) \
            & (bags[first][:, None] == bags[second][None, :])
        return np.where(posed, near, close_in_time)

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
        state = "" if self.is_trained else f", exact until trained at {self.index_config.train_size} keyframes"
        calibrated = self.calibration.summary() if self.calibration is not None else "scores uncalibrated"
        return (f"{len(self)} keyframes of {self.dim}-d descriptors, index {self.index_type} ({self.factory}{state}), "
                f"model {model}(fingerprint {self.model_fingerprint}), {calibrated}")

    def set_search_params(self, *, ef_search: int | None = None, nprobe: int | None = None,
                          k_factor: int | None = None) -> None:
        """Change speed/recall trade-offs of an existing map (saved with it)."""
        self._index.set_search_params(ef_search=ef_search, nprobe=nprobe, k_factor=k_factor)

    # ----- adding -----------------------------------------------------------------------------------

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
                    raise MapError(f"add: keyframe at stamp {meta.stamp_ns} from {meta.bag} has an invalid pose "
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
        self._append(stamps, positions, orientations, bag_index)
        self._thumbnails.update(thumbnails)
        self._local_features.update({first_id + row: meta.local_features for row, meta in enumerate(metas)
                                     if meta.local_features is not None})
        return np.arange(first_id, first_id + len(vectors), dtype=np.int64)

    def replace_descriptors(self, descriptors: np.ndarray, model_fingerprint: str,
                            vocabulary: Vocabulary | None) -> None:
        """Every keyframe's descriptor, by id, recomputed with another vocabulary (a refit): the index is
        rebuilt from them; the keyframes' metadata stay."""
        vectors = self._check_descriptors(descriptors, "replacement descriptors")
        if len(vectors) != len(self):
            raise MapError(f"replace_descriptors: {len(vectors)} descriptors for {len(self)} keyframes")
        self._index = DescriptorIndex.empty(self.dim, self._index.config)
        self._index.add(vectors)
        self.model_fingerprint = str(model_fingerprint)
        self.vocabulary = vocabulary
        self.calibration = None  # of the old descriptors: calibrate() again

    def calibrate(self) -> MapCalibration | None:
        """Estimate the map's score calibration from its own keyframes (map/calibration.py), keep and return it
        (None for a map too small to give one)."""
        self.calibration = estimate_calibration(self, self._index.descriptors)
        return self.calibration

    def _append(self, stamps: np.ndarray, positions: np.ndarray, orientations: np.ndarray,
                bag_index: np.ndarray) -> None:
        self._track.extend(stamps, positions)
        self._orientations.extend(orientations)
        self._bag_index.extend(bag_index)

    # ----- querying ---------------------------------------------------------------------------------

    def keyframe(self, keyframe_id: int) -> KeyframeMeta:
        """Metadata of one keyframe (pose None when unknown, thumbnail None when not stored)."""
        if not 0 <= int(keyframe_id) < len(self):
            raise MapError(f"keyframe id {keyframe_id} is not in {self._source} ({len(self)} keyframes)")
        i = int(keyframe_id)
        return KeyframeMeta(stamp_ns=int(self._track.stamps[i]), pose=self._pose(i),
                            bag=self._bags[self._bag_index.values[i]], thumbnail=self._thumbnails.get(i),
                            local_features=self._local_features.get(i))

    def _pose(self, i: int) -> Pose | None:
        position = self._track.positions[i]
        if np.isnan(position[0]):
            return None
        return Pose(position=position.copy(), orientation=self._orientations.values[i].copy())

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
        return [[self.candidate(int(i), float(d), float(score)) for i, d, score in zip(ids, distances, scores)
                 if score >= min_score] for ids, distances, scores in self.search_batch(descriptors, k, exclusion)]

    def candidate(self, keyframe_id: int, distance: float, score: float) -> Candidate:
        """A search result as a ``Candidate`` (the keyframe's stamp and pose)."""
        return Candidate(keyframe_id=keyframe_id, stamp_ns=int(self._track.stamps[keyframe_id]),
                         pose=self._pose(keyframe_id), distance=distance, score=score)

    def search_batch(self, descriptors: np.ndarray, k: int,
                     exclusion: Exclusion | Sequence[Exclusion | None] | None = None
                     ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """``query_batch`` as arrays, without building candidates: per descriptor the keyframe ids, squared
        distances and scores of the (up to) k most similar, best first."""
        vectors = self._check_descriptors(descriptors, "query descriptors")
        if not isinstance(k, (int, np.integer)) or k < 1:
            raise MapError(f"query: k must be a positive integer, got {k!r}")
        if isinstance(exclusion, Exclusion) or exclusion is None:
            exclusions = [exclusion] * len(vectors)
        else:
            exclusions = list(exclusion)
            if len(exclusions) != len(vectors):
                raise MapError(f"query: {len(vectors)} descriptors but {len(exclusions)} exclusions")
        empty = (np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros(0, np.float64))
        results = [empty for _ in vectors]
        if len(self) == 0:
            return results
        k = min(int(k), len(self))
        groups: dict[tuple, tuple[ExcludedIds | None, list[int]]] = {}
        for row, item in enumerate(exclusions):
            excluded = self._track.excluded(item)
            groups.setdefault(excluded.key() if excluded else (), (excluded, []))[1].append(row)
        for excluded, rows in groups.values():
            distances, ids = self._index.search(vectors[rows], k, excluded)
            for row, row_distances, row_ids in zip(rows, distances, ids):
                found = row_ids >= 0
                row_distances = np.maximum(row_distances[found], 0.0)  # rounding can give -1e-7
                results[row] = (row_ids[found].astype(np.int64), row_distances, score_from_distance(row_distances))
        return results
