"""The package's ROS side for real: generated messages, DDS transport, install layout, rclpy-free core."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rclpy
from rclpy.executors import SingleThreadedExecutor
from rclpy.qos import qos_profile_sensor_data
from rclpy_support import isolated_context, spin_until
from sensor_msgs.msg import Image
from tscm_ros.msg import LoopCandidate, LoopCandidates

EXECUTABLES = ["place_recognition_node", "build_map", "extract_dataset", "train", "evaluate", "simulate_route",
               "export_model"]


@pytest.fixture
def ros_nodes():
    context = isolated_context()
    executor = SingleThreadedExecutor(context=context)
    talker = rclpy.create_node("test_talker", context=context)
    listener = rclpy.create_node("test_listener", context=context)
    executor.add_node(talker)
    executor.add_node(listener)
    yield executor, talker, listener
    executor.shutdown()
    talker.destroy_node()
    listener.destroy_node()
    context.try_shutdown()


def _exchange(executor, talker, listener, msg_type, topic, message, qos=10):
    received = []
    listener.create_subscription(msg_type, topic, received.append, qos)
    publisher = talker.create_publisher(msg_type, topic, qos)
    assert spin_until(executor, lambda: publisher.get_subscription_count() > 0), "no DDS discovery"
    publisher.publish(message)
    assert spin_until(executor, lambda: len(received) > 0), f"nothing received on {topic}"
    return received[0]


def test_loop_candidates_cross_dds(ros_nodes):
    message = LoopCandidates()
    message.header.stamp.sec = 12
    message.header.stamp.nanosec = 345
    message.header.frame_id = "camera"
    message.query_pose_valid = True
    message.query_pose.position.x = 1.5
    message.query_pose_frame_id = "odom"
    message.map_frame_id = "map"
    message.model_fingerprint = "abc123"
    for keyframe_id, score in [(7, 0.9), (3, 0.4)]:
        candidate = LoopCandidate(keyframe_id=keyframe_id, score=score, distance=2.0 * (1.0 - score))
        candidate.keyframe_stamp.sec = keyframe_id
        candidate.keyframe_pose_valid = True
        candidate.keyframe_pose.position.y = float(keyframe_id)
        message.candidates.append(candidate)

    got = _exchange(*ros_nodes, LoopCandidates, "/tscm/loop_candidates", message)

    assert (got.header.stamp.sec, got.header.stamp.nanosec, got.header.frame_id) == (12, 345, "camera")
    assert got.query_pose_valid and got.query_pose.position.x == 1.5
    assert (got.query_pose_frame_id, got.map_frame_id, got.model_fingerprint) == ("odom", "map", "abc123")
    assert [c.keyframe_id for c in got.candidates] == [7, 3]
    assert got.candidates[0].score == pytest.approx(0.9)
    assert got.candidates[1].distance == pytest.approx(1.2)
    assert got.candidates[1].keyframe_pose.position.y == 3.0


def test_image_cross_dds_sensor_qos(ros_nodes):
    pixels = np.random.default_rng(0).integers(0, 256, size=(480, 640, 3), dtype=np.uint8)
    message = Image(height=480, width=640, encoding="rgb8", step=640 * 3, data=pixels.tobytes())
    message.header.frame_id = "camera"

    got = _exchange(*ros_nodes, Image, "/camera/image_raw", message, qos=qos_profile_sensor_data)

    assert (got.height, got.width, got.encoding, got.step) == (480, 640, "rgb8", 1920)
    received = np.frombuffer(bytes(got.data), dtype=np.uint8).reshape(480, 640, 3)
    np.testing.assert_array_equal(received, pixels)


def test_install_layout_like_a_ros_workspace():
    prefixes = [Path(p) for p in os.environ.get("AMENT_PREFIX_PATH", "").split(os.pathsep) if p]
    prefix = next((p for p in prefixes if (p / "share/ament_index/resource_index/packages/tscm_ros").exists()), None)
    assert prefix is not None, f"no prefix with tscm_ros in AMENT_PREFIX_PATH={prefixes}"
    for exe in EXECUTABLES:
        path = prefix / "lib/tscm_ros" / exe
        assert path.exists() and os.access(path, os.X_OK), f"{path} missing or not executable"
    assert (prefix / "share/tscm_ros/launch/place_recognition.launch.py").exists()
    assert (prefix / "share/tscm_ros/package.xml").exists()


@pytest.mark.parametrize("exe", EXECUTABLES)
def test_executable_help(exe):
    prefix = next(p for p in os.environ["AMENT_PREFIX_PATH"].split(os.pathsep)
                  if (Path(p) / "lib/tscm_ros" / exe).exists())
    result = subprocess.run([str(Path(prefix) / "lib/tscm_ros" / exe), "--help"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout and len(result.stdout.splitlines()) > 3


BLOCK_RCLPY = """
import importlib.abc, sys
class BlockRos(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split('.')[0] in ('rclpy', 'rosidl_runtime_py', 'sensor_msgs', 'std_msgs'):
            raise ImportError(f'{name} is blocked: the core must not need ROS')
sys.meta_path.insert(0, BlockRos())
import pkgutil, importlib, tscm_ros
core = [m.name for m in pkgutil.walk_packages(tscm_ros.__path__, 'tscm_ros.')
        if not m.name.startswith(('tscm_ros.msg', 'tscm_ros.node', 'tscm_ros.cli.place_recognition_node',
                                  'tscm_ros._', 'tscm_ros.tscm_ros_s'))]
for name in core:
    importlib.import_module(name)
print(len(core), 'core modules')
"""


def test_core_imports_without_rclpy():
    result = subprocess.run([sys.executable, "-c", BLOCK_RCLPY], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    count = int(result.stdout.split()[0])
    assert count >= 3


READMES_CHECK = """
import rclpy
from rclpy.serialization import deserialize_message, serialize_message
from tscm_ros.msg import LoopCandidate, LoopCandidates
import tscm_ros
message = LoopCandidates(candidates=[LoopCandidate(keyframe_id=7, score=0.5)])
assert deserialize_message(serialize_message(message), LoopCandidates) == message  # type support loads
print(tscm_ros.__file__)
"""


def test_messages_import_from_the_repository_root():
    """Python started in the repository root imports the source tscm_ros/ (no generated msg subpackage);
    the messages must still come from the installed package (the README's own check)."""
    repo = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", READMES_CHECK], cwd=repo, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()).resolve() == repo / "tscm_ros/__init__.py"  # the source tree, not install/
