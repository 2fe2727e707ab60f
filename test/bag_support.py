"""Small rosbag2 recordings written by the tests themselves: textured images along a straight drive with
nav_msgs/Odometry, where chosen odometry messages can carry bad values."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from rosbags.rosbag2 import Writer
from rosbags.typesys import Stores, get_typestore

STORE = get_typestore(Stores.ROS2_HUMBLE)
T = STORE.types
START_NS = 1_700_000_000 * 10**9
POSE_PERIOD_NS = 50_000_000  # odometry at 20 Hz
IMAGE_EVERY = 4  # an image every 4th odometry message: 5 Hz, 25 ms after it


def _header(stamp_ns: int, frame_id: str):
    return T["std_msgs/msg/Header"](stamp=T["builtin_interfaces/msg/Time"](sec=stamp_ns // 10**9,
                                                                            nanosec=stamp_ns % 10**9),
                                    frame_id=frame_id)


def odometry(stamp_ns: int, position, orientation):
    """A nav_msgs/Odometry in frame odom at ``position`` (x, y, z) and ``orientation`` (x, y, z, w)."""
    pose = T["geometry_msgs/msg/Pose"](position=T["geometry_msgs/msg/Point"](*map(float, position)),
                                       orientation=T["geometry_msgs/msg/Quaternion"](*map(float, orientation)))
    covariance = np.zeros(36)
    twist = T["geometry_msgs/msg/TwistWithCovariance"](
        twist=T["geometry_msgs/msg/Twist"](linear=T["geometry_msgs/msg/Vector3"](0.0, 0.0, 0.0),
                                           angular=T["geometry_msgs/msg/Vector3"](0.0, 0.0, 0.0)),
        covariance=covariance)
    return T["nav_msgs/msg/Odometry"](header=_header(stamp_ns, "odom"), child_frame_id="base_link",
                                      pose=T["geometry_msgs/msg/PoseWithCovariance"](pose=pose, covariance=covariance),
                                      twist=twist)


def textured_image(seed: int, stamp_ns: int, height: int = 48, width: int = 64):
    """An rgb8 sensor_msgs/Image of noise, different per ``seed``."""
    rgb = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return T["sensor_msgs/msg/Image"](header=_header(stamp_ns, "camera"), height=height, width=width,
                                      encoding="rgb8", is_bigendian=0, step=width * 3, data=rgb.reshape(-1))


def write_drive(path: Path, images: int = 8, bad_poses: dict[int, tuple] | None = None,
                speed_m_s: float = 1.0, start_ns: int = START_NS, odometry_topic: str | None = "/odom",
                odometry_offset_ns: int = 0, image_seed: int = 0, image_size: tuple[int, int] = (48, 64)) -> Path:
    """A sqlite3 rosbag2 of ``images`` images on /camera/image_raw along a straight drive along x at
    ``speed_m_s``, with /odom at 20 Hz; ``bad_poses`` maps an odometry message's number to the (position,
    orientation) it carries instead of the true one; ``odometry_topic`` None: images only; the odometry's
    stamps are ``odometry_offset_ns`` off the images'; ``image_seed`` changes every image
    of ``image_size`` (height, width)."""
    bad_poses = bad_poses or {}
    with Writer(path, version=9) as writer:
        odom = odometry_topic and writer.add_connection(odometry_topic, "nav_msgs/msg/Odometry", typestore=STORE)
        camera = writer.add_connection("/camera/image_raw", "sensor_msgs/msg/Image", typestore=STORE)
        for i in range(IMAGE_EVERY * images + 2):
            stamp = start_ns + i * POSE_PERIOD_NS
            position, orientation = bad_poses.get(i, ((speed_m_s * i * POSE_PERIOD_NS / 1e9, 0.0, 0.0),
                                                      (0.0, 0.0, math.sin(0.01 * i), math.cos(0.01 * i))))
            if odom:
                odometry_stamp = stamp + odometry_offset_ns
                writer.write(odom, odometry_stamp, STORE.serialize_cdr(odometry(odometry_stamp, position, orientation),
                                                                       "nav_msgs/msg/Odometry"))
            if i % IMAGE_EVERY == 1 and i // IMAGE_EVERY < images:
                image_stamp = stamp + POSE_PERIOD_NS // 2
                image = textured_image(image_seed + i, image_stamp, *image_size)
                writer.write(camera, image_stamp, STORE.serialize_cdr(image, "sensor_msgs/msg/Image"))
    return path


NAN, INF = math.nan, math.inf
# odometry messages 5, 9, 13 and 17 hold no usable pose; each lies between two good ones 100 ms apart
BAD_POSES = {5: ((NAN, 0.0, 0.0), (0.0, 0.0, 0.0, 1.0)), 9: ((INF, 0.0, 0.0), (0.0, 0.0, 0.0, 1.0)),
             13: ((1.0, 0.0, 0.0), (0.0, 0.0, NAN, 1.0)), 17: ((1.0, 0.0, 0.0), (0.0, 0.0, 0.0, 0.0))}
