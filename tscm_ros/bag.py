"""Frames from recordings: images with stamps and poses, shared by every offline tool and the live node.

``open_frames(bag)`` opens a rosbag2 directory (sqlite3 or mcap) or a ROS 1 bag with ``rosbags``, picks
the image topic (sensor_msgs/Image or CompressedImage) and a pose topic (nav_msgs/Odometry,
geometry_msgs/PoseStamped or PoseWithCovarianceStamped, or sensor_msgs/NavSatFix in a local metric
frame), reads the pose stream first (it is small) and then streams the images, each with the pose
interpolated at its stamp by ``PoseInterpolator``: positions linearly, orientations by slerp.

This interpolation replaces message_filters' approximate time synchroniser, which pairs each image with
the *nearest* pose message; at 30 Hz odometry and 1 m/s that is up to 1.7 cm and a few tenths of a degree
off, and it cannot say that an image fell into a gap of the pose stream. Frames outside the pose stream or
across a gap longer than ``max_gap_s`` get no pose and are counted in ``summary()``.

``image_message_to_rgb`` converts both bag messages and live rclpy messages (the same field names), so the
node and the offline tools see identical pixels.
"""

from __future__ import annotations

import bisect
import logging
import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator

import cv2
import numpy as np
from rosbags.highlevel import AnyReader
from rosbags.image import message_to_cvimage
from rosbags.image.image import ImageError, to_cvtype
from rosbags.typesys import Stores, get_typestore
from tqdm import tqdm

from tscm_ros.errors import BagError, TscmError

log = logging.getLogger(__name__)

IMAGE_TYPES = ("sensor_msgs/msg/Image", "sensor_msgs/msg/CompressedImage")
POSE_TYPES = (
    "nav_msgs/msg/Odometry",
    "geometry_msgs/msg/PoseStamped",
    "geometry_msgs/msg/PoseWithCovarianceStamped",
    "sensor_msgs/msg/NavSatFix",
)
WGS84_A = 6_378_137.0  # semi-major axis, metres
WGS84_E2 = 6.694_379_990_14e-3  # first eccentricity squared
IDENTITY_QUATERNION = np.array([0.0, 0.0, 0.0, 1.0])


class ImageDecodeError(TscmError):
    """One image message cannot be converted (bad size, step, data length, encoding or compression)."""


@dataclass
class Pose:
    """Position (3,) in metres and orientation quaternion (4,) as x, y, z, w."""

    position: np.ndarray
    orientation: np.ndarray


@dataclass
class Frame:
    """One camera image with its stamp, interpolated pose (None when unknown) and origin."""

    stamp_ns: int
    image: np.ndarray
    pose: Pose | None
    bag: str
    index: int


# ----- images -------------------------------------------------------------------------------------------

def image_message_to_rgb(msg) -> np.ndarray:
    """HxWx3 uint8 RGB from a sensor_msgs/Image or CompressedImage (rosbags or rclpy message).

    Raises ImageDecodeError for a zero-size image, a row step too small for the width, data shorter than
    step * height, an unknown encoding, or compressed data that does not decode.
    """
    if hasattr(msg, "format"):
        data = np.frombuffer(bytes(msg.data), dtype=np.uint8)
        if data.size == 0:
            raise ImageDecodeError(f"compressed image ({msg.format or 'no format'}) has no data")
        image = cv2.imdecode(data, cv2.IMREAD_COLOR)
        if image is None:
            raise ImageDecodeError(f"compressed image ({msg.format or 'no format'}, {data.size} bytes) does not decode")
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)

    height, width, step, encoding = int(msg.height), int(msg.width), int(msg.step), str(msg.encoding)
    if height <= 0 or width <= 0:
        raise ImageDecodeError(f"image has zero size ({width}x{height})")
    try:
        depth_bits, _, _, channels = to_cvtype(encoding)
    except ImageError:
        raise ImageDecodeError(f"unknown image encoding {encoding!r}") from None
    row_bytes = width * channels * depth_bits // 8
    if encoding in ("nv12", "nv21"):
        raise ImageDecodeError(f"image encoding {encoding!r} is not supported")
    if step < row_bytes:
        raise ImageDecodeError(f"image step {step} is smaller than width {width} x {channels * depth_bits // 8} bytes")
    data = bytes(msg.data)
    if len(data) < step * height:
        raise ImageDecodeError(f"image data has {len(data)} bytes, expected step {step} x height {height} = {step * height}")
    if step != row_bytes or len(data) != step * height:  # padded rows: repack to what the converter expects
        rows = np.frombuffer(data, dtype=np.uint8, count=step * height).reshape(height, step)
        data = rows[:, :row_bytes].tobytes()
    packed = SimpleNamespace(height=height, width=width, encoding=encoding,
                             is_bigendian=bool(msg.is_bigendian), step=row_bytes, data=data)
    try:
        rgb = message_to_cvimage(packed, "rgb8")
    except ImageError as exc:
        raise ImageDecodeError(f"cannot convert {encoding!r} to RGB: {exc}") from None
    return np.ascontiguousarray(rgb, dtype=np.uint8)


# ----- poses --------------------------------------------------------------------------------------------

def stamp_to_ns(stamp) -> int:
    """Nanoseconds of a builtin_interfaces/Time (ROS 1 times have the same field names in rosbags)."""
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


def pose_from_message(msg) -> Pose:
    """Pose of an Odometry, PoseStamped or PoseWithCovarianceStamped message."""
    pose = msg.pose
    if hasattr(pose, "pose"):  # Odometry and PoseWithCovarianceStamped wrap a PoseWithCovariance
        pose = pose.pose
    p, q = pose.position, pose.orientation
    orientation = np.array([q.x, q.y, q.z, q.w], dtype=np.float64)
    norm = np.linalg.norm(orientation)
    return Pose(position=np.array([p.x, p.y, p.z], dtype=np.float64),
                orientation=orientation / norm if norm > 0 else IDENTITY_QUATERNION.copy())


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
        return Pose(position=a.position + t * (b.position - a.position),
                    orientation=slerp(a.orientation, b.orientation, t))


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


# ----- reading bags -------------------------------------------------------------------------------------

def _pick_topic(connections, types: tuple[str, ...], wanted: str | None, what: str, path: Path,
                required: bool) -> object | None:
    by_topic = {c.topic: c for c in connections if c.msgtype in types}
    if wanted is not None:
        if wanted not in by_topic:
            available = ", ".join(sorted({f"{c.topic} ({c.msgtype})" for c in connections})) or "none"
            raise BagError(f"{path}: no {what} topic {wanted!r} of a supported type; topics in the bag: {available}")
        return by_topic[wanted]
    if len(by_topic) == 1:
        return next(iter(by_topic.values()))
    if not by_topic:
        if required:
            raise BagError(f"{path}: no {what} topic ({', '.join(types)}) in the bag")
        return None
    listing = ", ".join(f"{t} ({c.msgtype})" for t, c in sorted(by_topic.items()))
    raise BagError(f"{path}: several {what} topics, choose one with the topic option: {listing}")


class FrameReader:
    """Frames of one image topic of one bag with interpolated poses, in recording order.

    ``image_topic`` / ``pose_topic`` None: auto-detect (exactly one candidate of a supported type; several
    raise BagError listing them; no pose topic means frames without poses). A named topic must exist.
    The pose stream is read once on opening; images are streamed on each iteration (memory stays bounded).
    """

    def __init__(self, path: str | Path, image_topic: str | None = None, pose_topic: str | None = None,
                 max_gap_s: float = 1.0, progress: bool = False) -> None:
        self.path = Path(path)
        self.progress = progress
        self.poses = PoseInterpolator(max_gap_s=max_gap_s)
        self.pose_frame_id = ""
        self._reset_counts()
        if not self.path.exists():
            raise BagError(f"{self.path}: no such bag")
        with self._open() as reader:
            image = _pick_topic(reader.connections, IMAGE_TYPES, image_topic, "image", self.path, required=True)
            pose = _pick_topic(reader.connections, POSE_TYPES, pose_topic, "pose", self.path,
                               required=pose_topic is not None)
            self.image_topic, self.image_type = image.topic, image.msgtype
            self.pose_topic = pose.topic if pose is not None else None
            self._count = sum(c.msgcount for c in reader.connections if c.topic == image.topic)
            if pose is not None:
                self._read_poses(reader, pose)

    @contextmanager
    def _open(self) -> Iterator[AnyReader]:
        reader = AnyReader([self.path], default_typestore=get_typestore(Stores.ROS2_HUMBLE))
        try:
            reader.open()
        except Exception as exc:  # rosbags raises several types for missing, foreign and damaged files
            raise BagError(f"{self.path}: cannot open the bag: {exc}") from exc
        try:
            yield reader
        finally:
            reader.close()

    def _messages(self, reader: AnyReader, topic: str) -> Iterator[tuple[int, object | None]]:
        """(log time, message) of every connection on ``topic`` (a ROS 1 bag has one per publisher);
        the message is None where its bytes do not deserialize."""
        connections = [c for c in reader.connections if c.topic == topic]
        try:
            for conn, log_time, raw in reader.messages(connections=connections):
                try:
                    message = reader.deserialize(raw, conn.msgtype)
                except Exception as exc:  # one damaged message: the caller skips and counts it
                    log.warning("%s: a %s message on %s at %d does not deserialize: %s",
                                self.path, conn.msgtype, conn.topic, log_time, exc)
                    message = None
                yield log_time, message
        except TscmError:
            raise
        except Exception as exc:
            raise BagError(f"{self.path}: the bag is damaged or truncated ({topic}): {exc}") from exc

    def _read_poses(self, reader: AnyReader, connection) -> None:
        to_local = NavSatFixToLocal() if connection.msgtype == "sensor_msgs/msg/NavSatFix" else None
        for log_time, msg in self._messages(reader, connection.topic):
            if msg is None:
                continue
            pose = to_local(msg) if to_local else pose_from_message(msg)
            if pose is not None:
                self.pose_frame_id = self.pose_frame_id or msg.header.frame_id
                self.poses.add(stamp_to_ns(msg.header.stamp) or log_time, pose)
        if len(self.poses) == 0:
            raise BagError(f"{self.path}: pose topic {connection.topic} has no usable message")

    def _reset_counts(self) -> None:
        self.frames_read = self.frames_malformed = 0
        self.frames_without_pose = self.frames_outside_poses = self.frames_in_pose_gap = 0

    def __len__(self) -> int:
        """Image messages on the image topic (malformed ones included)."""
        return self._count

    def __iter__(self) -> Iterator[Frame]:
        """Frames in the bag's recording (log-time) order; the counts of ``summary()`` restart."""
        self._reset_counts()
        with self._open() as reader:
            messages = self._messages(reader, self.image_topic)
            if self.progress:
                messages = tqdm(messages, total=len(self), unit="frame", desc=self.path.name)
            for index, (log_time, msg) in enumerate(messages):
                if msg is None:
                    self.frames_malformed += 1
                    continue
                try:
                    image = image_message_to_rgb(msg)
                except ImageDecodeError as exc:
                    self.frames_malformed += 1
                    if self.frames_malformed <= 5:
                        log.warning("%s: skipped image %d of %s: %s", self.path, index, self.image_topic, exc)
                    continue
                stamp_ns = stamp_to_ns(msg.header.stamp) or log_time
                pose = self.poses.at(stamp_ns) if self.pose_topic else None
                self.frames_read += 1
                if pose is None:
                    self.frames_without_pose += 1
                    if self.pose_topic:
                        first, last = self.poses.time_range_ns
                        if first <= stamp_ns <= last:
                            self.frames_in_pose_gap += 1
                        else:
                            self.frames_outside_poses += 1
                yield Frame(stamp_ns=stamp_ns, image=image, pose=pose, bag=str(self.path), index=index)

    def summary(self) -> str:
        """One line: what was read, and what was skipped or has no pose."""
        if self.pose_topic:
            poses = (f"poses from {self.pose_topic} ({len(self.poses)} messages), {self.frames_without_pose} "
                     f"frames without pose ({self.frames_outside_poses} outside the pose stream, "
                     f"{self.frames_in_pose_gap} in gaps over {self.poses.max_gap_ns / 1e9:g} s)")
        else:
            poses = f"no pose topic, {self.frames_without_pose} frames without pose"
        return (f"{self.path}: {self.frames_read} frames from {self.image_topic}, {poses}, "
                f"{self.frames_malformed} malformed images skipped")


def open_frames(bag_path: str | Path, image_topic: str | None = None, pose_topic: str | None = None,
                max_gap_s: float = 1.0, progress: bool = False) -> FrameReader:
    """Open a bag for frame iteration; BagError names the file and the problem."""
    return FrameReader(bag_path, image_topic=image_topic, pose_topic=pose_topic, max_gap_s=max_gap_s,
                       progress=progress)
