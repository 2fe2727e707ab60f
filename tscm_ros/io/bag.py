"""Frames from recordings: images with stamps and poses, shared by every offline tool and the live node.

``FrameSource(bag, ...).open()``, the one way to open a bag, gives a ``FrameReader`` of a rosbag2 directory
(sqlite3 or mcap) or a ROS 1 bag, read with ``rosbags``: it picks the image topic (sensor_msgs/Image or
CompressedImage) and a pose topic (nav_msgs/Odometry, geometry_msgs/PoseStamped or PoseWithCovarianceStamped,
or sensor_msgs/NavSatFix in a local metric frame), reads the pose stream first (it is small) and then streams
the images, each with the pose interpolated at its stamp by ``PoseInterpolator``: positions linearly,
orientations by slerp.

This interpolation replaces message_filters' approximate time synchroniser, which pairs each image with
the *nearest* pose message; at 30 Hz odometry and 1 m/s that is up to 1.7 cm and a few tenths of a degree
off, and it cannot say that an image fell into a gap of the pose stream. Frames outside the pose stream or
across a gap longer than ``max_gap_s`` get no pose and are counted in ``summary()``.

Images are converted by ``image_messages.image_message_to_rgb``, poses come from ``geometry``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rosbags.highlevel import AnyReader
from rosbags.typesys import Stores, get_typestore

from tscm_ros.errors import BagError, TscmError
from tscm_ros.io.geometry import (
    NavSatFixToLocal,
    Pose,
    PoseInterpolator,
    pose_from_message,
    pose_is_finite,
    stamp_to_ns,
)
from tscm_ros.io.image_messages import ImageDecodeError, image_message_to_rgb
from tscm_ros.progress import progress

log = logging.getLogger(__name__)

IMAGE_TYPES = ("sensor_msgs/msg/Image", "sensor_msgs/msg/CompressedImage")
POSE_TYPES = (
    "nav_msgs/msg/Odometry",
    "geometry_msgs/msg/PoseStamped",
    "geometry_msgs/msg/PoseWithCovarianceStamped",
    "sensor_msgs/msg/NavSatFix",
)


@dataclass
class Frame:
    """One camera image with its stamp, interpolated pose (None when unknown) and origin."""

    stamp_ns: int
    image: np.ndarray
    pose: Pose | None
    bag: str
    index: int


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
        self.poses_invalid = 0  # pose messages with a NaN or infinite value or a zero quaternion, skipped
        self._reset_counts()
        if not self.path.exists():
            raise BagError(f"{self.path}: no such bag")
        if self.path.is_dir() and not (self.path / "metadata.yaml").is_file():
            what = "an empty directory" if not any(self.path.iterdir()) else "a directory without metadata.yaml"
            raise BagError(f"{self.path}: not a rosbag2 recording ({what})")
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
        try:  # the constructor already reads rosbag2 metadata: an empty directory fails here
            reader = AnyReader([self.path], default_typestore=get_typestore(Stores.ROS2_HUMBLE))
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
            if to_local:
                pose = to_local(msg)  # a fix without a position is no pose, as the node takes it too
            elif (pose := pose_from_message(msg)) is None:
                self.poses_invalid += 1
                if self.poses_invalid == 1:
                    log.warning("%s: skipped the %s message on %s at %d: a NaN or infinite position or "
                                "orientation, or a zero quaternion (the summary counts all)", self.path,
                                connection.msgtype, connection.topic, log_time)
            if pose is not None:
                self.pose_frame_id = self.pose_frame_id or msg.header.frame_id
                self.poses.add(stamp_to_ns(msg.header.stamp) or log_time, pose)
        if len(self.poses) == 0:
            invalid = (f" ({self.poses_invalid} with a NaN or infinite position or orientation, or a zero "
                       "quaternion)" if self.poses_invalid else "")
            raise BagError(f"{self.path}: pose topic {connection.topic} has no usable message{invalid}")

    def _reset_counts(self) -> None:
        self.frames_read = self.frames_malformed = 0
        self.frames_without_pose = self.frames_outside_poses = self.frames_in_pose_gap = 0
        self.frames_with_nonfinite_pose = 0  # interpolated between finite poses too large to subtract

    def __len__(self) -> int:
        """Image messages on the image topic (malformed ones included)."""
        return self._count

    def __iter__(self) -> Iterator[Frame]:
        """Frames in the bag's recording (log-time) order; the counts of ``summary()`` restart."""
        self._reset_counts()
        with self._open() as reader:
            messages = self._messages(reader, self.image_topic)
            if self.progress:
                messages = progress(messages, total=len(self), unit="frame", desc=self.path.name)
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
                if pose is not None and not pose_is_finite(pose):
                    pose = None
                    self.frames_without_pose += 1
                    self.frames_with_nonfinite_pose += 1
                elif pose is None:
                    self.frames_without_pose += 1
                    if self.pose_topic:
                        first, last = self.poses.time_range_ns
                        if first <= stamp_ns <= last:
                            self.frames_in_pose_gap += 1
                        else:
                            self.frames_outside_poses += 1
                yield Frame(stamp_ns=stamp_ns, image=image, pose=pose, bag=str(self.path), index=index)

    def images_at(self, stamps_ns) -> dict[int, np.ndarray]:
        """The RGB images stamped ``stamps_ns`` (the frames' ``stamp_ns``), decoding only those: a few frames of a
        long bag at bounded memory. Stamps the bag lacks, or whose image is malformed, are left out."""
        wanted = {int(stamp) for stamp in stamps_ns}
        images: dict[int, np.ndarray] = {}
        with self._open() as reader:
            for log_time, msg in self._messages(reader, self.image_topic):
                if msg is None:
                    continue
                stamp_ns = stamp_to_ns(msg.header.stamp) or log_time
                if stamp_ns in wanted and stamp_ns not in images:
                    try:
                        images[stamp_ns] = image_message_to_rgb(msg)
                    except ImageDecodeError:
                        continue
                    if len(images) == len(wanted):
                        break
        return images

    def summary(self) -> str:
        """One line: what was read, and what was skipped or has no pose."""
        if self.pose_topic:
            nonfinite = (f", {self.frames_with_nonfinite_pose} interpolated to a non-finite pose"
                         if self.frames_with_nonfinite_pose else "")
            invalid = (f" ({self.poses_invalid} more skipped: a NaN or infinite position or orientation, or a "
                       "zero quaternion)" if self.poses_invalid else "")
            poses = (f"poses from {self.pose_topic} ({len(self.poses)} messages{invalid}), "
                     f"{self.frames_without_pose} frames without pose ({self.frames_outside_poses} outside the pose "
                     f"stream, {self.frames_in_pose_gap} in gaps over {self.poses.max_gap_ns / 1e9:g} s{nonfinite})")
        else:
            poses = f"no pose topic, {self.frames_without_pose} frames without pose"
        return (f"{self.path}: {self.frames_read} frames from {self.image_topic}, {poses}, "
                f"{self.frames_malformed} malformed images skipped")


@dataclass(frozen=True)
class FrameSource:
    """Where frames come from: a bag and how to read it (topics, None: auto-detect; longest pose gap)."""

    bag: str | Path
    image_topic: str | None = None
    pose_topic: str | None = None
    max_gap_s: float = 1.0

    def open(self, progress: bool = False) -> FrameReader:
        """A reader of the bag's frames; BagError names the file and the problem."""
        return FrameReader(self.bag, image_topic=self.image_topic, pose_topic=self.pose_topic,
                           max_gap_s=self.max_gap_s, progress=progress)
