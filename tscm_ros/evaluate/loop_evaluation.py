"""Loop-closure evaluation: each method run over the queries of a traversal (or of a revisit set).

A map is built from a *reference* traversal and every frame of a *query* traversal of the same places
goes through the node's code path (``LoopDetector.process``: describe, then search the map), for each
method side by side: the pretrained backbone + GeM baseline, the default (untrained) student, any
teacher / student checkpoints, and the ORB bag-of-words detector (:mod:`tscm_ros.detect.bow_baseline`).
``evaluate --bag`` (:mod:`tscm_ros.cli.evaluate`) runs it; :mod:`tscm_ros.evaluate.reporting` writes the report.

The metrics and their definitions are in tscm_ros/evaluate/loop_metrics.py.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from tscm_ros.detect.detection import Detector
from tscm_ros.errors import BagError
from tscm_ros.evaluate.loop_metrics import LoopMetrics, at_threshold, evaluate_loop_closures, within_radius
from tscm_ros.io.bag import Frame, FrameSource
from tscm_ros.progress import progress

# ----- running methods over bags ---------------------------------------------------------------------


@dataclass
class MethodRun:
    """One method's results: its per-query candidates, latencies and metrics."""

    name: str
    model_name: str
    fingerprint: str
    dim: int
    map_positions: np.ndarray
    query_stamps: np.ndarray
    query_positions: np.ndarray
    query_orientations: np.ndarray  # (N, 4) x, y, z, w; NaN rows without pose
    ranked_ids: list[np.ndarray]
    ranked_scores: list[np.ndarray]
    latencies_ms: np.ndarray
    metrics: LoopMetrics
    top1_distance: np.ndarray  # the top candidate's descriptor distance, NaN without one
    top1_stamp_ns: np.ndarray  # the top candidate's keyframe stamp, -1 without one
    within: np.ndarray = field(repr=False)
    calibrated: bool = False

    def at_score(self, min_score: float) -> tuple[float, float]:
        """(precision, recall) of accepting the top-1 candidates scoring >= ``min_score``."""
        return at_threshold(self.metrics.curve, min_score)

    @property
    def median_latency_ms(self) -> float:
        """Median wall time of one query (describe + search), in milliseconds."""
        return float(np.median(self.latencies_ms)) if len(self.latencies_ms) else math.nan


def reference_keyframes(reference: FrameSource, keyframe_distance_m: float) -> Iterator[Frame]:
    """The reference frames that become map keyframes: one per ``keyframe_distance_m`` of travel,
    chosen by build_map's travel test (``KeyframeSelector``)."""
    from tscm_ros.map.building import KeyframeSelector

    selector = KeyframeSelector(min_distance_m=keyframe_distance_m)
    for frame in reference.open():
        if selector.accept(frame.stamp_ns, None if frame.pose is None else frame.pose.position, None):
            yield frame


def build_descriptor_map(describer, keyframes: Iterable[Frame]):
    """A flat ``KeyframeMap`` of ``keyframes`` with local features, built as build_map builds one (the same
    ``KeyframeBuilder.add_frames``: a map of its own vocabulary for the default model); (the map, the describer
    for its queries)."""
    from tscm_ros.map.building import KeyframeBuilder
    from tscm_ros.map.keyframe_map import KeyframeMap

    builder = KeyframeBuilder(describer, KeyframeMap.for_describer(describer))
    builder.add_frames(keyframes)
    builder.finish()
    return builder.map, builder.describer


def build_bow_detector(keyframes: Iterable[Frame], matching, num_words: int, max_features: int = 500):
    """The ORB bag-of-words detector: vocabulary trained on the ``keyframes``, which it then indexes."""
    from tscm_ros.detect.bow_baseline import BowLoopDetector, OrbVocabulary, orb_descriptors

    described = [(frame.stamp_ns, frame.pose, orb_descriptors(frame.image, max_features)) for frame in keyframes]
    vocabulary = OrbVocabulary.train([descriptors for _, _, descriptors in described], num_words=num_words)
    detector = BowLoopDetector(vocabulary, matching, max_features=max_features)
    for stamp_ns, pose, descriptors in described:
        detector.add_keyframe(descriptors, stamp_ns, pose)
    return detector


def _run(name: str, detector: Detector, frames: Iterable[Frame], total: int | None, odometry: bool = True) -> dict:
    """Every frame through ``detector.process`` (the node's path), timed: per query its stamp, pose (NaN
    without one), accepted candidates, the top one's descriptor distance and keyframe stamp, and latency.
    Without ``odometry`` the detector gets no query pose (a node without pose_topic); the position is still
    recorded, for the ground truth."""
    stamps, positions, orientations, ranked_ids, ranked_scores, latencies = [], [], [], [], [], []
    top1_distances, top1_stamps = [], []
    for frame in progress(frames, total=total, desc=name, unit="query", leave=False):
        pose = frame.pose if odometry else None
        if not stamps:  # untimed warm-up: the first call at batch size 1 pays one-off set-up costs
            detector.process(frame.image, frame.stamp_ns - 10**12, pose)
        started = time.perf_counter()
        detection = detector.process(frame.image, frame.stamp_ns, pose)
        latencies.append(1000.0 * (time.perf_counter() - started))
        stamps.append(frame.stamp_ns)
        positions.append(np.full(3, np.nan) if frame.pose is None else frame.pose.position)
        orientations.append(np.full(4, np.nan) if frame.pose is None else frame.pose.orientation)
        ranked_ids.append(np.array([c.keyframe_id for c in detection.accepted], dtype=np.int64))
        ranked_scores.append(np.array([c.score for c in detection.accepted], dtype=np.float64))
        top = detection.accepted[0] if detection.accepted else None
        top1_distances.append(math.nan if top is None else top.distance)
        top1_stamps.append(-1 if top is None else top.stamp_ns)
    return {"query_stamps": np.asarray(stamps, dtype=np.int64),
            "query_positions": np.asarray(positions, dtype=np.float64).reshape(-1, 3),
            "query_orientations": np.asarray(orientations, dtype=np.float64).reshape(-1, 4),
            "ranked_ids": ranked_ids, "ranked_scores": ranked_scores, "latencies_ms": np.asarray(latencies),
            "top1_distance": np.asarray(top1_distances, dtype=np.float64),
            "top1_stamp_ns": np.asarray(top1_stamps, dtype=np.int64)}


def _method_run(name: str, detector: Detector, run: dict, within: np.ndarray, ns: Sequence[int]) -> MethodRun:
    return MethodRun(
        name=name, model_name=detector.model_name, fingerprint=detector.fingerprint, dim=int(detector.dim),
        map_positions=detector.keyframe_positions,
        metrics=evaluate_loop_closures(run["ranked_ids"], run["ranked_scores"], within, ns),
        within=within, calibrated=detector.calibrated, **run)


def run_queries(name: str, detector: Detector, queries: FrameSource, radius_m: float, ns: Sequence[int],
                odometry: bool = True) -> MethodRun:
    """Every posed query frame of a bag through ``detector.process``, timed, then scored: a candidate is right
    within ``radius_m`` of the query's position. ``odometry`` False: the detector does not get the poses."""
    reader = queries.open()
    run = _run(name, detector, (frame for frame in reader if frame.pose is not None), len(reader), odometry)
    if not len(run["query_stamps"]):
        raise BagError(f"query bag {queries.bag} has no frames with a pose: nothing to evaluate "
                       f"(give --pose-topic, or check that the pose stream covers the images)")
    within = within_radius(run["query_positions"], detector.keyframe_positions, radius_m)
    return _method_run(name, detector, run, within, ns)


def run_revisit_set(name: str, detector: Detector, revisit_set, ns: Sequence[int]) -> MethodRun:
    """Every query of a :class:`~tscm_ros.io.revisit_set.RevisitSet` through ``detector.process``, timed, then
    scored by the set's ground truth; ``detector``'s map must hold the set's references, in order."""
    if len(detector.keyframe_positions) != len(revisit_set.references):
        raise ValueError(f"the map holds {len(detector.keyframe_positions)} keyframes, {revisit_set.name} has "
                         f"{len(revisit_set.references)} references")
    run = _run(name, detector, revisit_set.query_frames(), len(revisit_set.queries))
    return _method_run(name, detector, run, revisit_set.ground_truth(), ns)
