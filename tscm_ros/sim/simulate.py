"""Rendered test routes: a camera driving a closed loop through a textured town (or garden), written as a
rosbag2.

The world (grass, an asphalt road, pavements in blocks of colour, road-side buildings with procedural
facades, poles) depends only on ``seed`` and ``aliasing``; ``traversal`` 0 is the reference drive, and
each later traversal revisits the same places under changed appearance. With ``condition`` "auto" (the
default) that is a new sun direction and, scaled by ``appearance_change`` in [0, 1], light colour, a
dusk sky, tint, exposure, sensor noise, more clutter objects placed anew, and a different drive (a
lateral offset with a slow weave, a small heading wobble, camera height, images taken at other points
along the route). The other conditions (``CONDITIONS``) are hard changes for benchmarks: "day" keeps
the reference light, "night", "haze", "season" and "clutter" change light, air, surface colours or the
objects along the street; with every one of them traversals >= 1 drive 1-2 m off the centre line with
a weave, a heading wobble of 3-5 degrees, the camera up to 0.3 m higher or lower and images at other
points along the route. A condition on traversal 0 gives a reference under that condition (driven on
the centre line).

``aliasing`` in [0, 1] is the fraction of 20 m street blocks whose buildings, poles and pavement
colours are an exact copy of an earlier block's (placed the same way relative to the route), so that
distinct places look alike; ``skip_arc`` leaves out the images of a stretch of the lap (a reference
that never mapped it). Rendering is pybullet's CPU TinyRenderer (offscreen), so the same arguments
give byte-identical images. The town and its rendering are in tscm_ros/sim/world.py, the
conditions and the drive in tscm_ros/sim/appearance.py; this module writes the bag.

``world`` "garden" (tscm_ros/sim/garden.py) replaces the town by a world unlike it, for
benchmarks held out from everything tuned in the town: a gravel path through a park of hedges, trees,
walls, benches and sculptures around a temple, in photographic textures, under a low warm sun and a
cloudy sky. Route, drive, odometry, conditions, ``aliasing`` (of its 20 m blocks by the path) and
``skip_arc`` work as in the town.

Topics: ``/camera/image_raw`` (sensor_msgs/Image, rgb8, frame ``camera``), optionally
``/camera/image_raw/compressed`` (JPEG), and ``/odom`` (nav_msgs/Odometry, the exact pose of
``base_link`` in ``odom``, at least three times per image and 10 Hz, between the image stamps). All
traversals of a seed share one metric frame, so positions compare across bags. The camera sits on
``base_link``, looking along its heading.
"""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
from rosbags.rosbag2 import StoragePlugin, Writer
from rosbags.typesys import Stores, get_typestore

from tscm_ros.atomic import atomic_directory
from tscm_ros.errors import ConfigError
from tscm_ros.progress import progress as progress_bar
from tscm_ros.sim.appearance import CONDITIONS, Appearance
from tscm_ros.sim.garden import Garden
from tscm_ros.sim.route import Route
from tscm_ros.sim.world import Scene, World

IMAGE_TOPIC = "/camera/image_raw"
COMPRESSED_TOPIC = "/camera/image_raw/compressed"
ODOM_TOPIC = "/odom"
SPEED_M_S = 5.0
MIN_ODOM_PER_IMAGE = 3
MAX_ODOM_PERIOD_NS = 100_000_000  # odometry at 10 Hz or faster, so sparse images still get poses
START_SEC = 1_700_000_000
STORAGES = {"sqlite3": StoragePlugin.SQLITE3, "mcap": StoragePlugin.MCAP}
WORLDS: dict[str, type[Scene]] = {"town": World, "garden": Garden}  # each with a one-line ``summary``


def _odometry(typestore, stamp_ns: int, xy: np.ndarray, heading: float):
    T = typestore.types
    stamp = T["builtin_interfaces/msg/Time"](sec=stamp_ns // 10**9, nanosec=stamp_ns % 10**9)
    pose = T["geometry_msgs/msg/Pose"](
        position=T["geometry_msgs/msg/Point"](x=float(xy[0]), y=float(xy[1]), z=0.0),
        orientation=T["geometry_msgs/msg/Quaternion"](x=0.0, y=0.0, z=math.sin(heading / 2), w=math.cos(heading / 2)))
    zero = T["geometry_msgs/msg/Vector3"](x=0.0, y=0.0, z=0.0)
    twist = T["geometry_msgs/msg/Twist"](linear=T["geometry_msgs/msg/Vector3"](x=SPEED_M_S, y=0.0, z=0.0), angular=zero)
    return T["nav_msgs/msg/Odometry"](
        header=T["std_msgs/msg/Header"](stamp=stamp, frame_id="odom"), child_frame_id="base_link",
        pose=T["geometry_msgs/msg/PoseWithCovariance"](pose=pose, covariance=np.zeros(36)),
        twist=T["geometry_msgs/msg/TwistWithCovariance"](twist=twist, covariance=np.zeros(36)))


def simulate_route(out: str | Path, seed: int = 0, traversal: int = 0, frames: int = 100, width: int = 320,
                   height: int = 240, laps: int = 1, storage: str = "sqlite3", compressed: bool = False,
                   appearance_change: float = 0.6, route_length_m: float = 300.0, force: bool = False,
                   progress: bool = True, condition: str = "auto", aliasing: float = 0.0,
                   skip_arc: tuple[float, float] | None = None, world: str = "town") -> Path:
    """Render one traversal into a rosbag2 directory at ``out`` and return its path.

    ``frames`` images per lap, evenly spaced along a closed route of ``route_length_m`` metres driven
    ``laps`` times at 5 m/s; ``/odom`` carries the exact vehicle pose at least three times per image and
    at 10 Hz or more, at stamps between the image stamps. The bag is written into a temp dir next to
    ``out`` and renamed into place; an existing ``out`` is replaced only with ``force``. Raises
    ConfigError on invalid arguments.

    ``condition`` (a key of ``CONDITIONS``) picks the change of appearance: "auto" scales a random one by
    ``appearance_change``; the others are hard changes (``appearance_change`` then only sets how much
    clutter stands along the street) with a changed drive on traversals >= 1. ``aliasing`` in [0, 1]
    makes that fraction of the 20 m street blocks copies of earlier ones (the same for every traversal
    of ``seed``). ``skip_arc=(start, end)``, fractions of the lap with 0 <= start < end <= 1, leaves out
    the images taken where the lap position is in [start, end); odometry goes on through the gap, and
    the other images are the same as without ``skip_arc``. ``world`` (a key of ``WORLDS``) is the scene:
    "town" (the default) or "garden", a world unlike the town for benchmarks held out from it.
    """
    out = Path(out)
    if frames < 2 or width < 16 or height < 16 or laps < 1 or route_length_m < 50:
        raise ConfigError("simulate_route: need frames >= 2, width and height >= 16, laps >= 1, route length >= 50 m")
    if storage not in STORAGES:
        raise ConfigError(f"simulate_route: storage must be one of {', '.join(STORAGES)}, got {storage!r}")
    if not 0.0 <= appearance_change <= 1.0:
        raise ConfigError(f"simulate_route: appearance change must be in [0, 1], got {appearance_change}")
    if traversal < 0:
        raise ConfigError(f"simulate_route: traversal must be >= 0, got {traversal}")
    if world not in WORLDS:
        raise ConfigError(f"simulate_route: world must be one of {', '.join(WORLDS)}, got {world!r}")
    if condition not in CONDITIONS:
        raise ConfigError(f"simulate_route: condition must be one of {', '.join(CONDITIONS)}, got {condition!r}")
    if not 0.0 <= aliasing <= 1.0:
        raise ConfigError(f"simulate_route: aliasing must be in [0, 1], got {aliasing}")
    if skip_arc is not None and not (len(skip_arc) == 2 and 0.0 <= skip_arc[0] < skip_arc[1] <= 1.0):
        raise ConfigError(f"simulate_route: skip_arc must be (start, end) with 0 <= start < end <= 1, got {skip_arc}")
    if out.exists() and not force:
        raise ConfigError(f"{out} already exists (use --force to replace it)")

    route = Route(route_length_m)
    look = Appearance.for_traversal(seed, traversal, appearance_change, condition)
    noise = np.random.default_rng([seed, traversal, 4])
    spacing = route_length_m / frames
    image_period_ns = int(spacing / SPEED_M_S * 1e9)
    odom_per_image = max(MIN_ODOM_PER_IMAGE, math.ceil(image_period_ns / MAX_ODOM_PERIOD_NS))
    start_ns = (START_SEC + 3600 * traversal) * 10**9
    first_s = look.arc_offset * spacing
    total = frames * laps

    def arc_at(stamp_ns: int) -> float:
        return first_s + SPEED_M_S * (stamp_ns - start_ns) / 1e9

    def pose_at(stamp_ns: int) -> tuple[np.ndarray, float]:
        return look.vehicle_pose(route, arc_at(stamp_ns))

    def skipped(i: int) -> bool:
        lap_fraction = arc_at(start_ns + i * image_period_ns) % route_length_m / route_length_m
        return skip_arc is not None and skip_arc[0] <= lap_fraction < skip_arc[1]

    if all(skipped(i) for i in range(total)):
        raise ConfigError(f"simulate_route: skip_arc {skip_arc} leaves no image of the {frames} per lap")

    typestore = get_typestore(Stores.ROS2_HUMBLE)
    T = typestore.types

    scene = WORLDS[world](route, seed, traversal, look, aliasing)
    try:
        with atomic_directory(out) as bag_dir:
            bag_dir.rmdir()  # the rosbag2 writer creates its directory itself
            with Writer(bag_dir, version=9, storage_plugin=STORAGES[storage]) as writer:
                image_conn = writer.add_connection(IMAGE_TOPIC, "sensor_msgs/msg/Image", typestore=typestore)
                odom_conn = writer.add_connection(ODOM_TOPIC, "nav_msgs/msg/Odometry", typestore=typestore)
                jpeg_conn = (writer.add_connection(COMPRESSED_TOPIC, "sensor_msgs/msg/CompressedImage",
                                                   typestore=typestore)
                             if compressed else None)
                for i in progress_bar(range(total), desc=f"rendering {out.name}", unit="frame", enabled=progress):
                    stamp_ns = start_ns + i * image_period_ns
                    # Odometry at even steps, the first half a step before the image: no stamp coincides with
                    # an image stamp, so every image pose is interpolated.
                    for k in range(odom_per_image):
                        t = stamp_ns + (2 * k - 1) * image_period_ns // (2 * odom_per_image)
                        xy, heading = pose_at(t)
                        writer.write(odom_conn, t, typestore.serialize_cdr(_odometry(typestore, t, xy, heading),
                                                                          "nav_msgs/msg/Odometry"))
                    if skipped(i):  # no image, but the noise of later images stays as without skip_arc
                        noise.normal(0, look.noise, (height, width, 3))
                        continue
                    xy, yaw = pose_at(stamp_ns)
                    eye = [xy[0], xy[1], look.height_m]
                    target = [xy[0] + 10 * math.cos(yaw), xy[1] + 10 * math.sin(yaw), look.height_m + 0.5]  # 3 deg up
                    rgb, sky, depth = scene.render(eye, target, width, height, look.light_direction, look.light_color,
                                                   look.ambient)
                    rgb = look.grade(rgb, sky, depth, noise, scene.clouds(eye, target, width, height))
                    header = T["std_msgs/msg/Header"](
                        stamp=T["builtin_interfaces/msg/Time"](sec=stamp_ns // 10**9, nanosec=stamp_ns % 10**9),
                        frame_id="camera")
                    image = T["sensor_msgs/msg/Image"](header=header, height=height, width=width, encoding="rgb8",
                                                       is_bigendian=0, step=width * 3, data=rgb.reshape(-1))
                    writer.write(image_conn, stamp_ns, typestore.serialize_cdr(image, "sensor_msgs/msg/Image"))
                    if jpeg_conn is not None:
                        _, jpeg = cv2.imencode(".jpg", rgb[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 90])
                        message = T["sensor_msgs/msg/CompressedImage"](header=header, format="jpeg",
                                                                       data=jpeg.reshape(-1))
                        writer.write(jpeg_conn, stamp_ns,
                                     typestore.serialize_cdr(message, "sensor_msgs/msg/CompressedImage"))
    finally:
        scene.close()
    return out
