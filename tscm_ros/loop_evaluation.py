"""Loop-closure evaluation on rosbag2 traversals: metrics, plots, and the bag-mode evaluation runner.

A map is built from a *reference* traversal and every frame of a *query* traversal of the same places
goes through the node's code path (``LoopDetector.process``: describe, then search the map), for each
method side by side: the pretrained backbone + GeM baseline, the default (untrained) student, any
teacher / student checkpoints, and the ORB bag-of-words detector (:mod:`tscm_ros.bow_baseline`).

Definitions (ground truth from the bags' poses)
-----------------------------------------------
- A candidate is *correct* when its keyframe lies within ``radius_m`` (straight-line, metres) of the
  query's ground-truth position. Keyframes without a pose are never correct.
- A query *has a true loop* when at least one map keyframe lies within ``radius_m`` of it. Queries
  without a true loop cannot be answered correctly: they are left out of every recall denominator, but
  their top-1 candidate still counts as a prediction in the precision-recall curve (always a false
  positive), because a loop-closure detector must reject them.
- ``recall@N``: the share of queries with a true loop whose N best candidates include a correct one.
  A query that returned fewer than N candidates (or none) is judged on those it returned.
- Precision-recall of the top-1 candidate's score: at threshold ``t`` every query whose top-1 score is
  ``>= t`` is *accepted*; ``precision(t) = correct accepted / accepted`` and ``recall(t) = correct
  accepted / queries with a true loop``. Thresholds are the distinct top-1 scores, highest first, so
  queries with *tied* scores are always accepted together (no threshold separates them, and no
  ordering within a tie is invented). Queries without any candidate are never accepted.
- Average precision (AP): the step-wise area under that curve, ``sum_i (R_i - R_{i-1}) * P_i`` with
  ``R_0 = 0`` over the thresholds, highest first: scikit-learn's ``average_precision_score`` (no
  interpolation) except that recall is relative to the queries with a true loop, so a detector that
  ranks every correct top-1 first still scores below 1 when some true loops got a wrong top-1.
- Maximum recall at 100 % precision: the highest ``recall(t)`` over thresholds where every accepted
  query is correct (0 when even the best-scored query is wrong), with the lowest such threshold: the
  operating point a SLAM back-end, which must not take a false loop closure, cares about.
- Latency: wall time of one ``process`` call (describe one image + search the map, plus the stages that
  are on), median over the queries, measured in the same run for every method.
- Stages: each descriptor method is also run with temporal consistency, with geometric verification, and
  with both (rows ``+ temporal``, ``+ verification``, ``+ verification + temporal``: the node's defaults),
  with the node's k = 5 candidates. Those rows count only the candidates the node would publish
  (``Detection.accepted``): a query whose candidates all fail a stage has none.
When no query has a true loop, recall, AP and maximum recall are undefined (NaN, shown as ``n/a``).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import textwrap
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from tscm_ros.atomic import atomic_directory
from tscm_ros.cli.common import add_frame_reader_arguments
from tscm_ros.errors import BagError, ConfigError
from tscm_ros.loop_detector import DEFAULT_MIN_SCORE
from tscm_ros.recall import ground_truth_within, recall_at_n
from tscm_ros.temporal import TemporalConfig
from tscm_ros.verification import CameraIntrinsics, VerificationConfig

DEFAULT_NS = (1, 5, 10)
DEFAULT_RADIUS_M = 10.0


# ----- metrics -------------------------------------------------------------------------------------


def within_radius(query_positions: np.ndarray, map_positions: np.ndarray, radius_m: float) -> np.ndarray:
    """Boolean (num_queries, num_keyframes): keyframe within ``radius_m`` of the query (NaN positions: never).

    Found with a k-d tree (``recall.ground_truth_within``): one byte per query and keyframe, no float
    (num_queries, num_keyframes, 3) intermediate."""
    queries = np.asarray(query_positions, dtype=np.float64).reshape(-1, 3)
    keyframes = np.asarray(map_positions, dtype=np.float64).reshape(-1, 3)
    within = np.zeros((len(queries), len(keyframes)), dtype=bool)
    for row, matches in enumerate(ground_truth_within(queries, keyframes, radius_m)):
        within[row, matches] = True
    return within


@dataclass(frozen=True)
class PRCurve:
    """Precision and recall of the top-1 candidate at each threshold (distinct top-1 scores, highest first)."""

    thresholds: np.ndarray
    precision: np.ndarray
    recall: np.ndarray


@dataclass(frozen=True)
class LoopMetrics:
    """Everything the evaluation reports for one method (see the module docstring for definitions)."""

    recall_at: dict[int, float]
    curve: PRCurve
    average_precision: float
    max_recall_at_full_precision: float
    full_precision_threshold: float
    num_queries: int
    num_with_loop: int
    num_without_candidates: int


def precision_recall_curve(top1_scores: np.ndarray, top1_correct: np.ndarray, has_loop: np.ndarray) -> PRCurve:
    """Precision/recall of accepting queries whose top-1 score is >= each threshold; NaN score = no candidate."""
    scores = np.asarray(top1_scores, dtype=np.float64)
    correct = np.asarray(top1_correct, dtype=bool)
    has_loop = np.asarray(has_loop, dtype=bool)
    if not (len(scores) == len(correct) == len(has_loop)):
        raise ValueError("top1_scores, top1_correct and has_loop must have one entry per query")
    if np.any(correct & ~has_loop):
        raise ValueError("a query without a true loop cannot have a correct top-1 candidate")
    answered = ~np.isnan(scores)
    thresholds = np.unique(scores[answered])[::-1]
    order = np.argsort(-scores[answered], kind="stable")
    sorted_scores = scores[answered][order]
    sorted_correct = correct[answered][order]
    # Index just past the last query scoring >= each threshold: ties enter together.
    ends = np.searchsorted(-sorted_scores, -thresholds, side="right")
    cumulative_correct = np.concatenate([[0], np.cumsum(sorted_correct)])
    true_positives = cumulative_correct[ends].astype(np.float64)
    precision = true_positives / ends if len(ends) else np.zeros(0)
    num_with_loop = int(has_loop.sum())
    recall = true_positives / num_with_loop if num_with_loop else np.full(len(ends), math.nan)
    return PRCurve(thresholds=thresholds, precision=precision, recall=recall)


def average_precision(curve: PRCurve) -> float:
    """Step-wise area under the PR curve: sum of (R_i - R_{i-1}) * P_i, R_0 = 0 (no interpolation)."""
    if len(curve.recall) and np.isnan(curve.recall).any():
        return math.nan
    recall_steps = np.diff(np.concatenate([[0.0], curve.recall]))
    return float(np.sum(recall_steps * curve.precision))


def max_recall_at_full_precision(curve: PRCurve) -> tuple[float, float]:
    """(highest recall among thresholds with precision 1, the lowest such threshold); (0, NaN) if none."""
    if len(curve.recall) and np.isnan(curve.recall).any():
        return math.nan, math.nan
    perfect = np.flatnonzero(curve.precision == 1.0)
    if len(perfect) == 0:
        return 0.0, math.nan
    # Recall never drops as the threshold drops, so the lowest perfect threshold has the highest recall.
    best = perfect[-1]
    return float(curve.recall[best]), float(curve.thresholds[best])


def at_threshold(curve: PRCurve, min_score: float) -> tuple[float, float]:
    """(precision, recall) of accepting the queries whose top-1 score is >= ``min_score``: the curve's point
    at the lowest threshold still >= ``min_score`` (NaN precision and 0 recall when no query scores that)."""
    reached = np.flatnonzero(curve.thresholds >= min_score)
    if len(reached) == 0:
        return math.nan, 0.0
    return float(curve.precision[reached[-1]]), float(curve.recall[reached[-1]])


def evaluate_loop_closures(ranked_ids: Sequence[np.ndarray], ranked_scores: Sequence[np.ndarray],
                           within: np.ndarray, ns: Sequence[int] = DEFAULT_NS) -> LoopMetrics:
    """All metrics from each query's ranked candidate keyframe ids and scores (best first) and the
    (num_queries, num_keyframes) ground truth from :func:`within_radius`."""
    within = np.asarray(within, dtype=bool)
    if not (len(ranked_ids) == len(ranked_scores) == len(within)):
        raise ValueError(f"{len(ranked_ids)} ranked id lists, {len(ranked_scores)} score lists, "
                         f"{len(within)} ground-truth rows: need one per query")
    has_loop = within.any(axis=1) if within.size else np.zeros(len(within), dtype=bool)
    ranked_correct = [within[q, np.asarray(ids, dtype=np.int64)] for q, ids in enumerate(ranked_ids)]
    true_keyframes = [np.flatnonzero(row) for row in within]
    top1_scores = np.array([float(s[0]) if len(s) else math.nan for s in ranked_scores])
    top1_correct = np.array([bool(flags[0]) if len(flags) else False for flags in ranked_correct])
    curve = precision_recall_curve(top1_scores, top1_correct, has_loop)
    max_recall, threshold = max_recall_at_full_precision(curve)
    return LoopMetrics(
        recall_at=recall_at_n(ranked_ids, true_keyframes, ns).recall,
        curve=curve,
        average_precision=average_precision(curve),
        max_recall_at_full_precision=max_recall,
        full_precision_threshold=threshold,
        num_queries=len(within),
        num_with_loop=int(has_loop.sum()),
        num_without_candidates=int(np.isnan(top1_scores).sum()),
    )


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
    ranked_ids: list[np.ndarray]
    ranked_scores: list[np.ndarray]
    latencies_ms: np.ndarray
    metrics: LoopMetrics
    within: np.ndarray = field(repr=False)
    calibrated: bool = False

    def at_score(self, min_score: float) -> tuple[float, float]:
        """(precision, recall) of accepting the top-1 candidates scoring >= ``min_score``."""
        return at_threshold(self.metrics.curve, min_score)

    @property
    def median_latency_ms(self) -> float:
        """Median wall time of one query (describe + search), in milliseconds."""
        return float(np.median(self.latencies_ms)) if len(self.latencies_ms) else math.nan


@dataclass(frozen=True)
class BagSource:
    """Where frames come from: a rosbag2 directory and (optionally) its topics."""

    path: str
    image_topic: str | None = None
    pose_topic: str | None = None
    max_gap_s: float = 1.0

    def frames(self):
        """A reader (``bag.FrameReader``: ``len``, iteration over ``bag.Frame`` in stamp order)."""
        from tscm_ros.bag import open_frames

        return open_frames(self.path, image_topic=self.image_topic, pose_topic=self.pose_topic,
                           max_gap_s=self.max_gap_s)


def reference_keyframes(reference: BagSource, keyframe_distance_m: float) -> Iterator:
    """The reference frames that become map keyframes: one per ``keyframe_distance_m`` of travel,
    chosen by build_map's travel test (``KeyframeSelector``)."""
    from tscm_ros.loop_detector import KeyframeSelector

    selector = KeyframeSelector(min_distance_m=keyframe_distance_m)
    for frame in reference.frames():
        if selector.accept(frame.stamp_ns, None if frame.pose is None else frame.pose.position, None):
            yield frame


def build_descriptor_map(describer, reference: BagSource, keyframe_distance_m: float):
    """A flat ``KeyframeMap`` of the reference keyframes described by ``describer``, with local features."""
    from tscm_ros.keyframe_map import KeyframeMap, KeyframeMeta
    from tscm_ros.verification import extract_local_features

    keyframe_map = KeyframeMap(describer.dim, describer.fingerprint, describer.preprocess_config.to_dict(),
                               model_name=describer.model_name)
    batch: list = []

    def add(frames: list) -> None:
        descriptors = describer.describe([f.image for f in frames])
        keyframe_map.add(descriptors, [KeyframeMeta(stamp_ns=f.stamp_ns, pose=f.pose, bag=f.bag,
                                                    local_features=extract_local_features(f.image)) for f in frames])

    for frame in reference_keyframes(reference, keyframe_distance_m):
        batch.append(frame)
        if len(batch) == describer.batch_size:
            add(batch)
            batch = []
    if batch:
        add(batch)
    return keyframe_map


def build_bow_detector(reference: BagSource, keyframe_distance_m: float, matching, num_words: int,
                       max_features: int = 500):
    """The ORB bag-of-words detector: vocabulary trained on the reference keyframes, which it then indexes."""
    from tscm_ros.bow_baseline import BowLoopDetector, OrbVocabulary, orb_descriptors

    keyframes = [(frame.stamp_ns, frame.pose, orb_descriptors(frame.image, max_features))
                 for frame in reference_keyframes(reference, keyframe_distance_m)]
    vocabulary = OrbVocabulary.train([descriptors for _, _, descriptors in keyframes], num_words=num_words)
    detector = BowLoopDetector(vocabulary, matching, max_features=max_features)
    for stamp_ns, pose, descriptors in keyframes:
        detector.add_keyframe(descriptors, stamp_ns, pose)
    return detector


def map_positions(detector) -> np.ndarray:
    """(N, 3) positions of a detector's map keyframes (NaN without pose)."""
    keyframes = detector.map if hasattr(detector, "map") else detector
    return np.asarray(keyframes.positions, dtype=np.float64).reshape(-1, 3)


def run_queries(name: str, detector, queries: BagSource, radius_m: float, ns: Sequence[int]) -> MethodRun:
    """Every posed query frame through ``detector.process`` (the node's path), timed, then scored."""
    stamps, positions, ranked_ids, ranked_scores, latencies = [], [], [], [], []
    reader = queries.frames()
    for frame in tqdm(reader, total=len(reader), desc=name, unit="query", leave=False):
        if frame.pose is None:
            continue  # no ground truth: cannot be scored
        if not stamps:  # untimed warm-up: the first call at batch size 1 pays one-off set-up costs
            detector.process(frame.image, frame.stamp_ns, frame.pose)
        started = time.perf_counter()
        detection = detector.process(frame.image, frame.stamp_ns, frame.pose)
        latencies.append(1000.0 * (time.perf_counter() - started))
        stamps.append(frame.stamp_ns)
        positions.append(frame.pose.position)
        ranked_ids.append(np.array([c.keyframe_id for c in detection.accepted], dtype=np.int64))
        ranked_scores.append(np.array([c.score for c in detection.accepted], dtype=np.float64))
    if not stamps:
        raise BagError(f"query bag {queries.path} has no frames with a pose: nothing to evaluate "
                       f"(give --pose-topic, or check that the pose stream covers the images)")
    query_positions = np.asarray(positions, dtype=np.float64).reshape(-1, 3)
    keyframe_positions = map_positions(detector)
    within = within_radius(query_positions, keyframe_positions, radius_m)
    describer = getattr(detector, "describer", detector)
    return MethodRun(
        name=name, model_name=describer.model_name, fingerprint=describer.fingerprint, dim=int(describer.dim),
        map_positions=keyframe_positions, query_stamps=np.asarray(stamps, dtype=np.int64),
        query_positions=query_positions, ranked_ids=ranked_ids, ranked_scores=ranked_scores,
        latencies_ms=np.asarray(latencies), metrics=evaluate_loop_closures(ranked_ids, ranked_scores, within, ns),
        within=within, calibrated=getattr(describer, "calibration", None) is not None,
    )


# ----- report --------------------------------------------------------------------------------------


def _percent(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{100.0 * value:.1f}"


def results_table_markdown(runs: Sequence[MethodRun], title: str) -> str:
    """The Markdown table: one row per method, recall@N, AP, max recall at 100 % precision, latency."""
    ns = list(runs[0].metrics.recall_at)
    header = (["method", "model"] + [f"R@{n} %" for n in ns]
              + ["AP %", "max R @ P=100 % ", "at score >=", f"P / R % at score >= {DEFAULT_MIN_SCORE:g}",
                 "median ms/query", "keyframes", "dim"])
    lines = [f"## {title}", "", "| " + " | ".join(header) + " |",
             "|---|---|" + "---:|" * (len(header) - 2)]
    for run in runs:
        m = run.metrics
        threshold = "-" if math.isnan(m.full_precision_threshold) else f"{m.full_precision_threshold:.3f}"
        precision, recall = run.at_score(DEFAULT_MIN_SCORE)
        at_default = (f"{_percent(precision)} / {_percent(recall)}" if run.calibrated else "(uncalibrated)")
        cells = ([run.name, run.model_name] + [_percent(m.recall_at[n]) for n in ns]
                 + [_percent(m.average_precision), _percent(m.max_recall_at_full_precision), threshold, at_default,
                    f"{run.median_latency_ms:.1f}", str(len(run.map_positions)), str(run.dim)])
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("R@N: share of queries with a true loop whose N best candidates include a keyframe within the "
                 "radius. AP and max R @ P=100 %: precision-recall of the top-1 candidate's score (see "
                 f"tscm_ros/loop_evaluation.py). P / R at score >= {DEFAULT_MIN_SCORE:g}: precision and recall of the "
                 "top-1 candidates the node publishes with its default min_score, for models whose checkpoint "
                 "carries a score calibration (tscm_ros/calibration.py). Latency: one query, describe + search (+ the row's stages), "
                 "this machine.")
    return "\n".join(lines) + "\n"


def _plot_pr_curves(runs: Sequence[MethodRun], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6.5, 4.5))
    for run in runs:
        curve = run.metrics.curve
        recall = np.concatenate([[0.0], curve.recall])
        precision = np.concatenate([[1.0], curve.precision])
        line, = axes.step(100 * recall, 100 * precision, where="post",
                          label=f"{run.name} (AP {_percent(run.metrics.average_precision)} %)")
        best = run.metrics.max_recall_at_full_precision
        if not math.isnan(best) and best > 0:
            axes.plot([100 * best], [100.0], marker="*", markersize=12, color=line.get_color())
    axes.set_xlabel("recall (% of queries with a true loop)")
    axes.set_ylabel("precision of the top-1 candidate (%)")
    axes.set_xlim(0, 100)
    axes.set_ylim(0, 102)
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small", loc="lower left")
    axes.set_title("Top-1 precision-recall (star: max recall at 100 % precision)\n"
                   + textwrap.fill(title, 100), fontsize="x-small")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _plot_trajectories(runs: Sequence[MethodRun], path: Path, radius_m: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(2, len(runs))
    rows = math.ceil(len(runs) / columns)
    figure, axes_grid = plt.subplots(rows, columns, figsize=(6 * columns, 5 * rows), squeeze=False)
    for axes, run in zip(axes_grid.flat, runs):
        axes.plot(run.map_positions[:, 0], run.map_positions[:, 1], ".", color="0.6", markersize=4,
                  label="map keyframes (reference)")
        axes.plot(run.query_positions[:, 0], run.query_positions[:, 1], "-", color="tab:blue", linewidth=0.8,
                  label="query trajectory")
        for good, colour, label in ((True, "tab:green", "top-1 within radius"), (False, "tab:red", "top-1 wrong")):
            segments = [(run.query_positions[q, :2], run.map_positions[ids[0], :2])
                        for q, ids in enumerate(run.ranked_ids)
                        if len(ids) and bool(run.within[q, ids[0]]) == good]
            for i, (start, end) in enumerate(segments):
                axes.plot([start[0], end[0]], [start[1], end[1]], "-", color=colour, linewidth=1.0, alpha=0.7,
                          label=label if i == 0 else None)
        no_loop = ~run.within.any(axis=1) if run.within.size else np.ones(len(run.query_positions), dtype=bool)
        if no_loop.any():
            axes.plot(run.query_positions[no_loop, 0], run.query_positions[no_loop, 1], "x", color="black",
                      markersize=5, label=f"query with no keyframe within {radius_m:g} m")
        axes.set_aspect("equal", adjustable="datalim")
        axes.set_xlabel("x (m)")
        axes.set_ylabel("y (m)")
        axes.set_title(f"{run.name}: R@1 {_percent(run.metrics.recall_at[min(run.metrics.recall_at)])} %",
                       fontsize="small")
        axes.grid(alpha=0.3)
        axes.legend(fontsize="x-small", loc="best")
    for axes in list(axes_grid.flat)[len(runs):]:
        axes.set_visible(False)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_") or "method"


def _write_queries_csv(run: MethodRun, path: Path) -> None:
    with path.open("w", newline="", encoding="utf-8") as stream:
        writer = csv.writer(stream)
        writer.writerow(["stamp_ns", "x", "y", "z", "has_true_loop", "top1_keyframe_id", "top1_score",
                         "top1_correct", "first_correct_rank", "latency_ms"])
        for q, (ids, scores) in enumerate(zip(run.ranked_ids, run.ranked_scores)):
            correct = run.within[q, ids] if len(ids) else np.zeros(0, dtype=bool)
            first = int(np.argmax(correct)) + 1 if correct.any() else ""
            writer.writerow([int(run.query_stamps[q]), *(f"{v:.3f}" for v in run.query_positions[q]),
                             int(run.within[q].any()), int(ids[0]) if len(ids) else "",
                             f"{scores[0]:.6f}" if len(scores) else "", int(bool(correct[:1].any())), first,
                             f"{run.latencies_ms[q]:.3f}"])


def _nan_to_none(value: float) -> float | None:
    return None if math.isnan(value) else float(value)


def write_report(runs: Sequence[MethodRun], title: str, out: Path, radius_m: float, overwrite: bool,
                 settings: dict) -> None:
    """Write loop_closure.md/.json, pr_curve.png, trajectories.png and queries_<method>.csv into ``out``
    atomically (a temp dir next to it, renamed into place)."""
    if out.exists() and not overwrite:
        raise ConfigError(f"output {out} already exists (choose another path or pass --overwrite)")
    with atomic_directory(out) as staging:
        (staging / "loop_closure.md").write_text(results_table_markdown(runs, title), encoding="utf-8")
        _plot_pr_curves(runs, staging / "pr_curve.png", title)
        _plot_trajectories(runs, staging / "trajectories.png", radius_m)
        summary = {"title": title, "settings": settings, "methods": []}
        for run in runs:
            m = run.metrics
            _write_queries_csv(run, staging / f"queries_{_slug(run.name)}.csv")
            summary["methods"].append({
                "name": run.name, "model_name": run.model_name, "fingerprint": run.fingerprint, "dim": run.dim,
                "keyframes": len(run.map_positions), "queries": m.num_queries,
                "queries_with_true_loop": m.num_with_loop, "queries_without_candidates": m.num_without_candidates,
                "recall_at": {str(n): _nan_to_none(r) for n, r in m.recall_at.items()},
                "average_precision": _nan_to_none(m.average_precision),
                "max_recall_at_full_precision": _nan_to_none(m.max_recall_at_full_precision),
                "full_precision_threshold": _nan_to_none(m.full_precision_threshold),
                "calibrated": run.calibrated,
                "at_default_min_score": dict(zip(("min_score", "precision", "recall"),
                                                 (DEFAULT_MIN_SCORE, *map(_nan_to_none, run.at_score(DEFAULT_MIN_SCORE))))),
                "latency_ms": {"median": _nan_to_none(run.median_latency_ms),
                               "p95": _nan_to_none(float(np.percentile(run.latencies_ms, 95)))},
                "pr_curve": {"threshold": m.curve.thresholds.tolist(), "precision": m.curve.precision.tolist(),
                             "recall": [_nan_to_none(r) for r in m.curve.recall]},
                "queries_csv": f"queries_{_slug(run.name)}.csv",
            })
        (staging / "loop_closure.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")


# ----- command line (evaluate --bag) ---------------------------------------------------------------

BASELINES = ("gem", "student", "bow")
BASELINE_NAMES = {"gem": "GeM baseline (pretrained, no training)", "student": "default model (shipped student)",
                  "bow": "ORB bag of words"}


def add_bag_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options only bag mode has. It also reads ``--bag`` (reference traversal), ``--model``
    (repeatable NAME=CKPT or CKPT; may be absent), ``--out``, ``--radius-m`` (None = 10 m), ``--ns``,
    ``--device``, ``--batch-size`` and ``--overwrite``, which ``tscm_ros.cli.evaluate`` defines."""
    group = parser.add_argument_group("loop-closure evaluation on bags (--bag)")
    group.add_argument("--query-bag", metavar="DIR",
                       help="with --bag: the traversal whose frames are the queries (revisits the --bag route)")
    add_frame_reader_arguments(group)
    group.add_argument("--keyframe-distance", type=float, default=2.0, metavar="M",
                       help="map keyframe every M metres of travel on the reference, as build_map (default 2.0)")
    group.add_argument("--baselines", default=",".join(BASELINES), metavar="LIST",
                       help="comma-separated built-in methods to include: gem (pretrained backbone + GeM), "
                       "student (the default model: the shipped pretrained student), bow (ORB bag of words); 'none' for none "
                       f"(default {','.join(BASELINES)})")
    group.add_argument("--bow-words", type=int, default=1000, metavar="K",
                       help="ORB vocabulary size, trained on the reference keyframes (default 1000)")
    group.add_argument("--stages", choices=("all", "none"), default="all",
                       help="all: also run each descriptor method with geometric verification, and with verification "
                       "and temporal consistency (the node's defaults); none: global retrieval only (default all)")
    group.add_argument("--intrinsics", metavar="FX,FY,CX,CY", type=lambda text: text.split(","),
                       help="camera intrinsics in pixels: verification fits the essential matrix (and the relative "
                       "pose) instead of the fundamental matrix")


@dataclass(frozen=True)
class MethodSpec:
    """A method to evaluate: a row name and how to build its detector."""

    name: str
    kind: str  # "describer" or "bow"
    build_describer: Callable[[], object] | None = None


def method_specs(args: argparse.Namespace) -> list[MethodSpec]:
    """The methods of this run: the chosen built-in baselines, then each --model checkpoint, BoW last."""
    from tscm_ros import describe

    chosen = [] if args.baselines.strip() == "none" else [b.strip() for b in args.baselines.split(",") if b.strip()]
    unknown = sorted(set(chosen) - set(BASELINES))
    if unknown:
        raise ConfigError(f"--baselines: unknown {', '.join(unknown)} (choose from {', '.join(BASELINES)} or none)")
    device, batch_size = args.device, args.batch_size
    factories = {"gem": lambda: describe.pretrained_baseline(device=device, batch_size=batch_size),
                     "student": lambda: describe.default_student(device=device, batch_size=batch_size)}
    specs = [MethodSpec(BASELINE_NAMES[b], "describer", factories[b]) for b in ("gem", "student") if b in chosen]
    for entry in args.model or []:
        name, _, path = entry.rpartition("=")
        if not path:
            raise ConfigError(f"--model {entry!r}: expected NAME=CKPT or CKPT")
        # The same special names as evaluate --data: 'pretrained' (GeM baseline), 'default' (default student).
        if path == "pretrained":
            specs.append(MethodSpec(name or BASELINE_NAMES["gem"], "describer", factories["gem"]))
        elif path == "default":
            specs.append(MethodSpec(name or BASELINE_NAMES["student"], "describer", factories["student"]))
        else:
            specs.append(MethodSpec(name or Path(path).parent.name or Path(path).stem, "describer",
                                    lambda c=path: describe.Describer.from_checkpoint(c, device=device,
                                                                                      batch_size=batch_size)))
    if "bow" in chosen:
        specs.append(MethodSpec(BASELINE_NAMES["bow"], "bow"))
    if not specs:
        raise ConfigError("nothing to evaluate: give --model NAME=CKPT or keep some --baselines")
    names = [spec.name for spec in specs]
    if len(set(names)) != len(names):
        raise ConfigError(f"method names must be unique, got {names}")
    return specs


STAGES = [  # row suffix, verification, temporal consistency
    ("", None, None),
    (" + temporal", None, TemporalConfig()),
    (" + verification", VerificationConfig(), None),
    (" + verification + temporal", VerificationConfig(), TemporalConfig()),
]


def run_bag_evaluation(args: argparse.Namespace) -> int:
    """``evaluate --bag``: every method on the same traversals; writes the report and prints the table."""
    from tscm_ros.loop_detector import LoopDetector, MatchingConfig

    radius_m = DEFAULT_RADIUS_M if getattr(args, "radius_m", None) is None else float(args.radius_m)
    ns = sorted({int(n) for n in args.ns})
    if not args.query_bag:
        raise ConfigError("--bag needs --query-bag: the traversal to query against the --bag map")
    if radius_m <= 0 or not ns or ns[0] < 1 or args.batch_size < 1:
        raise ConfigError("--radius-m, --ns and --batch-size must be positive")
    if args.keyframe_distance < 0 or args.bow_words < 2:
        raise ConfigError("--keyframe-distance must be >= 0 and --bow-words >= 2")
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise ConfigError(f"output {out} already exists (choose another path or pass --overwrite)")
    for path in (args.bag, args.query_bag):
        if not Path(path).exists():
            raise BagError(f"bag {path} does not exist")
    specs = method_specs(args)
    intrinsics = CameraIntrinsics.from_values(args.intrinsics or [])
    stages = STAGES if args.stages == "all" else STAGES[:1]
    reference = BagSource(args.bag, args.image_topic, args.pose_topic, args.max_pose_gap)
    queries = BagSource(args.query_bag, args.image_topic, args.pose_topic, args.max_pose_gap)
    # Offline evaluation of two traversals: every keyframe is a valid answer, nothing is excluded.
    matching = MatchingConfig(k=max(ns), min_score=0.0, exclude_recent_s=0.0, exclude_within_m=0.0)

    runs = []
    for spec in specs:
        started = time.perf_counter()
        if spec.kind == "bow":
            detectors = [(spec.name, build_bow_detector(reference, args.keyframe_distance, matching, args.bow_words))]
        else:
            describer = spec.build_describer()
            keyframe_map = build_descriptor_map(describer, reference, args.keyframe_distance)
            # The stage rows keep the node's k (5): its latency and what it publishes.
            staged = replace(matching, k=min(matching.k, MatchingConfig().k))
            detectors = [(spec.name + suffix, LoopDetector(describer, keyframe_map, staged if suffix else matching,
                                                           source=reference.path, verification=verification,
                                                           temporal=temporal, intrinsics=intrinsics))
                         for suffix, verification, temporal in stages]
        mapped = time.perf_counter()
        for name, detector in detectors:
            run = run_queries(name, detector, queries, radius_m, ns)
            runs.append(run)
            print(f"evaluate: {name}: map of {len(run.map_positions)} keyframes in {mapped - started:.1f} s, "
                  f"{run.metrics.num_queries} queries in {time.perf_counter() - mapped:.1f} s, "
                  f"R@{ns[0]} {_percent(run.metrics.recall_at[ns[0]])} %, "
                  f"max R @ P=100 % {_percent(run.metrics.max_recall_at_full_precision)} %, "
                  f"median {run.median_latency_ms:.1f} ms/query", flush=True)
            mapped = time.perf_counter()

    first = runs[0].metrics
    title = (f"Loop closure: {first.num_queries} queries from {Path(args.query_bag).name} "
             f"({first.num_with_loop} with a true loop) against {Path(args.bag).name}, "
             f"keyframes every {args.keyframe_distance:g} m, correct within {radius_m:g} m")
    settings = {"reference_bag": str(args.bag), "query_bag": str(args.query_bag), "radius_m": radius_m,
                "ns": ns, "keyframe_distance_m": args.keyframe_distance, "bow_words": args.bow_words,
                "stages": args.stages, "intrinsics": None if intrinsics is None else list(vars(intrinsics).values()),
                "device": args.device}
    write_report(runs, title, out, radius_m, args.overwrite, settings)
    print(results_table_markdown(runs, title), end="")
    print(f"wrote {out / 'loop_closure.md'}, {out / 'pr_curve.png'}, {out / 'trajectories.png'} "
          f"(per-query CSVs and loop_closure.json alongside)")
    return 0
