"""Odometry and loop closures in one incremental pose graph (GTSAM iSAM2).

The robot's odometry is a chain of pose nodes, one per ``node_spacing_m`` of travel (or ``node_spacing_rad``
of turn), joined by between-factors whose noise grows with the distance travelled. A published loop
candidate says that the query image was taken where the map's keyframe was: a factor pulling the query's
position (the node before the query's stamp, plus the odometry from that node to the stamp) onto the
keyframe's position in the map, with ``loop_sigma_m`` of noise (the two views are some metres apart). The
keyframe positions are fixed: the map is the reference.

False loops are met twice:
- A loop enters the graph only with support: another loop, within ``support_window_m`` of travel and taken
  at least ``node_spacing_m`` from it, whose keyframe, another one, lies as far from its own as the odometry
  says the two images were (within ``loop_sigma_m``). A lone false loop, which the odometry's drift alone could not
  refute, never enters, nor do repeated matches to one wrong keyframe; a true revisit gives loops in a row
  that agree.
- A robust kernel on the loops down-weights one that disagrees with the others and the odometry. Huber by
  default: of those bench/pose_graph.py compares, the one that corrected the drift in every case up to 0.5
  degrees per metre of heading drift and 30 % false loops.

Frames: the odometry is assumed to start in the map's frame (the robot starts its session where the map's
recording started, or its odometry is expressed in the map frame); the first node gets a prior there
(``prior_sigma_m``). Loop candidates whose map frame is not the odometry frame are the caller's to refuse.

Memory and time grow with the path travelled, not with time: standing still adds no node. Each new node or
loop is one iSAM2 update.
"""

from __future__ import annotations

import bisect
import math
from collections import Counter
from dataclasses import dataclass, fields

import gtsam
import numpy as np
from gtsam.symbol_shorthand import X

from tscm_ros.errors import ConfigError
from tscm_ros.io.geometry import Pose, pose_is_finite

KERNELS = ("huber", "cauchy", "dcs", "none")
POSE_HISTORY = 4096  # odometry poses kept to place loops between nodes (about 7 minutes at 10 Hz)
MAX_PENDING = 256  # loops waiting for the odometry to reach their stamp
MAX_RECENT = 64  # loops kept to support later ones
MAX_COORDINATE_M = 1e6  # odometry beyond this, or jumping more than MAX_STEP_M between messages, is refused
MAX_STEP_M = 1e3


@dataclass(frozen=True)
class PoseGraphConfig:
    """How odometry and loops become factors; see the module doc."""

    node_spacing_m: float = 1.0
    node_spacing_rad: float = 0.35
    odometry_sigma_per_m: float = 0.05  # translation noise of the odometry, per metre travelled
    odometry_rot_sigma_per_m: float = 0.01  # rotation noise of the odometry, radians per metre travelled
    loop_sigma_m: float = 3.0
    support_window_m: float = 20.0
    kernel: str = "huber"
    kernel_width: float = 1.0  # in sigmas
    prior_sigma_m: float = 0.1

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            if field.name == "kernel":
                if value not in KERNELS:
                    raise ConfigError(f"pose graph kernel must be one of {', '.join(KERNELS)}, got {value!r}")
            elif not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ConfigError(f"pose graph {field.name} must be a finite number > 0, got {value}")


def to_pose3(pose: Pose) -> gtsam.Pose3:
    """The gtsam Pose3 of a ``Pose``."""
    x, y, z, w = (float(v) for v in pose.orientation)
    return gtsam.Pose3(gtsam.Rot3.Quaternion(w, x, y, z), np.asarray(pose.position, dtype=np.float64))


def to_pose(pose3: gtsam.Pose3) -> Pose:
    """The package's ``Pose`` (position, x y z w quaternion) of a gtsam Pose3."""
    w, x, y, z = pose3.rotation().toQuaternion().coeffs()[[3, 0, 1, 2]]
    return Pose(np.asarray(pose3.translation(), dtype=np.float64), np.array([x, y, z, w], dtype=np.float64))


def finite_pose(pose: Pose) -> bool:
    """Whether a pose has a finite position and a finite, non-zero orientation."""
    return pose_is_finite(pose) and bool(np.linalg.norm(pose.orientation) > 1e-6)


def _loop_noise(config: PoseGraphConfig):
    gaussian = gtsam.noiseModel.Isotropic.Sigma(3, config.loop_sigma_m)
    estimators = {"cauchy": gtsam.noiseModel.mEstimator.Cauchy, "huber": gtsam.noiseModel.mEstimator.Huber,
                  "dcs": gtsam.noiseModel.mEstimator.DCS}
    if config.kernel == "none":
        return gaussian
    return gtsam.noiseModel.Robust.Create(estimators[config.kernel].Create(config.kernel_width), gaussian)


@dataclass(eq=False)  # one loop is itself only (its fields hold arrays)
class _Loop:
    """A loop placed on the graph: the node before its image, the odometry from that node to the image, where
    the odometry put the image, the keyframe's position, and whether it is in the graph yet."""

    node: int
    lever_arm: np.ndarray
    odometry_position: np.ndarray
    position: np.ndarray
    in_graph: bool = False


class PoseGraph:
    """The back-end: ``add_odometry`` as poses arrive, ``add_loop`` per published candidate; ``corrected``,
    ``correct``, ``map_to_odom`` and ``path`` read the optimised trajectory. Bad input is counted in ``skipped``, never
    raised."""

    def __init__(self, config: PoseGraphConfig | None = None) -> None:
        self.config = config or PoseGraphConfig()
        params = gtsam.ISAM2Params()
        params.setRelinearizeThreshold(0.01)
        params.relinearizeSkip = 1
        params.setFactorization("QR")  # Cholesky found a 800-node odometry chain "indeterminate"; QR solves it
        self._isam = gtsam.ISAM2(params)
        self._loop_noise = _loop_noise(self.config)
        self._node_stamps: list[int] = []
        self._node_odometry: list[gtsam.Pose3] = []  # the odometry pose of each node
        self._latest: gtsam.Pose3 | None = None  # the estimate of the newest node
        self._odometry_stamps: list[int] = []
        self._odometry: list[gtsam.Pose3] = []
        self._pending: list[tuple[int, np.ndarray]] = []
        self._recent: list[_Loop] = []  # loops within support_window_m, in the graph or waiting for support
        self.loops = 0
        self.skipped: Counter[str] = Counter()

    def __len__(self) -> int:
        return len(self._node_stamps)

    @property
    def newest_odometry_ns(self) -> int | None:
        """The stamp of the newest odometry taken (None before any)."""
        return self._odometry_stamps[-1] if self._odometry_stamps else None

    # ----- input -----------------------------------------------------------------------------------------

    def add_odometry(self, stamp_ns: int, pose: Pose) -> bool:
        """One odometry pose (in time order); whether it became a node. Non-finite or out-of-order poses are
        skipped and counted."""
        if not finite_pose(pose):
            self.skipped["non-finite odometry"] += 1
            return False
        if self._odometry_stamps and stamp_ns <= self._odometry_stamps[-1]:
            self.skipped["odometry out of order"] += 1
            return False
        if np.abs(pose.position).max() > MAX_COORDINATE_M or (
                self._odometry and np.linalg.norm(pose.position - self._odometry[-1].translation()) > MAX_STEP_M):
            self.skipped["odometry jump"] += 1
            return False
        odometry = to_pose3(pose)
        self._odometry_stamps.append(stamp_ns)
        self._odometry.append(odometry)
        if len(self._odometry_stamps) > 2 * POSE_HISTORY:
            del self._odometry_stamps[:-POSE_HISTORY]
            del self._odometry[:-POSE_HISTORY]
        added = self._maybe_add_node(stamp_ns, odometry)
        self._add_pending()
        return added

    def add_loop(self, stamp_ns: int, keyframe_position) -> str:
        """A published loop: the image at ``stamp_ns`` was taken at ``keyframe_position`` (map frame). Returns
        'added' (with the loops it confirmed), 'waiting for support' (until another loop within support_window_m
        of travel agrees with it), 'pending' (the odometry has not reached the stamp yet) or why it was skipped
        ('non-finite keyframe position', 'before the first odometry', 'older than the odometry kept', 'too many
        pending loops')."""
        position = np.asarray(keyframe_position, dtype=np.float64).reshape(-1)
        if position.shape != (3,) or not np.isfinite(position).all():
            return self._skip("non-finite keyframe position")
        if not self._odometry_stamps or stamp_ns > self._odometry_stamps[-1]:
            if len(self._pending) >= MAX_PENDING:
                return self._skip("too many pending loops")
            self._pending.append((stamp_ns, position))
            return "pending"
        return self._add_loop_now(stamp_ns, position)

    # ----- output ----------------------------------------------------------------------------------------

    def corrected(self) -> Pose | None:
        """The corrected pose at the newest odometry; None before the first node."""
        if self._latest is None:
            return None
        return to_pose(self._latest.compose(self._node_odometry[-1].between(self._odometry[-1])))

    def correct(self, stamps_ns, odometry: list[Pose]) -> np.ndarray:
        """(N, 3) corrected positions of odometry poses taken at ``stamps_ns`` (after the first node): each moved
        with the node before it. NaN rows before the first node."""
        estimate = self._isam.calculateEstimate() if len(self) else None
        positions = np.full((len(odometry), 3), np.nan)
        for row, (stamp_ns, pose) in enumerate(zip(stamps_ns, odometry)):
            node = bisect.bisect_right(self._node_stamps, int(stamp_ns)) - 1
            if node >= 0 and finite_pose(pose):
                moved = estimate.atPose3(X(node)).compose(self._node_odometry[node].between(to_pose3(pose)))
                positions[row] = moved.translation()
        return positions

    def map_to_odom(self) -> Pose | None:
        """The transform taking odometry-frame poses to the corrected map frame (identity until a loop moves the
        path); None before the first node."""
        if self._latest is None:
            return None
        return to_pose(self._latest.compose(self._node_odometry[-1].inverse()))

    def path(self) -> tuple[np.ndarray, list[Pose]]:
        """Every node's stamp and corrected pose, oldest first."""
        estimate = self._isam.calculateEstimate()
        return (np.asarray(self._node_stamps, dtype=np.int64),
                [to_pose(estimate.atPose3(X(i))) for i in range(len(self))])

    # ----- inside ----------------------------------------------------------------------------------------

    def _skip(self, reason: str) -> str:
        self.skipped[reason] += 1
        return reason

    def _maybe_add_node(self, stamp_ns: int, odometry: gtsam.Pose3) -> bool:
        config, factors, values = self.config, gtsam.NonlinearFactorGraph(), gtsam.Values()
        key = X(len(self))
        if self._latest is None:
            prior = gtsam.noiseModel.Diagonal.Sigmas(np.array([0.01] * 3 + [config.prior_sigma_m] * 3))
            factors.add(gtsam.PriorFactorPose3(key, odometry, prior))
            initial = odometry
        else:
            step = self._node_odometry[-1].between(odometry)
            travelled = float(np.linalg.norm(step.translation()))
            turned = float(np.linalg.norm(gtsam.Rot3.Logmap(step.rotation())))
            if travelled < config.node_spacing_m and turned < config.node_spacing_rad:
                return False
            length = max(travelled, 0.1 * config.node_spacing_m)
            sigmas = np.array([config.odometry_rot_sigma_per_m * length] * 3
                              + [config.odometry_sigma_per_m * length] * 3)
            factors.add(gtsam.BetweenFactorPose3(X(len(self) - 1), key, step,
                                                 gtsam.noiseModel.Diagonal.Sigmas(sigmas)))
            initial = self._latest.compose(step)
        values.insert(key, initial)
        self._update(factors, values, key)
        self._node_stamps.append(stamp_ns)
        self._node_odometry.append(odometry)
        return True

    def _odometry_at(self, stamp_ns: int) -> gtsam.Pose3 | None:
        i = bisect.bisect_left(self._odometry_stamps, stamp_ns)
        if i < len(self._odometry_stamps) and self._odometry_stamps[i] == stamp_ns:
            return self._odometry[i]
        if i == 0 or i == len(self._odometry_stamps):
            return None
        t0, t1 = self._odometry_stamps[i - 1], self._odometry_stamps[i]
        t = (stamp_ns - t0) / (t1 - t0)
        before, after = self._odometry[i - 1], self._odometry[i]
        return gtsam.Pose3(before.rotation().slerp(t, after.rotation()),
                           (1 - t) * np.asarray(before.translation()) + t * np.asarray(after.translation()))

    def _add_loop_now(self, stamp_ns: int, position: np.ndarray) -> str:
        node = bisect.bisect_right(self._node_stamps, stamp_ns) - 1
        if node < 0:
            return self._skip("before the first odometry")
        odometry = self._odometry_at(stamp_ns)
        if odometry is None:
            return self._skip("older than the odometry kept")
        lever_arm = np.asarray(self._node_odometry[node].between(odometry).translation(), dtype=np.float64)
        loop = _Loop(node, lever_arm, np.asarray(odometry.translation(), dtype=np.float64), position)
        if any(old.node == node and np.array_equal(old.position, position) for old in self._recent):
            return self._skip("the same loop again")  # standing still: one loop per node and keyframe
        horizon = node - self.config.support_window_m / self.config.node_spacing_m
        kept = [old for old in self._recent if old.node >= horizon][-MAX_RECENT:]
        dropped = sum(not old.in_graph for old in self._recent if old not in kept)
        if dropped:
            self.skipped["loop without support"] += dropped
        self._recent = kept
        supported = [old for old in self._recent if self._agree(old, loop)]
        self._recent.append(loop)
        if not supported:
            return "waiting for support"
        factors = gtsam.NonlinearFactorGraph()
        for confirmed in [*supported, loop]:
            if not confirmed.in_graph:
                factors.add(gtsam.GPSFactorArm(X(confirmed.node), confirmed.position, confirmed.lever_arm,
                                               self._loop_noise))
                confirmed.in_graph = True
                self.loops += 1
        self._update(factors, gtsam.Values())
        self._isam.update()  # one more relinearisation: a loop moves the path far from where it was linearised
        self._latest = self._isam.calculateEstimatePose3(X(len(self) - 1))
        return "added"

    def _agree(self, first: _Loop, second: _Loop) -> bool:
        """Whether two loops support each other: taken at least ``node_spacing_m`` apart, at keyframes at least
        that far apart (repeated matches to one wrong keyframe do not support each other), which lie as far
        apart as the odometry says the images were, within ``loop_sigma_m``."""
        travelled = float(np.linalg.norm(second.odometry_position - first.odometry_position))
        apart = float(np.linalg.norm(second.position - first.position))
        spacing = self.config.node_spacing_m
        return travelled >= spacing and apart >= spacing and abs(apart - travelled) <= self.config.loop_sigma_m

    def _add_pending(self) -> None:
        newest = self._odometry_stamps[-1]
        ready = [loop for loop in self._pending if loop[0] <= newest]
        if ready:
            self._pending = [loop for loop in self._pending if loop[0] > newest]
            for stamp_ns, position in ready:
                self._add_loop_now(stamp_ns, position)

    def _update(self, factors: gtsam.NonlinearFactorGraph, values: gtsam.Values, newest=None) -> None:
        self._isam.update(factors, values)
        self._latest = self._isam.calculateEstimatePose3(X(len(self) - 1) if newest is None else newest)
