"""The per-image step of loop-closure detection, shared by the live node, build_map and evaluation.

``LoopDetector.process`` describes one RGB image with the map's describer, queries the keyframe map with the
exclusion rules, scores the candidates along the recent images (temporal consistency,
tscm_ros/detect/temporal.py), checks the best ``k`` geometrically (tscm_ros/detect/verification.py), and in mapping
mode adds the image as a keyframe when the map's ``KeyframeSelector`` accepts it (through
tscm_ros/map/building.py, the one way keyframes are added, which also fits the map's own vocabulary once
it has enough keyframes). A candidate is *accepted* (the node
publishes it as a loop) when it passes every stage that is on. No ROS here: the node converts messages and
publishes, everything else happens in this module.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import numpy as np

from tscm_ros.describe.local_features import LocalFeatures, extract_local_features
from tscm_ros.detect.detection import Detection, Match, MatchingConfig
from tscm_ros.detect.sequence_null import estimate_sequence_null
from tscm_ros.detect.stream_null import SEARCHED, StreamNull, wrong_place_candidates
from tscm_ros.detect.temporal import (
    Normaliser,
    SequenceMatcher,
    TemporalConfig,
    TemporalConsistency,
    normalisation_sample,
    sequence_evidence,
    single_threaded_blas,
)
from tscm_ros.detect.verification import AUTO_VERIFY_MIN_SIDE, CameraIntrinsics, VerificationConfig, verify
from tscm_ros.detect.verification_null import combined_rate, estimate_inlier_null
from tscm_ros.errors import ConfigError
from tscm_ros.map.building import MAPPING_FIT_KEYFRAMES, KeyframeBuilder, KeyframeSelector
from tscm_ros.map.calibration import MIN_KEYFRAMES, POOL, MapCalibration, candidate_margins
from tscm_ros.map.exclusion import Exclusion
from tscm_ros.map.keyframe_map import KeyframeMap

VERIFY_THREADS = 2  # OpenCV matching and RANSAC release the GIL: candidates are verified two at a time


@dataclass
class _SequenceState:
    """What sequence scoring needs of the map, rebuilt as the map changes: the normalisation sample, the
    matchers along its order and (with poses) its path, and their null calibrations, one per sequence length
    (``TemporalConfig.windows``)."""

    count: int
    fingerprint: str
    normaliser: Normaliser
    by_order: SequenceMatcher
    by_path: SequenceMatcher | None
    null_by_order: tuple[MapCalibration | None, ...]
    null_by_path: tuple[MapCalibration | None, ...]
    null_inliers: MapCalibration | None


def _strength(scale: tuple) -> float:
    """The false-alarm rate of a sequence length's best candidate (``_sequence_scales``), inf where it has no
    rate or may not be published."""
    sequence, rates, consistent = scale
    best = int(np.nanargmax(sequence))
    return float(rates[best]) if rates is not None and consistent[best] else np.inf


class LoopDetector:
    """Describe, match, and (in mapping mode) grow the map, one image at a time (a ``detection.Detector``).

    Settings that change while it runs go through methods (``set_matching``, ``set_intrinsics``); they apply
    from the next image on.
    """

    def __init__(self, describer, keyframe_map: KeyframeMap, matching: MatchingConfig,
                 mapping: KeyframeSelector | None = None, source: str = "live", *,
                 verification: VerificationConfig | None = None, temporal: TemporalConfig | None = None,
                 intrinsics: CameraIntrinsics | None = None, vocabulary_keyframes: int = MAPPING_FIT_KEYFRAMES,
                 auto_verify_min_side: int = AUTO_VERIFY_MIN_SIDE) -> None:
        """``describer`` is the map's (``map.building.describer_for_map``). ``verification`` / ``temporal`` None
        turn that stage off. The verification stage needs a map whose keyframes carry local features
        (ConfigError otherwise); ``intrinsics`` (settable later, e.g. from CameraInfo) give it the essential
        matrix and the relative pose. With temporal consistency on, an image whose smaller side has at least
        ``auto_verify_min_side`` pixels (0: never) gets its best candidate verified, and the inliers count as
        evidence in its score (``_verification_evidence``), whether the verification stage is on or not. In
        mapping mode, a map started empty fits its own vocabulary once it has ``vocabulary_keyframes``
        keyframes."""
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
        self._map = keyframe_map
        self._matching = matching
        self._mapping = mapping
        self._source = source
        self._verification = verification
        self._intrinsics = intrinsics
        self._temporal = temporal
        self._sequences = [] if temporal is None else [
            TemporalConsistency(replace(temporal, window=window, long_window=0)) for window in temporal.windows]
        self._sequence_state: _SequenceState | None = None
        self._stream = StreamNull()
        self._auto_verify_min_side = int(auto_verify_min_side)
        self.temporal_basis = "off" if temporal is None else "no image yet"  # what temporal consistency measures along
        if self._temporal is not None:
            self._sequence()  # the null calibrations at start-up, not on the first image
        self._verifiers = (None if verification is None
                           else ThreadPoolExecutor(VERIFY_THREADS, thread_name_prefix="tscm_verify"))

    # ----- what it is ------------------------------------------------------------------------------------

    @property
    def describer(self):
        """The describer of the map's descriptors (it changes when mapping mode fits the map's vocabulary)."""
        return self._builder.describer

    @property
    def model_name(self) -> str:
        return self.describer.model_name

    @property
    def fingerprint(self) -> str:
        return self.describer.fingerprint

    @property
    def dim(self) -> int:
        return int(self.describer.dim)

    @property
    def device(self):
        """Where the describer runs."""
        return self.describer.device

    @property
    def calibrated(self) -> bool:
        return self.describer.calibration is not None or self._map.calibration is not None

    @property
    def score_basis(self) -> str:
        """What ``score`` is, as ``_scores`` computes it (for /diagnostics)."""
        state = self._sequence_state
        if state is not None and any(null is not None for null in state.null_by_order + state.null_by_path):
            parts = [f"{name}, {window} images: {null.summary()}"
                     for name, nulls in (("along the path", state.null_by_path),
                                         ("along the map's order", state.null_by_order))
                     for window, null in zip(self._temporal.windows, nulls) if null is not None]
            if state.null_inliers is not None:
                parts.append(f"verification of images {self._auto_verify_min_side} px and larger: inliers of a "
                             f"look-alike median {np.median(state.null_inliers.null):.0f}, 99th percentile "
                             f"{np.quantile(state.null_inliers.null, 0.99):.0f}")
            parts.append(self._stream.summary(state.normaliser.map_spread))
            return "sequence margins, " + "; ".join(parts)
        if self._map.calibration is not None:
            return self._map.calibration.summary()
        fallback = "the model's own calibration" if self.describer.calibration is not None else "raw similarity"
        return f"none (fewer than {MIN_KEYFRAMES} keyframes): {fallback}"

    @property
    def keyframe_positions(self) -> np.ndarray:
        return np.asarray(self._map.positions, dtype=np.float64).reshape(-1, 3)

    @property
    def matching(self) -> MatchingConfig:
        return self._matching

    # ----- settings that change while it runs ------------------------------------------------------------

    def set_matching(self, matching: MatchingConfig, min_inliers: int | None = None) -> None:
        """Match with ``matching`` from the next image on; ``min_inliers``, when given, is geometric verification's
        new threshold (ignored while verification is off)."""
        self._matching = matching
        if min_inliers is not None and self._verification is not None:
            self._verification = replace(self._verification, min_inliers=min_inliers)

    def set_intrinsics(self, intrinsics: CameraIntrinsics | None) -> bool:
        """Verify with these camera intrinsics from the next image on; whether they differ from those in use."""
        changed = intrinsics != self._intrinsics
        self._intrinsics = intrinsics
        return changed

    # ----- one image -------------------------------------------------------------------------------------

    def _scores(self, similarities: np.ndarray, same_place: np.ndarray) -> np.ndarray:
        """The candidates' scores: the map's calibration of their margins (tscm_ros/map/calibration.py); for a map
        too small to have one, the model's own calibration of their similarity (trained checkpoints carry one),
        else the similarity itself."""
        if self._map.calibration is not None:
            return self._map.calibration.score(candidate_margins(similarities, same_place))
        prior = self.describer.calibration
        return similarities if prior is None else np.asarray(prior(similarities), dtype=np.float64)

    def _sequence(self) -> _SequenceState | None:
        """The sequence state for the map as it is now; rebuilt when the map has doubled or was described anew
        (mapping mode), the matchers whenever it grew. None for an empty map."""
        count, state = len(self._map), self._sequence_state
        if count == 0:
            return None
        if state is not None and state.count == count and state.fingerprint == self._map.model_fingerprint:
            return state
        lengths, tolerance = self._map.path_lengths(np.arange(count)), self._temporal.tolerance_m
        posed = not np.isnan(lengths).any()
        by_order = SequenceMatcher(count, lengths if posed else None, tolerance, odometry=False)
        by_path = SequenceMatcher(count, lengths, tolerance) if posed else None
        if state is None or state.fingerprint != self._map.model_fingerprint or count >= 2 * state.count:
            normaliser = Normaliser(normalisation_sample(self._map))
            configs = [sequence.config for sequence in self._sequences]
            state = _SequenceState(count, self._map.model_fingerprint, normaliser, by_order, by_path,
                                   tuple(estimate_sequence_null(self._map, config, by_order, normaliser)
                                         for config in configs),
                                   tuple(None if by_path is None
                                         else estimate_sequence_null(self._map, config, by_path, normaliser)
                                         for config in configs),
                                   None if self._auto_verify_min_side <= 0
                                   else estimate_inlier_null(self._map, normaliser, VerificationConfig()))
        else:  # grown, not doubled: new keyframes to place, the same null
            state = replace(state, count=count, by_order=by_order, by_path=by_path)
        self._sequence_state = state
        return state

    def _match(self, descriptor: np.ndarray, exclusion: Exclusion, stamp_ns: int,
               position: np.ndarray | None, image: np.ndarray) -> tuple[list[Match], LocalFeatures | None]:
        """The best ``k`` candidates by similarity that score at least ``min_score``. With temporal consistency
        the score is that of the candidate's sequence margin (tscm_ros/detect/temporal.py), calibrated by the
        map's null of sequence margins (tscm_ros/detect/sequence_null.py), and a candidate is ``consistent``
        when it shows the place of the best sequence and the history is full."""
        features = None
        size = max(self._matching.k, POOL)
        found, distances, similarities = self._map.search_batch(
            np.asarray(descriptor)[None, :], size if self._temporal is None else max(size, SEARCHED), exclusion)[0]
        ids, similarities = found[:size], similarities[:size]
        pool = [self._map.candidate(int(i), float(d), float(s)) for i, d, s in zip(ids, distances, similarities)]
        same_place = self._map.same_place(ids, ids)
        matches = [Match(candidate, float(score)) for candidate, score in zip(pool, self._scores(similarities,
                                                                                                 same_place))]
        state = self._sequence() if self._temporal is not None else None
        if state is not None:  # every image enters the history, whatever min_score
            along_path = position is not None and state.by_path is not None
            self.temporal_basis = ("path, odometry" if along_path
                                   else "keyframe order along the map's path, no odometry" if state.by_path is not None
                                   else "keyframe order (map without poses)")
            used = 1 if not along_path and state.by_path is not None else len(self._sequences)
            with single_threaded_blas():
                self._stream.observe(state.normaliser.spread(descriptor))
                scales = self._sequence_scales(state, along_path, stamp_ns, position, descriptor, ids, same_place,
                                               found, used)
            if scales:
                sequence, rates, consistent = min(scales, key=_strength)  # on a tie, the shortest
                scores = ([m.score for m in matches] if rates is None  # none above the best sequence's:
                          else np.minimum(*np.broadcast_arrays(  # its neighbour is not the likelier revisit
                              1.0 - np.minimum(1.0, rates * len(scales)),
                              1.0 - min(1.0, rates[int(np.nanargmax(sequence))] * len(scales)))))
                matches = [replace(match, score=float(score), sequence_score=float(value), consistent=bool(flag))
                           for match, score, value, flag in zip(matches, scores, sequence, consistent)]
                # the evidence first
                matches.sort(key=lambda m: np.inf if math.isnan(m.sequence_score) else -m.sequence_score)
                if rates is not None and matches and matches[0].consistent:
                    matches[0], features = self._verification_evidence(image, matches[0], state.null_inliers)
        return [m for m in matches[: self._matching.k] if m.score >= self._matching.min_score], features

    def _sequence_scales(self, state: _SequenceState, along_path: bool, stamp_ns: int, position, descriptor,
                         ids: np.ndarray, same_place: np.ndarray, found: np.ndarray, used: int) -> list[tuple]:
        """Per sequence length (``TemporalConfig.windows``, the first ``used`` of them): the candidates'
        sequence scores, the false-alarm rates of their evidence (None where that length has no null; the map's
        null and the stream's, tscm_ros/detect/stream_null.py) and whether each is ``consistent`` (the history
        of that length is full and the candidate shows the place of its best sequence). Every length keeps its
        own history; lengths with no score for any candidate are left out. A map with poses queried without
        odometry uses the short length alone (``_match``): its keyframes are spaced by distance and the images
        come at any rate, and a straight path along the keyframe order drifts off over 20 images (on rendered
        routes it published near misses 5-8 m off). ``found``: the candidates searched for wrong places."""
        scales = []
        nulls = state.null_by_path if along_path else state.null_by_order
        matcher = state.by_path if along_path else state.by_order
        for index, (sequence_state, null) in enumerate(zip(self._sequences, nulls)):
            sequence, unordered = sequence_state.update(stamp_ns, position, descriptor, state.normaliser, matcher,
                                                        self._map.descriptors, ids)
            if index >= used or not len(sequence) or np.isnan(sequence).all():
                continue
            evidence = sequence_evidence(np.nan_to_num(sequence, nan=-np.inf), np.nan_to_num(unordered, nan=0.0),
                                         same_place)
            best = int(np.nanargmax(sequence))
            consistent = same_place[:, best] & sequence_state.full
            key = (along_path, sequence_state.config.window)
            rates = None
            if null is not None:
                rates = self._stream.false_alarm_rate(key, evidence, null, state.normaliser.map_spread)
                if sequence_state.full:
                    self._add_wrong_place(key, sequence_state, state, matcher, descriptor, found, int(ids[best]))
            scales.append((sequence, rates, consistent))
        return scales

    def _add_wrong_place(self, key: tuple[bool, int], sequence_state: TemporalConsistency, state: _SequenceState,
                         matcher: SequenceMatcher, descriptor: np.ndarray, found: np.ndarray, top: int) -> None:
        """The stream's sample of a wrong place's evidence for this image (tscm_ros/detect/stream_null.py)."""
        others = wrong_place_candidates(self._map, state.normaliser, descriptor, found, top,
                                        sequence_state.config.window, POOL)
        if len(others) < 2:
            return
        sequence, unordered = sequence_state.scores(state.normaliser, matcher, self._map.descriptors, others)
        if np.isnan(sequence).all():
            return
        evidence = sequence_evidence(np.nan_to_num(sequence, nan=-np.inf), np.nan_to_num(unordered, nan=0.0),
                                     self._map.same_place(others, others))
        self._stream.add(key, float(evidence[int(np.nanargmax(sequence))]))

    def _verification_evidence(self, image: np.ndarray, match: Match,
                               null_inliers: MapCalibration | None) -> tuple[Match, LocalFeatures | None]:
        """The best candidate of a camera-sized image, verified, its score raised by the inliers: one minus the
        smaller of the sequence's false-alarm rate and Fisher's combination of it with the inliers' (from the
        map's look-alike pairs, tscm_ros/detect/verification_null.py). Fewer inliers than ``min_inliers`` (a
        fundamental matrix fits any 8 matches) and uninformative ones leave the score as it was; the smaller
        of two rates at most doubles the false-alarm rate of either alone. The image's local features are
        returned for the stages after; (match, None) when it does not apply."""
        keyframe_features = self._map.local_features(match.keyframe_id)
        if null_inliers is None or keyframe_features is None or min(image.shape[:2]) < self._auto_verify_min_side:
            return match, None
        features = extract_local_features(image)
        check = verify(features, keyframe_features, self._verification or VerificationConfig(), self._intrinsics)
        sequence_rate = 1.0 - match.score
        inlier_rate = float(null_inliers.false_alarm_rate(check.inliers)) if check.verified else 1.0
        rate = min(sequence_rate, combined_rate(sequence_rate, inlier_rate))
        return replace(match, score=1.0 - rate, verification=check), features

    def _verify(self, image: np.ndarray, matches: list[Match], features: LocalFeatures | None):
        """``matches`` with their geometric verification, and the query's local features (``features`` when
        already extracted; None when verification is off or when there is nothing to verify)."""
        if self._verification is None or not matches:
            return matches, features
        features = extract_local_features(image) if features is None else features
        config, intrinsics = self._verification, self._intrinsics

        def check(match: Match) -> Match:
            keyframe_features = self._map.local_features(match.keyframe_id)
            if keyframe_features is None or match.verification is not None:
                return match
            return replace(match, verification=verify(features, keyframe_features, config, intrinsics))

        return list(self._verifiers.map(check, matches)), features

    def accepts(self, match: Match) -> bool:
        """Whether a candidate passed every stage that is on."""
        return ((self._verification is None or (match.verification is not None and match.verification.verified))
                and (self._temporal is None or match.consistent))

    def process(self, image: np.ndarray, stamp_ns: int, pose=None) -> Detection:
        """Candidates for one HxWx3 uint8 RGB image taken at ``stamp_ns`` (pose: ``geometry.Pose`` or None)."""
        describer = self.describer
        if self._mapping is not None:
            descriptors, feature_maps = self._builder.describe([image])
        else:
            descriptors, feature_maps = describer.describe([image]), [()]
        descriptor = descriptors[0]
        position = None if pose is None else pose.position
        exclusion = Exclusion(min_time_gap_s=self._matching.exclude_recent_s,
                              min_distance_m=self._matching.exclude_within_m,
                              query_stamp_ns=stamp_ns, query_position=position)
        candidates, features = self._verify(image, *self._match(descriptor, exclusion, stamp_ns, position, image))
        detection = Detection(descriptor=descriptor, fingerprint=describer.fingerprint, candidates=candidates,
                              accepted=[c for c in candidates if self.accepts(c)])
        if self._mapping is not None:
            detection.added_keyframe_id = self._builder.add_image(image, stamp_ns, pose, self._source, descriptor,
                                                                  feature_maps[0], self._mapping,
                                                                  local_features=features)
        return detection
