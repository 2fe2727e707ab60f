"""The place recognition node's parameters: the table, their declaration, and the checks of their values.

``PARAMETERS`` lists every parameter (declared with its description, listed by ``place_recognition_node
--help``, mirrored in config/place_recognition.yaml). Start-up (``validate``) and ``ros2 param set``
(``check_runtime_values``) refuse a bad value with the same one-line ConfigError naming the parameter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from geometry_msgs.msg import PoseStamped, PoseWithCovarianceStamped
from nav_msgs.msg import Odometry
from rcl_interfaces.msg import ParameterDescriptor
from rclpy.exceptions import InvalidParameterTypeException
from rclpy.node import Node
from rclpy.parameter import Parameter as RosParameter
from rclpy.qos import QoSProfile, QoSReliabilityPolicy, qos_profile_sensor_data

from tscm_ros.detect.detection import DEFAULT_MIN_SCORE, MatchingConfig
from tscm_ros.detect.temporal import TemporalConfig
from tscm_ros.detect.verification import (
    AUTO_VERIFY_MIN_SIDE,
    DEFAULT_MIN_INLIERS,
    CameraIntrinsics,
    VerificationConfig,
)
from tscm_ros.errors import ConfigError
from tscm_ros.map.building import MAPPING_FIT_KEYFRAMES, MIN_FIT_KEYFRAMES

POSE_TYPES = {"odometry": Odometry, "pose_stamped": PoseStamped,
              "pose_with_covariance_stamped": PoseWithCovarianceStamped}
# Pose subscription QoS. Best effort (sensor_data) also receives from reliable publishers; reliable does not
# receive from best-effort ones (common on robot bases).
POSE_QOS = {"sensor_data": QoSProfile(depth=50, reliability=QoSReliabilityPolicy.BEST_EFFORT,
                                      durability=qos_profile_sensor_data.durability),
            "reliable": QoSProfile(depth=50)}


@dataclass(frozen=True)
class Parameter:
    name: str
    default: object
    description: str
    runtime: bool = False  # changeable while the node runs (ros2 param set); read-only otherwise


PARAMETERS = [
    Parameter("image_topic", "/camera/image_raw",
              "camera topic: sensor_msgs/Image, or CompressedImage with use_compressed"),
    Parameter("use_compressed", False, "subscribe to sensor_msgs/CompressedImage (JPEG/PNG) instead of Image"),
    Parameter("qos", "sensor_data",
              "image subscription QoS: sensor_data (best effort, depth 1) or reliable (depth 10)"),
    Parameter("pose_topic", "", "optional pose stream for query poses and spatial exclusion; empty = none"),
    Parameter("pose_type", "odometry", "type on pose_topic: odometry, pose_stamped or pose_with_covariance_stamped"),
    Parameter("pose_qos", "sensor_data", "pose subscription QoS: sensor_data (best effort: receives from reliable and "
              "best-effort publishers) or reliable (receives from reliable publishers only)"),
    Parameter("pose_max_gap_s", 1.0, "no query pose when the pose stream has a gap longer than this around the image"),
    Parameter("pose_history_s", 30.0, "poses older than this (behind the newest pose) are forgotten: bounded memory; "
              "images later than this behind the pose stream get no pose"),
    Parameter("model_path", "", "model: a checkpoint (.pt) from train, 'pretrained' (GeM baseline); empty = the "
              "training-free default, which describes with the map's own vocabulary"),
    Parameter("map_path", "", "keyframe map directory from build_map; required unless mapping is true"),
    Parameter("device", "auto", "inference device: auto (GPU when present), cpu or cuda"),
    Parameter("k", 5, "at most this many candidates per image", runtime=True),
    Parameter("min_score", DEFAULT_MIN_SCORE, "publish only candidates scoring >= this, in [0, 1]; the score is one "
              "minus the map's own estimate of how often a query from a place it does not hold would match as "
              "distinctly (calibrated per map by build_map), so 0.99 publishes what fewer than 1 unmapped place in "
              "100 would match", runtime=True),
    Parameter("exclude_recent_s", 30.0, "ignore keyframes stamped within this many seconds of the image", runtime=True),
    Parameter("exclude_within_m", 0.0, "ignore keyframes within this path length of the query (needs poses); 0 = off",
              runtime=True),
    Parameter("max_rate_hz", 0.0, "process at most this many images per second; 0 = as fast as possible", runtime=True),
    Parameter("verify", False, "geometric verification: a loop needs min_inliers ORB matches consistent with one "
              "two-view geometry; off by default (it rejects most true loops in thumbnails and flat-shaded scenes); "
              "turn it on for camera-sized textured images, and for the relative pose"),
    Parameter("min_inliers", DEFAULT_MIN_INLIERS, "verification: RANSAC inliers a candidate needs to be verified",
              runtime=True),
    Parameter("auto_verify_min_side", AUTO_VERIFY_MIN_SIDE, "with temporal consistency, images whose smaller side has "
              "at least this many pixels (camera-sized) get their best candidate verified whatever verify says, and "
              "its inliers raise its score when a look-alike of another place in the map would rarely give as "
              "many; 0 = never"),
    Parameter("camera_info_topic", "", "sensor_msgs/CameraInfo of the camera: verification then fits the essential "
              "matrix and fills the relative pose; empty = camera_intrinsics or none (fundamental matrix, no pose)"),
    Parameter("camera_intrinsics", "", "'fx fy cx cy' in pixels, used when camera_info_topic is empty"),
    Parameter("temporal_consistency", True, "a loop needs the previous temporal_window images to match the map in "
              "order: along its path with poses, along its keyframe order without; the score is then that of the "
              "sequence, calibrated on the map's own sequences (tscm_ros/detect/temporal.py, sequence_null.py)"),
    Parameter("temporal_window", 5, "temporal consistency: images in the sequence, the current one included (>= 2)"),
    Parameter("temporal_long_window", 20, "temporal consistency: a second, longer sequence scored beside it (each with "
              "its own calibration; a candidate takes the stronger, its false-alarm rate doubled); 0 = off"),
    Parameter("temporal_tolerance_m", 3.0, "temporal consistency with poses: how far from where the odometry puts an "
              "earlier image its keyframe may be, metres"),
    Parameter("publish_unverified", False, "also publish candidates that failed verification or temporal "
              "consistency, with their flags (for debugging); normally only accepted loops are published",
              runtime=True),
    Parameter("mapping", False, "online mapping: add keyframes while driving; save on shutdown, on ~/save_map and "
              "by autosave"),
    Parameter("keyframe_min_distance_m", 2.0, "mapping: a new keyframe needs this much travel since the last one"),
    Parameter("keyframe_min_interval_s", 1.0, "mapping: a new keyframe needs this much time since the last one"),
    Parameter("map_save_path", "", "mapping: where the map is saved; empty = map_path"),
    Parameter("vocabulary_keyframes", MAPPING_FIT_KEYFRAMES, "mapping from an empty map: the map fits its own "
              "vocabulary once it has this many keyframes (the generic one until then)"),
    Parameter("autosave_keyframes", 50, "mapping: save the map (atomically, in the background) once this many "
              "keyframes were added since the last save; 0 = off"),
    Parameter("autosave_period_s", 60.0, "mapping: save the map this many seconds after the first unsaved "
              "keyframe, if autosave_keyframes did not come first; 0 = off"),
    Parameter("loop_markers", True, "publish visualization_msgs/MarkerArray on ~/loop_markers: the map's keyframe "
              "trajectory and a line per published loop closure, coloured by score (RViz: config/loop_markers.rviz)"),
    Parameter("diagnostics_period_s", 1.0, "period of the /diagnostics status"),
]
RUNTIME_PARAMETERS = frozenset(p.name for p in PARAMETERS if p.runtime)
_EXPECTED = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def declare_parameters(node: Node, table: list[Parameter] | None = None) -> dict:
    """Declare every parameter of ``table`` (default: the place recognition node's ``PARAMETERS``) on ``node``
    (read-only unless changeable at run time) and return their values.

    An integer given for a number (``min_score: 1`` in YAML, ``-p min_score:=1``) is taken as that number;
    any other type mismatch is a ConfigError naming the parameter.
    """
    table = PARAMETERS if table is None else table
    overrides = getattr(node, "_parameter_overrides", {})  # rclpy: -p, --params-file and constructor overrides
    for parameter in table:
        descriptor = ParameterDescriptor(description=parameter.description, read_only=not parameter.runtime)
        override = overrides.get(parameter.name)
        given = None if override is None else override.value
        try:
            if isinstance(parameter.default, float) and type(given) is int:
                node.declare_parameter(parameter.name, float(given), descriptor, ignore_override=True)
            else:
                node.declare_parameter(parameter.name, parameter.default, descriptor)
        except InvalidParameterTypeException:
            raise ConfigError(f"parameter {parameter.name}: expected {_EXPECTED[type(parameter.default)]}, "
                              f"got {given!r}") from None
    return {parameter.name: node.get_parameter(parameter.name).value for parameter in table}


def integers_as_numbers(changes: list[RosParameter]) -> list[RosParameter]:
    """``ros2 param set NODE min_score 1``: an integer for a number parameter is that number."""
    defaults = {parameter.name: parameter.default for parameter in PARAMETERS}
    return [RosParameter(change.name, value=float(change.value))
            if isinstance(defaults.get(change.name), float) and change.type_ == RosParameter.Type.INTEGER
            else change for change in changes]


def min_period(max_rate_hz: float) -> float:
    """Seconds between the starts of two processed images; 0 = as fast as possible."""
    return 1.0 / max_rate_hz if max_rate_hz > 0 else 0.0


def matching_config(p: dict) -> MatchingConfig:
    return MatchingConfig(k=p["k"], min_score=p["min_score"], exclude_recent_s=p["exclude_recent_s"],
                          exclude_within_m=p["exclude_within_m"])


def check_finite(values: dict) -> None:
    """ConfigError naming the first number parameter in ``values`` that is NaN or infinite: no parameter of
    the node means anything at either."""
    for name, value in values.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"parameter {name} must be a finite number, got {value}")


def check_runtime_values(values: dict) -> None:
    """ConfigError when the run-time parameters' ``values`` are invalid (as at start-up)."""
    check_finite(values)
    if values["max_rate_hz"] < 0:
        raise ConfigError(f"parameter max_rate_hz must be >= 0, got {values['max_rate_hz']}")
    matching_config(values)
    VerificationConfig(min_inliers=values["min_inliers"])


def stages(p: dict) -> tuple[VerificationConfig | None, TemporalConfig | None, CameraIntrinsics | None]:
    """The verification and temporal-consistency stages the parameters switch on, and the fixed intrinsics."""
    verification = VerificationConfig(min_inliers=p["min_inliers"]) if p["verify"] else None
    temporal = (TemporalConfig(window=p["temporal_window"], long_window=p["temporal_long_window"],
                               tolerance_m=p["temporal_tolerance_m"])
                if p["temporal_consistency"] else None)
    try:
        intrinsics = CameraIntrinsics.from_values(str(p["camera_intrinsics"]).replace(",", " ").split())
    except (ValueError, ConfigError) as exc:
        raise ConfigError(f"parameter camera_intrinsics: expected 'fx fy cx cy' in pixels, "
                          f"got {p['camera_intrinsics']!r} ({exc})") from exc
    return verification, temporal, intrinsics


def validate(p: dict) -> None:
    """ConfigError naming the first invalid start-up parameter in ``p`` (every parameter's value)."""
    check_finite(p)
    if p["device"] not in ("auto", "cpu", "cuda") and not str(p["device"]).startswith("cuda:"):
        raise ConfigError(f"parameter device: expected auto, cpu or cuda, got {p['device']!r}")
    if p["qos"] not in ("sensor_data", "reliable"):
        raise ConfigError(f"parameter qos: expected sensor_data or reliable, got {p['qos']!r}")
    if p["pose_type"] not in POSE_TYPES:
        raise ConfigError(f"parameter pose_type: expected one of {', '.join(POSE_TYPES)}, got {p['pose_type']!r}")
    if p["pose_qos"] not in POSE_QOS:
        raise ConfigError(f"parameter pose_qos: expected {' or '.join(POSE_QOS)}, got {p['pose_qos']!r}")
    if not p["image_topic"]:
        raise ConfigError("parameter image_topic must not be empty")
    for name in ("auto_verify_min_side", "pose_max_gap_s", "keyframe_min_distance_m", "keyframe_min_interval_s",
                 "autosave_keyframes", "autosave_period_s"):
        if p[name] < 0:
            raise ConfigError(f"parameter {name} must be >= 0, got {p[name]}")
    if p["pose_history_s"] <= p["pose_max_gap_s"]:
        raise ConfigError(f"parameter pose_history_s ({p['pose_history_s']}) must be greater than pose_max_gap_s "
                          f"({p['pose_max_gap_s']})")
    if p["diagnostics_period_s"] <= 0:
        raise ConfigError(f"parameter diagnostics_period_s must be > 0, got {p['diagnostics_period_s']}")
    if not p["map_path"] and not p["mapping"]:
        raise ConfigError("parameter map_path is empty: give a map built by build_map (map:=...), "
                          "or set mapping:=true to build one while driving")
    if p["vocabulary_keyframes"] < MIN_FIT_KEYFRAMES:
        raise ConfigError(f"parameter vocabulary_keyframes must be >= {MIN_FIT_KEYFRAMES}, "
                          f"got {p['vocabulary_keyframes']}")
    if p["mapping"] and not (p["map_save_path"] or p["map_path"]):
        raise ConfigError("mapping is on but neither map_save_path nor map_path says where to save the map")
    check_runtime_values(p)
    stages(p)
