"""pose_graph_node: the back-end behind the place recognition node.

Odometry in, loop candidates (/tscm/loop_candidates) in; out: the corrected path (nav_msgs/Path on
/tscm/corrected_path, at most every path_period_s) and the map -> odometry-frame transform
(geometry_msgs/TransformStamped on /tscm/map_to_odom after every odometry message, and on /tf where the ROS
install has tf2_msgs). The graph is tscm_ros/graph/pose_graph.py; this module moves messages.

Every candidate of a LoopCandidates message is a loop: the place recognition node publishes only accepted
candidates, unless publish_unverified is on (a debugging setting; leave it off behind a back-end). Bad input is
logged once per kind, counted and skipped, never fatal: odometry with NaN or infinite values, out of order or
jumping implausibly, candidates whose keyframe has no pose, whose map frame is not the odometry frame, or
whose stamp the odometry does not cover, and any failure of the back-end itself (logged, never fatal).
"""

from __future__ import annotations

from collections import Counter

from geometry_msgs.msg import PoseStamped, TransformStamped
from nav_msgs.msg import Path
from rclpy.node import Node
from rclpy.qos import QoSProfile

from tscm_ros.errors import ConfigError
from tscm_ros.graph.pose_graph import KERNELS, PoseGraph, PoseGraphConfig
from tscm_ros.io.geometry import pose_from_message, stamp_to_ns
from tscm_ros.msg import LoopCandidates
from tscm_ros.node.messages import fill_pose
from tscm_ros.node.parameters import POSE_QOS, POSE_TYPES, Parameter, check_finite, declare_parameters
from tscm_ros.node.spin import spin_until_signal

try:  # /tf needs tf2_msgs, which every ROS install has and the pip wheels do not
    from tf2_msgs.msg import TFMessage
except ImportError:
    TFMessage = None

NODE_NAME = "tscm_pose_graph"
PATH_TOPIC = "/tscm/corrected_path"
TRANSFORM_TOPIC = "/tscm/map_to_odom"
_DEFAULTS = PoseGraphConfig()

PARAMETERS = [
    Parameter("odom_topic", "/odom", "the robot's odometry (type odom_type), in the frame the map was built in"),
    Parameter("odom_type", "odometry", "type on odom_topic: odometry, pose_stamped or pose_with_covariance_stamped"),
    Parameter("odom_qos", "sensor_data", "odometry subscription QoS: sensor_data (best effort) or reliable"),
    Parameter("loop_topic", "/tscm/loop_candidates", "tscm_ros/LoopCandidates from the place recognition node"),
    Parameter("map_frame", "map", "frame of the corrected path, parent of the map -> odometry transform"),
    Parameter("path_period_s", 1.0, "publish the corrected path at most this often (seconds)"),
    Parameter("node_spacing_m", _DEFAULTS.node_spacing_m, "a pose node per this much travel"),
    Parameter("node_spacing_rad", _DEFAULTS.node_spacing_rad, "... or per this much turn (radians)"),
    Parameter("odometry_sigma_per_m", _DEFAULTS.odometry_sigma_per_m,
              "odometry translation noise per metre travelled (metres)"),
    Parameter("odometry_rot_sigma_per_m", _DEFAULTS.odometry_rot_sigma_per_m,
              "odometry rotation noise per metre travelled (radians)"),
    Parameter("loop_sigma_m", _DEFAULTS.loop_sigma_m,
              "how far from its keyframe a loop's image may have been taken (metres, one sigma)"),
    Parameter("kernel", _DEFAULTS.kernel, f"robust kernel on the loops: {', '.join(KERNELS)}"),
    Parameter("kernel_width", _DEFAULTS.kernel_width, "robust kernel width, in sigmas"),
    Parameter("prior_sigma_m", _DEFAULTS.prior_sigma_m,
              "how sure the first odometry pose is where the map says (metres)"),
]
GRAPH_PARAMETERS = ("node_spacing_m", "node_spacing_rad", "odometry_sigma_per_m", "odometry_rot_sigma_per_m",
                    "loop_sigma_m", "kernel", "kernel_width", "prior_sigma_m")


def graph_config(p: dict) -> PoseGraphConfig:
    """The graph's configuration from the parameters; ConfigError naming the first bad one."""
    check_finite(p)
    if p["odom_type"] not in POSE_TYPES:
        raise ConfigError(f"parameter odom_type: expected one of {', '.join(POSE_TYPES)}, got {p['odom_type']!r}")
    if p["odom_qos"] not in POSE_QOS:
        raise ConfigError(f"parameter odom_qos: expected {' or '.join(POSE_QOS)}, got {p['odom_qos']!r}")
    if p["path_period_s"] <= 0:
        raise ConfigError(f"parameter path_period_s must be > 0, got {p['path_period_s']}")
    for name in ("odom_topic", "loop_topic", "map_frame"):
        if not p[name]:
            raise ConfigError(f"parameter {name} must not be empty")
    try:
        return PoseGraphConfig(**{name: p[name] for name in GRAPH_PARAMETERS})
    except ConfigError as exc:
        raise ConfigError(f"parameter {exc}".replace("parameter pose graph ", "parameter ")) from None


def _first_line(exc: Exception) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"


class PoseGraphNode(Node):
    """The ROS 2 node; ``PoseGraph`` does the work."""

    def __init__(self, **node_kwargs) -> None:
        super().__init__(NODE_NAME, **node_kwargs)
        p = declare_parameters(self, PARAMETERS)
        self.graph = PoseGraph(graph_config(p))
        self._map_frame = p["map_frame"]
        self._odom_frame = ""
        self._logged: set[str] = set()
        self.skipped: Counter[str] = Counter()
        self._published_state = (0, 0)
        self.create_subscription(POSE_TYPES[p["odom_type"]], p["odom_topic"], self._on_odometry,
                                 POSE_QOS[p["odom_qos"]])
        self.create_subscription(LoopCandidates, p["loop_topic"], self._on_loops, QoSProfile(depth=100))
        self._path = self.create_publisher(Path, PATH_TOPIC, 1)
        self._transform = self.create_publisher(TransformStamped, TRANSFORM_TOPIC, 10)
        self._tf = None if TFMessage is None else self.create_publisher(TFMessage, "/tf", 100)
        self.create_timer(p["path_period_s"], self._publish_path)
        self.get_logger().info(
            f"pose graph on {p['odom_topic']} and {p['loop_topic']}: corrected path on {PATH_TOPIC}, "
            f"{self._map_frame} -> odometry frame on {TRANSFORM_TOPIC}"
            + (" and /tf" if self._tf is not None else " (no tf2_msgs in this ROS install: not on /tf)"))

    def _skip(self, reason: str) -> None:
        self.skipped[reason] += 1
        if reason not in self._logged:
            self._logged.add(reason)
            self.get_logger().warning(f"skipped: {reason} (logged once; counted)")

    def _on_odometry(self, message) -> None:
        pose = pose_from_message(message)
        if pose is None:
            self._skip("odometry with NaN or infinite values")
            return
        self._odom_frame = message.header.frame_id
        stamp_ns = stamp_to_ns(message.header.stamp)
        try:
            self.graph.add_odometry(stamp_ns, pose)
        except Exception as exc:  # the solver, or a fault of ours: logged and counted, never fatal
            self._skip(f"the back-end failed on an odometry message ({_first_line(exc)})")
            return
        self._log_graph_skips()
        if self.graph.newest_odometry_ns == stamp_ns:
            self._publish_transform(message.header.stamp)

    def _on_loops(self, message: LoopCandidates) -> None:
        stamp_ns = stamp_to_ns(message.header.stamp)
        for candidate in message.candidates:
            if not candidate.keyframe_pose_valid:
                self._skip("loop to a keyframe without a pose")
                continue
            if message.map_frame_id and self._odom_frame and message.map_frame_id != self._odom_frame:
                self._skip(f"loop in map frame {message.map_frame_id!r}, odometry in {self._odom_frame!r}: "
                           "the map must be built in the odometry's frame")
                continue
            p = candidate.keyframe_pose.position
            try:
                self.graph.add_loop(stamp_ns, (p.x, p.y, p.z))
            except Exception as exc:  # as for odometry
                self._skip(f"the back-end failed on a loop ({_first_line(exc)})")
        self._log_graph_skips()

    def _log_graph_skips(self) -> None:
        for reason, count in self.graph.skipped.items():
            if count and reason not in self._logged:
                self._logged.add(reason)
                self.get_logger().warning(f"skipped: {reason} (logged once; counted)")

    def _publish_transform(self, stamp) -> None:
        transform = self.graph.map_to_odom()
        if transform is None or self._odom_frame in ("", self._map_frame):
            return
        message = TransformStamped()
        message.header.stamp = stamp
        message.header.frame_id = self._map_frame
        message.child_frame_id = self._odom_frame
        t = message.transform
        t.translation.x, t.translation.y, t.translation.z = (float(v) for v in transform.position)
        t.rotation.x, t.rotation.y, t.rotation.z, t.rotation.w = (float(v) for v in transform.orientation)
        self._transform.publish(message)
        if self._tf is not None:
            self._tf.publish(TFMessage(transforms=[message]))

    def _publish_path(self) -> None:
        state = (len(self.graph), self.graph.loops)
        if not state[0] or state == self._published_state:
            return
        self._published_state = state
        stamps, poses = self.graph.path()
        message = Path()
        message.header.stamp = self.get_clock().now().to_msg()
        message.header.frame_id = self._map_frame
        for stamp_ns, pose in zip(stamps, poses):
            item = PoseStamped()
            item.header.frame_id = self._map_frame
            item.header.stamp.sec, item.header.stamp.nanosec = divmod(int(stamp_ns), 1_000_000_000)
            fill_pose(item.pose, pose)
            message.poses.append(item)
        self._path.publish(message)

    def statistics(self) -> dict:
        """Nodes, loops, and what was skipped, by reason."""
        return {"nodes": len(self.graph), "loops": self.graph.loops,
                "skipped": dict(self.skipped + self.graph.skipped)}

    def shutdown(self) -> None:
        self.get_logger().info(f"pose graph: {self.statistics()}")


def main(args=None) -> int:
    """Run the node until SIGINT or SIGTERM; a bad parameter is one clear error line and exit code 2."""
    return spin_until_signal(NODE_NAME, PoseGraphNode, args)
