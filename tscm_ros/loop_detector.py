"""The per-image step of loop-closure detection, shared by the live node, build_map and evaluation.

``LoopDetector.process`` describes one RGB image with the map's describer, queries the keyframe map with the
exclusion rules, scores the candidates along the recent images (temporal consistency,
tscm_ros/temporal.py), checks the best ``k`` geometrically (tscm_ros/verification.py), and in mapping
mode adds the image as a keyframe when ``KeyframeSelector`` accepts it (through tscm_ros/map_building.py,
which also fits the map's own vocabulary once it has enough keyframes). A candidate is *accepted* (the node
publishes it as a loop) when it passes every stage that is on. No ROS here: the node converts messages and
publishes, everything else happens in this module.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from tscm_ros.errors import ConfigError
from tscm_ros.keyframe_map import Candidate, KeyframeMap, KeyframeMeta
from tscm_ros.local_features import extract_local_features
from tscm_ros.map_building import MAPPING_FIT_KEYFRAMES, KeyframeBuilder
from tscm_ros.map_calibration import POOL, candidate_margins
from tscm_ros.map_exclusion import Exclusion
from tscm_ros.temporal import TemporalConfig, TemporalConsistency
from tscm_ros.verification import CameraIntrinsics, VerificationConfig, verify


@dataclass
class KeyframeSelector:
    """Decides which frames become keyframes: enough time and travel since the last one, and
    (optionally) a descriptor that differs enough from it.

    Each threshold at 0 (or ``max_similarity`` None) is off. Distance is only checked when both the
    frame's and the last keyframe's positions are known.
    """

    min_interval_s: float = 0.0
    min_distance_m: float = 0.0
    max_similarity: float | None = None
    _last_stamp_ns: int | None = field(default=None, init=False, repr=False)
    _last_position: np.ndarray | None = field(default=None, init=False, repr=False)
    _last_descriptor: np.ndarray | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.min_interval_s < 0 or self.min_distance_m < 0:
            raise ConfigError("keyframe selection: minimum interval and distance must be >= 0")
        if self.max_similarity is not None and not 0.0 < self.max_similarity <= 1.0:
            raise ConfigError(f"keyframe selection: max_similarity must be in (0, 1], got {self.max_similarity}")

    def moved_enough(self, stamp_ns: int, position: np.ndarray | None) -> bool:
        """Time and travel since the last keyframe are both above their thresholds."""
        if self._last_stamp_ns is None:
            return True
        if abs(stamp_ns - self._last_stamp_ns) < self.min_interval_s * 1e9:
            return False
        if self.min_distance_m > 0 and position is not None and self._last_position is not None:
            return float(np.linalg.norm(position - self._last_position)) >= self.min_distance_m
        return True

    def looks_new(self, descriptor: np.ndarray) -> bool:
        """The descriptor's similarity to the last keyframe's is below ``max_similarity``."""
        if self.max_similarity is None or self._last_descriptor is None:
            return True
        return float(np.dot(descriptor, self._last_descriptor)) < self.max_similarity

    def accept(self, stamp_ns: int, position: np.ndarray | None, descriptor: np.ndarray) -> bool:
        """Whether this frame becomes a keyframe; remembers it if so."""
        if not (self.moved_enough(stamp_ns, position) and self.looks_new(descriptor)):
            return False
        self._last_stamp_ns = stamp_ns
        self._last_position = None if position is None else np.asarray(position, dtype=np.float64)
        self._last_descriptor = descriptor
        return True


DEFAULT_MIN_SCORE = 0.99
VERIFY_THREADS = 2  # OpenCV matching and RANSAC release the GIL: candidates are verified two at a time


@dataclass(frozen=True)
class MatchingConfig:
    """How a query is matched: at most ``k`` candidates scoring at least ``min_score``, ignoring
    keyframes within ``exclude_recent_s`` of the query stamp or ``exclude_within_m`` along the path."""

    k: int = 5
    min_score: float = DEFAULT_MIN_SCORE
    exclude_recent_s: float = 30.0
    exclude_within_m: float = 0.0

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ConfigError(f"k must be >= 1, got {self.k}")
        if not 0.0 <= self.min_score <= 1.0:
            raise ConfigError(f"min_score must be in [0, 1], got {self.min_score}")
        if self.exclude_recent_s < 0 or self.exclude_within_m < 0:
            raise ConfigError("exclude_recent_s and exclude_within_m must be >= 0")


@dataclass
class Detection:
    """What one processed image gave: its descriptor and the ``fingerprint`` of the model that computed it, the
    candidates (best first), which of them passed every stage that is on (``accepted``: the loops to publish),
    and its keyframe id if added."""

    descriptor: np.ndarray
    fingerprint: str
    candidates: list[Candidate]
    accepted: list[Candidate]
    added_keyframe_id: int | None = None


class LoopDetector:
    """Describe, match, and (in mapping mode) grow the map, one image at a time."""

    def __init__(self, describer, keyframe_map: KeyframeMap, matching: MatchingConfig,
                 mapping: KeyframeSelector | None = None, source: str = "live", *,
                 verification: VerificationConfig | None = None, temporal: TemporalConfig | None = None,
                 intrinsics: CameraIntrinsics | None = None, vocabulary_keyframes: int = MAPPING_FIT_KEYFRAMES) -> None:
        """``describer`` is the map's (``map_building.describer_for_map``). ``verification`` / ``temporal`` None
        turn that stage off. Verification needs a map whose keyframes carry local features (ConfigError
        otherwise); ``intrinsics`` (settable later, e.g. from CameraInfo) give it the essential matrix and the
        relative pose. In mapping mode, a map started empty fits its own vocabulary once it has
        ``vocabulary_keyframes`` keyframes."""
        if keyframe_map.model_fingerprint != describer.fingerprint:
            raise ConfigError(
                f"the map was built with model {keyframe_map.model_name or '?'} "
                f"(fingerprint {keyframe_map.model_fingerprint}) but the loaded model is "
                f"{describer.model_name} (fingerprint {describer.fingerprint})")
        if verification is not None and len(keyframe_map) and not keyframe_map.has_local_features:
            raise ConfigError(
                f"{keyframe_map.source} has no local features for geometric verification (a map of format_version 1, "
                f"built before verification existed): rebuild it with build_map, or turn verification off")
        self._builder = KeyframeBuilder(describer, keyframe_map, vocabulary_keyframes,
                                        calibrate_while_adding=mapping is not None)
        self.map = keyframe_map
        self.matching = matching
        self.mapping = mapping
        self.source = source
        self.verification = verification
        self.intrinsics = intrinsics
        self.temporal = None if temporal is None else TemporalConsistency(temporal)
        self.temporal_basis = "off" if temporal is None else "no image yet"  # what temporal consistency measures along
        self._verifiers = (None if verification is None
                           else ThreadPoolExecutor(VERIFY_THREADS, thread_name_prefix="tscm_verify"))

    @property
    def describer(self):
        """The describer of the map's descriptors (it changes when mapping mode fits the map's vocabulary)."""
        return self._builder.describer

    @property
    def matching(self) -> MatchingConfig:
        return self._matching

    @matching.setter
    def matching(self, matching: MatchingConfig) -> None:
        self._matching = matching

    def _scores(self, similarities: np.ndarray, same_place: np.ndarray) -> np.ndarray:
        """The candidates' scores: the map's calibration of their margins (tscm_ros/map_calibration.py); for a map
        too small to have one, the model's own calibration of their similarity (trained checkpoints carry one),
        else the similarity itself."""
        if self.map.calibration is not None:
            return self.map.calibration.score(candidate_margins(similarities, same_place))
        prior = self.describer.calibration
        return similarities if prior is None else np.array([prior(s) for s in similarities])

    def _match(self, descriptor: np.ndarray, exclusion: Exclusion, stamp_ns: int,
               position: np.ndarray | None) -> list[Candidate]:
        """The best ``k`` candidates by similarity that score at least ``min_score``. With temporal consistency,
        a candidate is ``consistent`` when the images before it support its place: the candidate of the best
        sequence score (tscm_ros/temporal.py) shows the same place, and the history is full."""
        pool = self.map.query(descriptor, max(self.matching.k, POOL), exclusion, 0.0)
        ids = np.array([c.keyframe_id for c in pool], dtype=np.int64)
        similarities = np.array([c.score for c in pool], dtype=np.float64)
        same_place = self.map.same_place(ids, ids)
        for candidate, similarity, score in zip(pool, similarities, self._scores(similarities, same_place)):
            candidate.similarity, candidate.score = float(similarity), float(score)
        if self.temporal is not None:  # every image enters the history, whatever min_score
            path = self.map.path_lengths(ids)
            by_order = len(ids) > 0 and bool(np.isnan(path).any())  # a map without poses: keyframe order
            sequence, full = self.temporal.update(stamp_ns, None if by_order else position,
                                                  ids.astype(np.float64) if by_order else path, similarities,
                                                  by_order=by_order)
            self.temporal_basis = ("keyframe order (map without poses)" if by_order
                                   else "path, odometry" if position is not None else "path, no odometry")
            if len(sequence):
                supported = same_place[:, int(np.argmax(sequence))]
                for candidate, score, support in zip(pool, sequence, supported):
                    candidate.sequence_score, candidate.consistent = float(score), bool(full and support)
        return [c for c in pool[: self.matching.k] if c.score >= self.matching.min_score]

    def _verify(self, image: np.ndarray, candidates: list[Candidate]):
        """Geometric verification of each candidate; the query's local features (None when off or when there
        is no candidate to verify)."""
        if self.verification is None or not candidates:
            return None
        features = extract_local_features(image)
        config, intrinsics = self.verification, self.intrinsics

        def check(candidate: Candidate) -> None:
            keyframe_features = self.map.local_features(candidate.keyframe_id)
            if keyframe_features is not None:
                candidate.verification = verify(features, keyframe_features, config, intrinsics)

        list(self._verifiers.map(check, candidates))
        return features

    def accepts(self, candidate: Candidate) -> bool:
        """Whether a candidate passed every stage that is on."""
        return ((self.verification is None or (candidate.verification is not None and candidate.verification.verified))
                and (self.temporal is None or candidate.consistent))

    def process(self, image: np.ndarray, stamp_ns: int, pose=None) -> Detection:
        """Candidates for one HxWx3 uint8 RGB image taken at ``stamp_ns`` (pose: ``geometry.Pose`` or None)."""
        describer = self.describer
        if self.mapping is not None:
            descriptors, feature_maps = self._builder.describe([image])
        else:
            descriptors, feature_maps = describer.describe([image]), [()]
        descriptor = descriptors[0]
        position = None if pose is None else pose.position
        exclusion = Exclusion(min_time_gap_s=self.matching.exclude_recent_s,
                              min_distance_m=self.matching.exclude_within_m,
                              query_stamp_ns=stamp_ns, query_position=position)
        candidates = self._match(descriptor, exclusion, stamp_ns, position)
        features = self._verify(image, candidates)
        detection = Detection(descriptor=descriptor, fingerprint=describer.fingerprint, candidates=candidates,
                              accepted=[c for c in candidates if self.accepts(c)])
        if self.mapping is not None and self.mapping.accept(stamp_ns, position, descriptor):
            meta = KeyframeMeta(stamp_ns=stamp_ns, pose=pose, bag=self.source,
                                local_features=features if features is not None else extract_local_features(image))
            ids = self._builder.add_described(descriptor[None, :], feature_maps, [meta])
            detection.added_keyframe_id = int(ids[0])
            if self._builder.describer is not describer:  # the map fitted its own vocabulary
                self.matching = self.matching
        return detection
