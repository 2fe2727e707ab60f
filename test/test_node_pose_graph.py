"""The pose-graph back-end's node over real DDS: odometry and loop candidates in, the corrected path and the
map -> odom transform out; bad input is counted and skipped; behind the place recognition node on a short
rendered route with drifting odometry."""

from __future__ import annotations

import math

import numpy as np
import rclpy
from geometry_msgs.msg import TransformStamped
from nav_msgs.msg import Odometry, Path
from node_support import image_message
from rclpy.executors import SingleThreadedExecutor
from rclpy.parameter import Parameter
from rclpy.qos import qos_profile_sensor_data
from rclpy_support import isolated_context, spin_until
from tscm_ros.msg import LoopCandidate, LoopCandidates

from tscm_ros.evaluate.trajectory import OdometryDrift, ate_rmse
from tscm_ros.io.geometry import Pose
from tscm_ros.map.keyframe_map import KeyframeMap
from tscm_ros.node.messages import fill_pose
from tscm_ros.node.node import OUTPUT_TOPIC, PlaceRecognitionNode
from tscm_ros.node.pose_graph_node import PATH_TOPIC, TRANSFORM_TOPIC, PoseGraphNode

IDENTITY = np.array([0.0, 0.0, 0.0, 1.0])


def _odometry(stamp_ns: int, pose: Pose, frame_id: str = "odom") -> Odometry:
    message = Odometry()
    message.header.stamp.sec, message.header.stamp.nanosec = divmod(stamp_ns, 1_000_000_000)
    message.header.frame_id = frame_id
    fill_pose(message.pose.pose, pose)
    return message


def _loops(stamp_ns: int, positions, map_frame_id: str = "odom", valid: bool = True) -> LoopCandidates:
    message = LoopCandidates(map_frame_id=map_frame_id)
    message.header.stamp.sec, message.header.stamp.nanosec = divmod(stamp_ns, 1_000_000_000)
    for i, position in enumerate(positions):
        candidate = LoopCandidate(keyframe_id=i, keyframe_pose_valid=valid, score=1.0)
        fill_pose(candidate.keyframe_pose, Pose(np.asarray(position, dtype=np.float64), IDENTITY))
        message.candidates.append(candidate)
    return message


class BackEnd:
    """The back-end node and a tester publishing odometry and loops and collecting what it publishes."""

    def __init__(self, context, executor, **overrides):
        self.node = PoseGraphNode(context=context, parameter_overrides=[Parameter(k, value=v)
                                                                        for k, v in overrides.items()])
        self.tester = rclpy.create_node("tscm_pose_graph_tester", context=context)
        self.paths: list[Path] = []
        self.transforms: list[TransformStamped] = []
        self.tester.create_subscription(Path, PATH_TOPIC, self.paths.append, 10)
        self.tester.create_subscription(TransformStamped, TRANSFORM_TOPIC, self.transforms.append, 100)
        self.odometry = self.tester.create_publisher(Odometry, "/odom", qos_profile_sensor_data)
        self.loops = self.tester.create_publisher(LoopCandidates, OUTPUT_TOPIC, 100)
        executor.add_node(self.node)
        executor.add_node(self.tester)
        assert spin_until(executor, lambda: self.odometry.get_subscription_count() > 0
                          and self.loops.get_subscription_count() > 0
                          and self.tester.count_publishers(PATH_TOPIC) > 0)

    def close(self):
        self.node.shutdown()
        self.node.destroy_node()
        self.tester.destroy_node()


def test_loops_over_dds_move_the_path_and_bad_input_is_counted_never_fatal():
    context = isolated_context()
    executor = SingleThreadedExecutor(context=context)
    back_end = BackEnd(context, executor, path_period_s=0.2)
    try:
        for i in range(100):  # 100 m straight along x, one odometry message per metre
            back_end.odometry.publish(_odometry(i * 10**9, Pose(np.array([float(i), 0.0, 0.0]), IDENTITY)))
            executor.spin_once(timeout_sec=0.01)
        assert spin_until(executor, lambda: len(back_end.node.graph) == 100)
        assert spin_until(executor, lambda: len(back_end.transforms) >= 90)
        assert back_end.transforms[-1].header.frame_id == "map" and back_end.transforms[-1].child_frame_id == "odom"
        assert abs(back_end.transforms[-1].transform.translation.y) < 1e-6

        # bad input: NaN odometry, a keyframe without pose, a map in another frame, a stamp before the graph
        back_end.odometry.publish(_odometry(100 * 10**9, Pose(np.array([math.nan, 0.0, 0.0]), IDENTITY)))
        back_end.loops.publish(_loops(90 * 10**9, [[90.0, 2.0, 0.0]], valid=False))
        back_end.loops.publish(_loops(91 * 10**9, [[91.0, 2.0, 0.0]], map_frame_id="world"))
        back_end.loops.publish(_loops(-5 * 10**9, [[0.0, 2.0, 0.0]]))
        expected = {"odometry with NaN or infinite values": 1, "loop to a keyframe without a pose": 1,
                    "before the first odometry": 1}
        assert spin_until(executor, lambda: all(back_end.node.statistics()["skipped"].get(k) == v
                                                for k, v in expected.items())
                          and len(back_end.node.statistics()["skipped"]) == 4)
        assert back_end.node.graph.loops == 0

        # two loops that agree: the map says the robot is 2 m to the left of its odometry
        back_end.loops.publish(_loops(90 * 10**9, [[90.0, 2.0, 0.0]]))
        back_end.loops.publish(_loops(99 * 10**9, [[99.0, 2.0, 0.0]]))
        assert spin_until(executor, lambda: back_end.node.graph.loops == 2)
        back_end.odometry.publish(_odometry(100 * 10**9, Pose(np.array([100.0, 0.0, 0.0]), IDENTITY)))
        assert spin_until(executor, lambda: back_end.paths and len(back_end.paths[-1].poses) == 101
                          and back_end.paths[-1].poses[-1].pose.position.y > 0.5)
        assert back_end.paths[-1].header.frame_id == "map"
        assert spin_until(executor, lambda: abs(back_end.transforms[-1].transform.rotation.z) > 1e-4)
    finally:
        back_end.close()
        executor.shutdown()
        context.try_shutdown()


def test_behind_the_place_recognition_node_on_a_rendered_route(reference_map, route_query):
    """Both nodes over DDS: the query route's images, and its poses drifted as odometry; the back-end takes
    every loop the node publishes at its defaults."""
    from tscm_ros.io.bag import FrameSource

    frames = [frame for frame in FrameSource(route_query).open() if frame.pose is not None]
    frame_id = KeyframeMap.load(reference_map).frame_id
    drifted = OdometryDrift(heading_bias_deg_per_m=0.1, seed=0).apply([frame.pose for frame in frames])
    context = isolated_context()
    executor = SingleThreadedExecutor(context=context)
    recogniser = PlaceRecognitionNode(context=context, parameter_overrides=[
        Parameter("map_path", value=str(reference_map)), Parameter("pose_topic", value="/odom"),
        Parameter("exclude_recent_s", value=0.0)])
    executor.add_node(recogniser)
    back_end = BackEnd(context, executor)
    answers: list[LoopCandidates] = []
    back_end.tester.create_subscription(LoopCandidates, OUTPUT_TOPIC, answers.append, 100)
    images = back_end.tester.create_publisher(type(image_message(frames[0].image, 0)), "/camera/image_raw", 10)
    try:
        assert spin_until(executor, lambda: images.get_subscription_count() > 0)
        for frame, pose in zip(frames, drifted):
            for offset in (-10**8, 10**8):  # odometry around the image, as a 10 Hz stream gives
                back_end.odometry.publish(_odometry(frame.stamp_ns + offset, pose, frame_id))
            assert spin_until(executor, lambda: back_end.node.graph.newest_odometry_ns == frame.stamp_ns + 10**8)
            count = len(answers)
            images.publish(image_message(frame.image, frame.stamp_ns))
            assert spin_until(executor, lambda: len(answers) > count, timeout_s=60)
        published = sum(len(answer.candidates) for answer in answers)
        assert published > 0
        statistics = back_end.node.statistics()
        assert not statistics["skipped"]
        assert statistics["loops"] > 0
        assert statistics["nodes"] > 0.5 * len(frames)
        truth = np.array([frame.pose.position for frame in frames])
        corrected = back_end.node.graph.correct([f.stamp_ns for f in frames], drifted)
        assert ate_rmse(corrected, truth) < ate_rmse(np.array([p.position for p in drifted]), truth)
    finally:
        back_end.close()
        recogniser.shutdown()
        recogniser.destroy_node()
        executor.shutdown()
        context.try_shutdown()
