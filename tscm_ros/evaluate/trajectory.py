"""What the loops do for a trajectory: the query run's odometry, drifted on purpose where the recording's
poses are perfect (renders), closed by the pose-graph back-end (tscm_ros/graph/pose_graph.py) with the loops a
method published, and measured as the absolute trajectory error.

ATE is evo's APE on translation after an SE(3) alignment (Umeyama, no scale) of the estimate to the ground
truth: the RMSE of the aligned positions' errors, in metres.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from tscm_ros.errors import ConfigError
from tscm_ros.io.geometry import Pose


@dataclass(frozen=True)
class OdometryDrift:
    """Seeded drift of a ground-truth trajectory, per metre travelled: a heading bias (degrees per metre), heading
    noise (degrees per square-root metre) and position noise (a fraction of each step, per axis)."""

    heading_bias_deg_per_m: float = 0.3
    heading_noise_deg_per_sqrt_m: float = 0.1
    position_noise: float = 0.02
    seed: int = 0

    def __post_init__(self) -> None:
        values = (self.heading_bias_deg_per_m, self.heading_noise_deg_per_sqrt_m, self.position_noise)
        if not all(math.isfinite(v) for v in values) or min(values[1:]) < 0:
            raise ConfigError(f"odometry drift needs a finite heading bias and finite noises >= 0, got {values}")

    def apply(self, truth: Sequence[Pose]) -> list[Pose]:
        """Odometry that starts at ``truth[0]`` and integrates the true steps with the drift (yaw about z). A
        pose without a finite value stays so (NaN), and the odometry goes on from the next finite one with the
        step across the gap."""
        import gtsam

        from tscm_ros.graph.pose_graph import finite_pose, to_pose, to_pose3

        rng = np.random.default_rng(self.seed)
        nan = Pose(np.full(3, np.nan), np.full(4, np.nan))
        previous = current = None
        drifted = []
        for pose in truth:
            if not finite_pose(pose):
                drifted.append(nan)
                continue
            true = to_pose3(pose)
            if previous is None:
                current = true
            else:
                step = previous.between(true)
                length = float(np.linalg.norm(step.translation()))
                turn = math.radians(self.heading_bias_deg_per_m * length + self.heading_noise_deg_per_sqrt_m
                                    * math.sqrt(length) * rng.standard_normal())
                moved = np.asarray(step.translation()) + self.position_noise * length * rng.standard_normal(3)
                current = current.compose(gtsam.Pose3(step.rotation().compose(gtsam.Rot3.Rz(turn)), moved))
            previous = true
            drifted.append(to_pose(current))
        return drifted


def align_rigid(estimate: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """``estimate`` (N, 3) moved by the rotation and translation that best fit it to ``truth`` (Umeyama)."""
    mean_e, mean_t = estimate.mean(axis=0), truth.mean(axis=0)
    covariance = (truth - mean_t).T @ (estimate - mean_e) / len(estimate)
    u, _, vt = np.linalg.svd(covariance)
    sign = np.eye(3)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        sign[2, 2] = -1.0
    rotation = u @ sign @ vt
    return (estimate - mean_e) @ rotation.T + mean_t


def ate_rmse(estimate: np.ndarray, truth: np.ndarray) -> float:
    """Absolute trajectory error (metres, RMSE) of ``estimate`` against ``truth`` after rigid alignment, over the
    rows where both are finite; NaN with fewer than 3 such rows."""
    estimate, truth = np.asarray(estimate, dtype=np.float64), np.asarray(truth, dtype=np.float64)
    rows = np.isfinite(estimate).all(axis=1) & np.isfinite(truth).all(axis=1)
    if rows.sum() < 3:
        return math.nan
    aligned = align_rigid(estimate[rows], truth[rows])
    return float(np.sqrt(np.mean(np.sum((aligned - truth[rows]) ** 2, axis=1))))


def close_loops(stamps_ns: np.ndarray, odometry: Sequence[Pose], loops: Sequence[np.ndarray],
                keyframe_positions: np.ndarray, config=None):
    """The query run replayed through the back-end as the online node feeds it: per query its odometry, then a
    loop per published keyframe id in ``loops``. Returns (the corrected positions at the query stamps, the
    graph)."""
    from tscm_ros.graph.pose_graph import PoseGraph

    graph = PoseGraph(config)
    for stamp_ns, pose, ids in zip(stamps_ns, odometry, loops):
        graph.add_odometry(int(stamp_ns), pose)
        for keyframe_id in ids:
            graph.add_loop(int(stamp_ns), keyframe_positions[int(keyframe_id)])
    return graph.correct(stamps_ns, list(odometry)), graph


def inject_false_loops(loops: Sequence[np.ndarray], keyframe_positions: np.ndarray, share: float,
                       min_distance_m: float, seed: int = 0) -> tuple[list[np.ndarray], int]:
    """``loops`` with a ``share`` of the published candidates (drawn with ``seed``) moved to a random keyframe at
    least ``min_distance_m`` from the one published; (the loops, how many were moved)."""
    rng = np.random.default_rng(seed)
    positions = np.asarray(keyframe_positions, dtype=np.float64)
    moved, result = 0, []
    for ids in loops:
        ids = np.array(ids, dtype=np.int64)
        for i, keyframe_id in enumerate(ids):
            if rng.random() >= share:
                continue
            far = np.flatnonzero(np.linalg.norm(positions - positions[keyframe_id], axis=1) >= min_distance_m)
            if len(far):
                ids[i] = rng.choice(far)
                moved += 1
        result.append(ids)
    return result, moved


@dataclass
class TrajectoryFigures:
    """One method's trajectory errors (metres, ATE RMSE): odometry only, with the loops it published at the
    node's defaults, and with a share of them made false."""

    name: str
    loops: int
    loops_used: int
    ate_odometry: float
    ate_loops: float
    ate_false_loops: float
    false_loops: int
    corrected: np.ndarray  # (N, 3) corrected positions with its loops


def trajectory_figures(name: str, stamps_ns: np.ndarray, truth: np.ndarray, odometry: Sequence[Pose],
                       loops: Sequence[np.ndarray], keyframe_positions: np.ndarray, false_share: float,
                       false_min_distance_m: float, config=None, seed: int = 0) -> TrajectoryFigures:
    """ATE of ``odometry`` against ``truth`` (N, 3) alone, closed with ``loops``, and with ``false_share`` of them
    moved to keyframes at least ``false_min_distance_m`` away."""
    corrected, graph = close_loops(stamps_ns, odometry, loops, keyframe_positions, config)
    false, moved = inject_false_loops(loops, keyframe_positions, false_share, false_min_distance_m, seed)
    with_false, _ = close_loops(stamps_ns, odometry, false, keyframe_positions, config)
    drifted = np.array([pose.position for pose in odometry], dtype=np.float64).reshape(-1, 3)
    return TrajectoryFigures(name=name, loops=int(sum(len(ids) for ids in loops)), loops_used=graph.loops,
                             ate_odometry=ate_rmse(drifted, truth), ate_loops=ate_rmse(corrected, truth),
                             ate_false_loops=ate_rmse(with_false, truth), false_loops=moved, corrected=corrected)
