"""The node on a robot, over real DDS: mapping that survives kill -9 (autosave), camera-sized images between
processes, images lost on the way reported on /diagnostics, and the RViz markers of the loops it publishes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
from nav_msgs.msg import Odometry
from node_support import RETRIEVAL_ONLY, Harness, image_message, node_command, odometry
from rclpy.executors import SingleThreadedExecutor
from rclpy.qos import DurabilityPolicy, QoSProfile, qos_profile_sensor_data
from rclpy_support import isolated_context, spin_until
from sensor_msgs.msg import Image
from tscm_ros.msg import LoopCandidates
from visualization_msgs.msg import Marker, MarkerArray

from tscm_ros.describe.describer import DEFAULT_MODEL, describer_for
from tscm_ros.map.building import describer_for_map
from tscm_ros.map.keyframe_map import KeyframeMap
from tscm_ros.node.markers import score_colour
from tscm_ros.node.node import OUTPUT_TOPIC

REPO = Path(__file__).resolve().parents[1]
PROFILE = REPO / "config" / "fastdds_large_images.xml"


class Observer:
    """A node in this process, on the DDS domain of ``isolated_context`` (which ``same_domain_env`` gives the
    processes it starts), collecting the node's /diagnostics values and its LoopCandidates."""

    def __init__(self) -> None:
        self.context = isolated_context()
        self.node = rclpy.create_node("tscm_observer", context=self.context)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self.values: dict[str, str] = {}
        self.answers: list[LoopCandidates] = []
        self.node.create_subscription(DiagnosticArray, "/diagnostics", self._on_diagnostics, 10)
        self.node.create_subscription(LoopCandidates, OUTPUT_TOPIC, self.answers.append, 100)

    def _on_diagnostics(self, message: DiagnosticArray) -> None:
        for status in message.status:
            self.values.update({value.key: value.value for value in status.values})

    def close(self) -> None:
        self.executor.shutdown()
        self.node.destroy_node()
        self.context.try_shutdown()


def same_domain_env(**extra: str) -> dict:
    return {**os.environ, "ROS_DOMAIN_ID": str(1 + os.getpid() % 100), "ROS_AUTOMATIC_DISCOVERY_RANGE": "LOCALHOST",
            "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]), **extra}


def stop(process: subprocess.Popen, signum: int = signal.SIGINT) -> None:
    if process.poll() is None:
        process.send_signal(signum)
    try:
        process.wait(timeout=120)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


# ----- mapping mode: autosave ------------------------------------------------------------------------

def test_a_mapping_node_killed_with_sigkill_loses_at_most_autosave_keyframes(tmp_path, reference_frames):
    """kill -9 of a mapping node: the map on disk loads, holds all but the last few keyframes, and matches."""
    every = 5
    map_dir = tmp_path / "mapping"
    node = subprocess.Popen(node_command(
        "-p", "mapping:=true", "-p", f"map_path:={map_dir}", "-p", "keyframe_min_distance_m:=0.0",
        "-p", "keyframe_min_interval_s:=0.0", "-p", "exclude_recent_s:=0.0", "-p", "verify:=false",
        "-p", "temporal_consistency:=false", "-p", f"autosave_keyframes:={every}", "-p", "autosave_period_s:=0.0",
        "-p", "vocabulary_keyframes:=20", "-p", "diagnostics_period_s:=0.2"),
        env=same_domain_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    observer = Observer()
    try:
        images = observer.node.create_publisher(Image, "/camera/image_raw", 10)
        assert spin_until(observer.executor, lambda: images.get_subscription_count() > 0, timeout_s=120)
        # until the node took one: a malformed image, which is counted and never becomes a keyframe
        while observer.values.get("images malformed", "0") == "0":
            images.publish(Image(height=0, width=0, encoding="rgb8"))
            assert spin_until(observer.executor, lambda: "images malformed" in observer.values, timeout_s=60)
            spin_until(observer.executor, lambda: observer.values["images malformed"] != "0", timeout_s=1)
        drive = reference_frames[:23]
        for frame in drive:  # each image answered, so each became a keyframe
            images.publish(image_message(frame.image, frame.stamp_ns))
            assert spin_until(observer.executor, lambda: any(
                a.header.stamp.sec * 10**9 + a.header.stamp.nanosec == frame.stamp_ns for a in observer.answers))

        def saved_all_but_the_last_few() -> bool:
            values = observer.values
            return (values.get("map keyframes") == str(len(drive))
                    and 0 <= int(values.get("keyframes unsaved", every + 1)) <= every)

        assert spin_until(observer.executor, saved_all_but_the_last_few, timeout_s=60), observer.values
        assert observer.values["autosave"] == f"every {every} keyframes" and observer.values["last map save"] != "never"
        node.send_signal(signal.SIGKILL)
        node.wait()
    finally:
        stop(node, signal.SIGKILL)
        observer.close()

    default = describer_for(DEFAULT_MODEL, device="cpu")
    saved = KeyframeMap.load(map_dir, expected_fingerprint=default.fingerprint)
    assert len(drive) - every <= len(saved) <= len(drive)
    describer = describer_for_map(default, saved)  # the map's vocabulary (fitted at 20 keyframes once saved)
    assert saved.vocabulary.source == ("map" if len(saved) >= 20 else "generic")
    best = saved.query(describer.describe([drive[7].image])[0], k=1)[0]
    assert best.keyframe_id == 7 and best.distance < 1e-4


# ----- camera-sized images between processes ------------------------------------------------------------

PUBLISHER = """
import sys, time
import numpy as np, rclpy
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import Image
count, rate, width, height = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
rclpy.init()
node = rclpy.create_node("camera")
publisher = node.create_publisher(Image, "/camera/image_raw", qos_profile_sensor_data)  # best effort, as cameras do
while publisher.get_subscription_count() == 0:
    time.sleep(0.05)
time.sleep(1.0)
pixels = np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8).tobytes()
start = time.monotonic()
for i in range(count):
    message = Image(height=height, width=width, encoding="rgb8", step=3 * width, data=pixels)
    message.header.stamp.sec, message.header.stamp.nanosec = 100, int(i * 1e9 / rate)
    publisher.publish(message)
    time.sleep(max(0.0, start + (i + 1) / rate - time.monotonic()))
time.sleep(2.0)
"""


def test_640x480_best_effort_images_arrive_between_processes_with_the_shipped_profile(reference_map):
    """Fast DDS's shared-memory segment (512 kB by default) cannot hold a 640x480 image, and best-effort
    fragments are lost; config/fastdds_large_images.xml, on both sides, makes it 32 MB."""
    env = same_domain_env(FASTDDS_DEFAULT_PROFILES_FILE=str(PROFILE))
    node = subprocess.Popen(node_command("-p", f"map_path:={reference_map}", "-p", "diagnostics_period_s:=0.2",
                                         *(arg for name, value in RETRIEVAL_ONLY.items()
                                           for arg in ("-p", f"{name}:={str(value).lower()}"))),
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    observer = Observer()
    count = 40
    try:
        assert spin_until(observer.executor, lambda: "images received" in observer.values, timeout_s=120)
        camera = subprocess.Popen([sys.executable, "-c", PUBLISHER, str(count), "5", "640", "480"], env=env)
        while camera.poll() is None:
            observer.executor.spin_once(timeout_sec=0.1)
        assert camera.returncode == 0
        assert spin_until(observer.executor, lambda: observer.values["images received"] == str(count), timeout_s=10), \
            observer.values
        assert observer.values["images lost (input stamp gaps)"] == "0"
        assert float(observer.values["input stamp rate (Hz)"]) == pytest.approx(5.0)
    finally:
        stop(node)
        observer.close()


def test_images_lost_on_the_way_are_reported_from_gaps_in_the_input_stamps(reference_map):
    h = Harness({"map_path": str(reference_map), "exclude_recent_s": 0.0, "min_score": 0.0, "diagnostics_period_s": 0.2,
                 **RETRIEVAL_ONLY})
    try:
        warnings = []
        h.tester.create_subscription(
            DiagnosticArray, "/diagnostics",
            lambda m: warnings.extend(s.message for s in m.status if s.level == DiagnosticStatus.WARN), 10)
        camera = np.random.default_rng(1).integers(0, 255, (480, 640, 3), dtype=np.uint8)
        skipped = {10, 11, 12, 20}  # a 10 Hz camera whose images 10-12 and 20 never arrive
        for i in sorted(set(range(26)) - skipped):
            h.send(image_message(camera, 50 * 10**9 + i * 10**8))
        stats = h.node.statistics()
        assert stats["images lost (input stamp gaps)"] == len(skipped)
        assert stats["input stamp rate (Hz)"] == pytest.approx(10.0)
        assert spin_until(h.executor, lambda: any("4 in all" in w for w in warnings))
        warning = next(w for w in warnings if "4 in all" in w)
        assert warning.startswith("images lost before reaching the node: ") and "at 10.0 Hz" in warning
        assert "fastdds_large_images.xml" in warning
    finally:
        h.close()


# ----- RViz markers -------------------------------------------------------------------------------------

def same_colour(got, expected) -> bool:
    """Equal up to the message's float32 score."""
    return [got.r, got.g, got.b, got.a] == pytest.approx([expected.r, expected.g, expected.b, expected.a], abs=1e-5)


def test_loop_markers_show_the_trajectory_and_each_published_loop(reference_map, reference_frames):
    h = Harness({"map_path": str(reference_map), "pose_topic": "/odom", "exclude_recent_s": 0.0, "min_score": 0.0,
                 "k": 1, **RETRIEVAL_ONLY})
    try:
        arrays: list[MarkerArray] = []
        latched = QoSProfile(depth=10, durability=DurabilityPolicy.TRANSIENT_LOCAL)
        h.tester.create_subscription(MarkerArray, "/tscm_place_recognition/loop_markers", arrays.append, latched)

        def markers(namespace: str) -> list[Marker]:
            return [m for array in arrays for m in array.markers if m.ns == namespace]

        assert spin_until(h.executor, lambda: markers("keyframes"))
        trajectory = markers("keyframes")[0]
        keyframes = KeyframeMap.load(reference_map)
        assert trajectory.type == Marker.LINE_LIST and trajectory.header.frame_id == "odom"
        points = np.array([[p.x, p.y, p.z] for p in trajectory.points])
        assert len(points) == 2 * (len(keyframes) - 1)
        np.testing.assert_allclose(points[0::2], keyframes.positions[:-1], atol=1e-6)
        np.testing.assert_allclose(points[1::2], keyframes.positions[1:], atol=1e-6)

        # a loop without a query pose: a sphere at the keyframe, coloured by score
        frame = reference_frames[5]
        answer = h.send(image_message(frame.image, frame.stamp_ns))
        assert spin_until(h.executor, lambda: markers("loops"))
        sphere = markers("loops")[-1]
        assert sphere.type == Marker.SPHERE and sphere.header.frame_id == "odom"
        top = answer.candidates[0]
        assert [sphere.pose.position.x, sphere.pose.position.y] == pytest.approx(
            [top.keyframe_pose.position.x, top.keyframe_pose.position.y])
        assert same_colour(sphere.color, score_colour(top.score))

        # with odometry in the map's frame: a line from the query pose to the keyframe
        poses = h.tester.create_publisher(Odometry, "/odom", qos_profile_sensor_data)
        assert spin_until(h.executor, lambda: poses.get_subscription_count() > 0)
        frame = reference_frames[20]
        for stamp_ns in (frame.stamp_ns - 10**8, frame.stamp_ns + 10**8):
            poses.publish(odometry(stamp_ns, 3.0))
            h.executor.spin_once(timeout_sec=0.05)
        assert spin_until(h.executor, lambda: h.node.statistics()["poses received"] >= 2)
        answer = h.send(image_message(frame.image, frame.stamp_ns))
        assert answer.query_pose_valid and answer.candidates[0].keyframe_id == 20
        assert spin_until(h.executor, lambda: len(markers("loops")) >= 2)
        line = markers("loops")[-1]
        assert line.type == Marker.LINE_LIST and line.id != sphere.id
        top = answer.candidates[0]
        assert [value for p in line.points for value in (p.x, p.y)] == pytest.approx(
            [3.0, 0.0, top.keyframe_pose.position.x, top.keyframe_pose.position.y])
        assert same_colour(line.color, score_colour(top.score))

        # RViz started later still gets the trajectory
        late: list[MarkerArray] = []
        h.tester.create_subscription(MarkerArray, "/tscm_place_recognition/loop_markers", late.append, latched)
        assert spin_until(h.executor, lambda: any(m.ns == "keyframes" for a in late for m in a.markers))
    finally:
        h.close()


def test_the_launch_file_passes_the_shipped_dds_profile():
    import ast
    import xml.etree.ElementTree as ElementTree

    source = (REPO / "launch/place_recognition.launch.py").read_text()
    tree = ast.parse(source)
    assert "FASTDDS_DEFAULT_PROFILES_FILE" in source and "fastdds_large_images.xml" in source
    declared = {call.args[0].value for call in ast.walk(tree) if isinstance(call, ast.Call)
                and getattr(call.func, "id", "") == "DeclareLaunchArgument" and isinstance(call.args[0], ast.Constant)}
    assert "dds_profile" in declared
    namespace = {"dds": "http://www.eprosima.com"}
    profile = ElementTree.parse(PROFILE).getroot()
    segment = int(profile.find(".//dds:transport_descriptor[dds:type='SHM']/dds:segment_size", namespace).text)
    assert segment >= 4 * 1920 * 1080 * 3  # several full-HD rgb8 images
