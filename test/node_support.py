"""What the node's DDS tests share: the node under test with a tester node in one process, image and
odometry messages, and the installed executable with a DDS domain of its own."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import rclpy
from nav_msgs.msg import Odometry
from rclpy.executors import SingleThreadedExecutor
from rclpy.parameter import Parameter
from rclpy_support import isolated_context, spin_until
from sensor_msgs.msg import Image
from tscm_ros.msg import LoopCandidates

from tscm_ros.node.node import OUTPUT_TOPIC, PlaceRecognitionNode


class Harness:
    """The node under test plus a test node that publishes images and collects LoopCandidates."""

    def __init__(self, overrides: dict, image_type=Image, cli_args: list[str] | None = None):
        self.context = isolated_context()
        self.executor = SingleThreadedExecutor(context=self.context)
        self.node = PlaceRecognitionNode(
            context=self.context, cli_args=cli_args,
            parameter_overrides=[Parameter(name, value=value) for name, value in overrides.items()])
        self.tester = rclpy.create_node("tscm_tester", context=self.context)
        self.results: list[LoopCandidates] = []
        self.tester.create_subscription(LoopCandidates, OUTPUT_TOPIC, self.results.append, 100)
        self.publisher = self.tester.create_publisher(image_type, "/camera/image_raw", 10)
        self.executor.add_node(self.node)
        self.executor.add_node(self.tester)
        assert spin_until(self.executor, lambda: self.publisher.get_subscription_count() > 0
                          and self.tester.count_publishers(OUTPUT_TOPIC) > 0)

    def send(self, message, wait: bool = True) -> LoopCandidates | None:
        """Publish one image; with ``wait``, spin until the answer for its stamp arrives."""
        self.publisher.publish(message)
        if not wait:
            return None
        stamp = (message.header.stamp.sec, message.header.stamp.nanosec)

        def answered() -> bool:
            return any((r.header.stamp.sec, r.header.stamp.nanosec) == stamp for r in self.results)

        assert spin_until(self.executor, answered, timeout_s=60), f"no answer for image stamped {stamp}"
        return next(r for r in self.results if (r.header.stamp.sec, r.header.stamp.nanosec) == stamp)

    def set_parameters(self, **values) -> list:
        """Set the node's parameters through its parameter service over DDS, as `ros2 param set` does."""
        from rclpy.parameter_client import AsyncParameterClient

        client = AsyncParameterClient(self.tester, self.node.get_fully_qualified_name())
        assert spin_until(self.executor, lambda: client.services_are_ready())
        future = client.set_parameters([Parameter(name, value=value) for name, value in values.items()])
        assert spin_until(self.executor, future.done)
        return future.result().results

    def close(self):
        self.node.shutdown()
        self.executor.shutdown()
        self.node.destroy_node()
        self.tester.destroy_node()
        self.context.try_shutdown()


def image_message(rgb: np.ndarray, stamp_ns: int) -> Image:
    message = Image(height=rgb.shape[0], width=rgb.shape[1], encoding="rgb8", step=rgb.shape[1] * 3,
                    data=rgb.tobytes())
    message.header.stamp.sec, message.header.stamp.nanosec = divmod(stamp_ns, 1_000_000_000)
    message.header.frame_id = "camera"
    return message


# Global retrieval alone: one image, one answer (verification and temporal consistency have their own tests).
RETRIEVAL_ONLY = {"verify": False, "temporal_consistency": False}


def node_command(*ros_args: str) -> list[str]:
    """The installed executable, as `ros2 run tscm_ros place_recognition_node` starts it."""
    prefix = next(p for p in os.environ["AMENT_PREFIX_PATH"].split(os.pathsep)
                  if (Path(p) / "lib/tscm_ros/place_recognition_node").exists())
    return [str(Path(prefix) / "lib/tscm_ros/place_recognition_node"), "--ros-args", *ros_args]


def node_env() -> dict:
    return {**os.environ, "ROS_DOMAIN_ID": str(1 + (os.getpid() + 50) % 100),
            "ROS_AUTOMATIC_DISCOVERY_RANGE": "LOCALHOST"}


def odometry(stamp_ns: int, x: float) -> Odometry:
    message = Odometry()
    message.header.stamp.sec, message.header.stamp.nanosec = divmod(stamp_ns, 1_000_000_000)
    message.header.frame_id = "odom"
    message.pose.pose.position.x = x
    message.pose.pose.orientation.w = 1.0
    return message
