"""Poses and their maths: the Pose value, stamps, pose messages, quaternion slerp and yaw, interpolation of a
pose stream at any stamp, and GNSS fixes in a local metric frame. Shared by the bag reader, the map and the
live node; imports no ROS or bag library."""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

import numpy as np

WGS84_A = 6_378_137.0  # semi-major axis, metres
WGS84_E2 = 6.694_379_990_14e-3  # first eccentricity squared
IDENTITY_QUATERNION = np.array([0.0, 0.0, 0.0, 1.0])


@dataclass
class Pose:
    """Position (3,) in metres and orientation quaternion (4,) as x, y, z, w."""

    position: np.ndarray
    orientation: np.ndarray


def stamp_to_ns(stamp) -> int:
    """Nanoseconds of a builtin_interfaces/Time (ROS 1 times have the same field names in rosbags)."""
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


def pose_from_message(msg) -> Pose | None:
    """Pose of an Odometry, PoseStamped or PoseWithCovarianceStamped message (orientation normalised), or None
    when it holds no usable pose: a NaN or infinite position or orientation, or a zero quaternion."""
    pose = msg.pose
    if hasattr(pose, "pose"):  # Odometry and PoseWithCovarianceStamped wrap a PoseWithCovariance
        pose = pose.pose
    p, q = pose.position, pose.orientation
    position = np.array([p.x, p.y, p.z], dtype=np.float64)
    orientation = np.array([q.x, q.y, q.z, q.w], dtype=np.float64)
    norm = np.linalg.norm(orientation)
    if not (np.isfinite(position).all() and np.isfinite(orientation).all() and math.isfinite(norm) and norm > 0):
        return None
    return Pose(position=position, orientation=orientation / norm)


def pose_is_finite(pose: Pose) -> bool:
    """Whether position and orientation are all finite numbers."""
    return bool(np.isfinite(pose.position).all() and np.isfinite(pose.orientation).all())


def slerp(q0: np.ndarray, q1: np.ndarray, t: float) -> np.ndarray:
    """Spherical linear interpolation between unit quaternions (x, y, z, w), shortest path."""
    dot = float(np.dot(q0, q1))
    if dot < 0.0:
        q1, dot = -q1, -dot
    if dot > 0.9995:
        q = q0 + t * (q1 - q0)
        return q / np.linalg.norm(q)
    theta = math.acos(dot)
    return (math.sin((1 - t) * theta) * q0 + math.sin(t * theta) * q1) / math.sin(theta)


class PoseInterpolator:
    """A pose stream, interpolated at any stamp inside it.

    Poses may arrive slightly out of order. ``max_history`` (a count) and ``max_age_s`` (a time span behind the
    newest pose) bound memory for the live node: older poses are forgotten, in batches, so that at most about
    1.5 times the bound is held and forgetting costs O(1) per pose on average.
    """

    def __init__(self, max_gap_s: float = 1.0, max_history: int | None = None,
                 max_age_s: float | None = None) -> None:
        self.max_gap_ns = int(max_gap_s * 1e9)
        self.max_history = max_history
        self.max_age_ns = None if max_age_s is None else int(max_age_s * 1e9)
        self._stamps: list[int] = []
        self._poses: list[Pose] = []

    def __len__(self) -> int:
        return len(self._stamps)

    @property
    def time_range_ns(self) -> tuple[int, int] | None:
        """(first, last) stamp of the stream, None while empty."""
        return (self._stamps[0], self._stamps[-1]) if self._stamps else None

    def add(self, stamp_ns: int, pose: Pose) -> None:
        """Insert a pose at its stamp (late arrivals go into place)."""
        if not self._stamps or stamp_ns >= self._stamps[-1]:
            self._stamps.append(stamp_ns)
            self._poses.append(pose)
        else:
            i = bisect.bisect_right(self._stamps, stamp_ns)
            self._stamps.insert(i, stamp_ns)
            self._poses.insert(i, pose)
        if self.max_history is not None and len(self._stamps) > 2 * self.max_history:
            del self._stamps[: -self.max_history]
            del self._poses[: -self.max_history]
        if self.max_age_ns is not None and self._stamps[0] < self._stamps[-1] - self.max_age_ns:
            stale = bisect.bisect_left(self._stamps, self._stamps[-1] - self.max_age_ns)
            if 2 * stale >= len(self._stamps) - stale:  # forget in batches: amortised O(1) per pose
                del self._stamps[:stale]
                del self._poses[:stale]

    def at(self, stamp_ns: int) -> Pose | None:
        """The pose at ``stamp_ns``, or None outside the stream or across a gap longer than max_gap_s."""
        i = bisect.bisect_left(self._stamps, stamp_ns)
        if i < len(self._stamps) and self._stamps[i] == stamp_ns:
            pose = self._poses[i]
            return Pose(pose.position.copy(), pose.orientation.copy())
        if i == 0 or i == len(self._stamps):
            return None
        t0, t1 = self._stamps[i - 1], self._stamps[i]
        if t1 - t0 > self.max_gap_ns:
            return None
        a, b = self._poses[i - 1], self._poses[i]
        t = (stamp_ns - t0) / (t1 - t0)
        with np.errstate(over="ignore", invalid="ignore"):  # positions near the float limit: the caller checks
            position = a.position + t * (b.position - a.position)
        return Pose(position=position, orientation=slerp(a.orientation, b.orientation, t))


def _geodetic_to_ecef(latitude_deg: float, longitude_deg: float, altitude_m: float) -> np.ndarray:
    lat, lon = math.radians(latitude_deg), math.radians(longitude_deg)
    prime_vertical = WGS84_A / math.sqrt(1.0 - WGS84_E2 * math.sin(lat) ** 2)
    return np.array([(prime_vertical + altitude_m) * math.cos(lat) * math.cos(lon),
                     (prime_vertical + altitude_m) * math.cos(lat) * math.sin(lon),
                     (prime_vertical * (1.0 - WGS84_E2) + altitude_m) * math.sin(lat)])


class NavSatFixToLocal:
    """GNSS fixes to metres in the east-north-up tangent frame at the first valid fix (WGS84 ellipsoid).

    Fixes with status NO_FIX or a non-finite latitude/longitude give None; an unknown (NaN) altitude is
    taken as the origin's. Orientation is unknown: identity.
    """

    def __init__(self) -> None:
        self._origin: np.ndarray | None = None
        self._to_enu: np.ndarray | None = None
        self._origin_altitude = 0.0

    def __call__(self, msg) -> Pose | None:
        if msg.status.status < 0 or not (math.isfinite(msg.latitude) and math.isfinite(msg.longitude)):
            return None
        if self._origin is None:
            self._origin_altitude = msg.altitude if math.isfinite(msg.altitude) else 0.0
            self._origin = _geodetic_to_ecef(msg.latitude, msg.longitude, self._origin_altitude)
            lat, lon = math.radians(msg.latitude), math.radians(msg.longitude)
            self._to_enu = np.array([
                [-math.sin(lon), math.cos(lon), 0.0],
                [-math.sin(lat) * math.cos(lon), -math.sin(lat) * math.sin(lon), math.cos(lat)],
                [math.cos(lat) * math.cos(lon), math.cos(lat) * math.sin(lon), math.sin(lat)],
            ])
        altitude = msg.altitude if math.isfinite(msg.altitude) else self._origin_altitude
        enu = self._to_enu @ (_geodetic_to_ecef(msg.latitude, msg.longitude, altitude) - self._origin)
        return Pose(position=enu, orientation=IDENTITY_QUATERNION.copy())


def yaw_from_quaternion(orientations: np.ndarray) -> np.ndarray:
    """Heading (yaw about z, radians) of quaternions given as rows x, y, z, w."""
    q = np.asarray(orientations, dtype=np.float64)
    x, y, z, w = q[:, 0], q[:, 1], q[:, 2], q[:, 3]
    return np.arctan2(2.0 * (w * z + x * y), 1.0 - 2.0 * (y * y + z * z))
