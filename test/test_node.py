"""place_recognition_node for real: rclpy over DDS, the default model, a map built from a rendered bag."""

from __future__ import annotations

import ast
import math
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
from nav_msgs.msg import Odometry
from node_support import RETRIEVAL_ONLY, Harness, image_message, node_command, node_env, odometry
from rclpy.qos import qos_profile_sensor_data
from rclpy_support import spin_until
from sensor_msgs.msg import CompressedImage, Image
from std_srvs.srv import Trigger

from tscm_ros.detect.detection import DEFAULT_MIN_SCORE
from tscm_ros.errors import ConfigError, MapError
from tscm_ros.io.bag import FrameSource
from tscm_ros.node.parameters import PARAMETERS

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def query_frames(route_query):
    return list(FrameSource(route_query).open())


@pytest.fixture(scope="module")
def revisit_frames(tmp_path_factory):
    """The reference route driven again under a mild appearance change (light, tint, offsets, clutter).
    The default model finds most of these places (the stronger change of route_query is for trained
    models)."""
    from conftest import ROUTE

    from tscm_ros.sim.simulate import simulate_route

    bag = simulate_route(tmp_path_factory.mktemp("revisit") / "bag", traversal=1, appearance_change=0.2, **ROUTE)
    return list(FrameSource(bag).open())


@pytest.fixture
def harness(reference_map):
    h = Harness({"map_path": str(reference_map), "exclude_recent_s": 0.0, "min_score": 0.0, "k": 3, **RETRIEVAL_ONLY})
    yield h
    h.close()


def test_revisited_places_come_back_first(harness, reference_frames, revisit_frames):
    # The very frames the map was built from: their own keyframe must be the best candidate.
    for keyframe_id in (0, len(reference_frames) // 2, len(reference_frames) - 1):
        frame = reference_frames[keyframe_id]
        answer = harness.send(image_message(frame.image, frame.stamp_ns))
        assert answer.candidates, "empty candidate list for a frame that is in the map"
        assert answer.candidates[0].keyframe_id == keyframe_id
        # the same image: zero distance, and a calibrated score that passes the default min_score
        assert answer.candidates[0].distance < 1e-6 and answer.candidates[0].score >= DEFAULT_MIN_SCORE
        assert [c.score for c in answer.candidates] == sorted((c.score for c in answer.candidates), reverse=True)
        assert answer.map_frame_id == "odom" and answer.model_fingerprint
        kf = answer.candidates[0]
        assert (kf.keyframe_stamp.sec * 1_000_000_000 + kf.keyframe_stamp.nanosec) == frame.stamp_ns
        assert kf.keyframe_pose_valid
        np.testing.assert_allclose([kf.keyframe_pose.position.x, kf.keyframe_pose.position.y],
                                   frame.pose.position[:2], atol=1e-6)

    # A second drive under changed appearance: most places are recognised within 10 m.
    correct = 0
    queries = revisit_frames[::2]
    for frame in queries:
        answer = harness.send(image_message(frame.image, frame.stamp_ns))
        best = answer.candidates[0]
        found = np.array([best.keyframe_pose.position.x, best.keyframe_pose.position.y])
        correct += np.linalg.norm(found - frame.pose.position[:2]) <= 10.0
    # Chance (a random keyframe within 10 m) is under 10 %; the default model finds most of them.
    assert correct / len(queries) >= 0.5, f"only {correct}/{len(queries)} revisits recognised within 10 m"


def test_flood_keeps_memory_bounded_and_keeps_answering(harness, query_frames):
    frame = query_frames[0]
    for i in range(300):
        harness.send(image_message(frame.image, frame.stamp_ns + i), wait=False)
        harness.executor.spin_once(timeout_sec=0)
    spin_until(harness.executor, lambda: harness.node.statistics()["images received"] >= 300, timeout_s=10)
    stats = harness.node.statistics()
    # Best-effort depth-1 QoS lets DDS itself drop some; of those delivered, the node processes few.
    assert stats["images received"] >= 100
    assert stats["images dropped"] > 0, "the node kept up with 300 back-to-back images: the flood did not flood"
    # One slot: every received image was processed, dropped, or is the single one waiting.
    pending = stats["images received"] - stats["images processed"] - stats["images dropped"]
    assert pending in (0, 1), stats
    last = harness.send(image_message(frame.image, frame.stamp_ns + 10_000))
    assert last.candidates


MALFORMED = {  # kind -> (fields, how many are sent)
    "wrong step": (dict(height=4, width=4, encoding="rgb8", step=5, data=bytes(4 * 5)), 1),
    "truncated data": (dict(height=4, width=4, encoding="rgb8", step=12, data=bytes(20)), 3),
    "unknown encoding": (dict(height=4, width=4, encoding="yuv_fancy9", step=12, data=bytes(48)), 2),
    "zero size": (dict(height=0, width=0, encoding="rgb8", step=0, data=b""), 1),
}


def test_malformed_images_are_skipped_counted_by_kind_and_summarised(harness, query_frames, capfd):
    sent = 0
    for fields, count in MALFORMED.values():
        for _ in range(count):
            message = Image(**fields)
            message.header.stamp.sec = 1000 + sent
            harness.send(message, wait=False)
            sent += 1
            spin_until(harness.executor, lambda: harness.node.statistics()["images malformed"] >= sent, timeout_s=30)
    stats = harness.node.statistics()
    assert stats["images malformed"] == sent == 7
    assert {kind: stats[f"images malformed: {kind}"] for kind in MALFORMED} == {
        kind: count for kind, (_, count) in MALFORMED.items()}

    logged = []

    def summarised() -> bool:
        logged.append(capfd.readouterr().err)
        return "(7 in all)" in "".join(logged)

    assert spin_until(harness.executor, summarised, timeout_s=30)  # the rate limit (5 s) passes, then the summary
    lines = [line for line in "".join(logged).splitlines() if "malformed image" in line]
    assert len(lines) == 2, lines  # the first image at once, the six others in one line
    assert "skipped 1 malformed image (1 in all): 1 wrong step (e.g. image step 5 is smaller than width 4" in lines[0]
    assert "skipped 6 malformed images (7 in all): 3 truncated data (e.g. image data has 20 bytes, expected step " \
           "12 x height 4 = 48); 2 unknown encoding (e.g. unknown image encoding 'yuv_fancy9'); 1 zero size (e.g. " \
           "image has zero size (0x0))" in lines[1], lines[1]
    frame = query_frames[1]
    answer = harness.send(image_message(frame.image, frame.stamp_ns))
    assert answer.candidates


def test_undecodable_jpeg_is_skipped(reference_map, query_frames):
    h = Harness({"map_path": str(reference_map), "use_compressed": True, "exclude_recent_s": 0.0,
                 "min_score": 0.0, **RETRIEVAL_ONLY}, image_type=CompressedImage)
    try:
        broken = CompressedImage(format="jpeg", data=b"\xff\xd8\xff\xe0 definitely not a jpeg")
        broken.header.stamp.sec = 5
        h.send(broken, wait=False)
        assert spin_until(h.executor, lambda: h.node.statistics()["images malformed"] == 1)
        import cv2

        frame = query_frames[2]
        ok, jpeg = cv2.imencode(".jpg", frame.image[:, :, ::-1])
        good = CompressedImage(format="jpeg", data=jpeg.tobytes())
        good.header.stamp.sec, good.header.stamp.nanosec = divmod(frame.stamp_ns, 1_000_000_000)
        assert h.send(good).candidates
    finally:
        h.close()


def test_online_mapping_finds_a_loop_and_saves(tmp_path, reference_frames):
    map_dir = tmp_path / "online_map"
    h = Harness({"mapping": True, "map_path": str(map_dir), "keyframe_min_distance_m": 0.0,
                 "keyframe_min_interval_s": 0.0, "exclude_recent_s": 0.0, "min_score": 0.0,
                 "temporal_consistency": False, "verify": True})
    try:
        first = reference_frames[0]
        assert h.send(image_message(first.image, first.stamp_ns)).candidates == []  # empty map: empty list
        for frame in reference_frames[5:8]:
            h.send(image_message(frame.image, frame.stamp_ns))
        again = h.send(image_message(first.image, first.stamp_ns + 1))
        assert again.candidates[0].keyframe_id == 0 and again.candidates[0].score >= DEFAULT_MIN_SCORE
        assert again.candidates[0].verified  # keyframes added online carry local features
    finally:
        h.close()  # saves on shutdown
    from tscm_ros.map.keyframe_map import KeyframeMap

    saved = KeyframeMap.load(map_dir)
    assert len(saved) == 5 and saved.has_local_features


def test_online_mapping_fits_the_maps_own_vocabulary_once_it_has_enough_keyframes(tmp_path, reference_frames):
    map_dir = tmp_path / "refit_map"
    h = Harness({"mapping": True, "map_path": str(map_dir), "keyframe_min_distance_m": 0.0,
                 "keyframe_min_interval_s": 0.0, "exclude_recent_s": 0.0, "min_score": 0.0,
                 "vocabulary_keyframes": 20, **RETRIEVAL_ONLY})
    try:
        answers = [h.send(image_message(frame.image, frame.stamp_ns)) for frame in reference_frames[:22]]
        generic, fitted = answers[0].model_fingerprint, answers[-1].model_fingerprint
        assert {a.model_fingerprint for a in answers[:20]} == {generic} != {fitted}  # the 20th keyframe fits it
        first = reference_frames[0]
        again = h.send(image_message(first.image, first.stamp_ns + 1))  # described with the map's vocabulary
        assert again.model_fingerprint == fitted and again.candidates[0].keyframe_id == 0
        assert again.candidates[0].distance < 1e-4
    finally:
        h.close()
    from tscm_ros.map.keyframe_map import KeyframeMap

    saved = KeyframeMap.load(map_dir)
    assert len(saved) == 23 and saved.vocabulary.source == "map" and saved.vocabulary.images == 20
    assert saved.model_fingerprint == fitted


def test_published_loops_are_verified_and_consistent_over_dds(reference_map, revisit_frames):
    """Both stages on (the defaults): every published candidate is verified and consistent, and carries its
    inliers, sequence score and relative pose; publish_unverified shows what the stages held back."""
    focal = 60.0 / math.tan(math.radians(35.0))  # the simulator's 70 degree vertical field of view, 160x120
    stages = {"map_path": str(reference_map), "exclude_recent_s": 0.0, "min_score": 0.0, "k": 3,
              "verify": True, "min_inliers": 12, "temporal_window": 3, "temporal_tolerance_m": 4.0,
              "camera_intrinsics": f"{focal} {focal} 80 60"}
    drive = revisit_frames[:12]
    h = Harness(stages)
    try:
        answers = [h.send(image_message(frame.image, frame.stamp_ns)) for frame in drive]
    finally:
        h.close()
    assert answers[0].candidates == [] and answers[1].candidates == []  # fewer images than the window
    published = [c for answer in answers for c in answer.candidates]
    assert len(published) >= 5, f"only {len(published)} loops published over {len(drive)} revisited places"
    for c in published:
        assert c.verified and c.inliers >= 12 and c.consistent and math.isfinite(c.sequence_score)
        assert c.relative_pose_valid
        position, orientation = c.relative_pose.position, c.relative_pose.orientation
        assert math.hypot(position.x, position.y, position.z) == pytest.approx(1.0, abs=1e-4)
        assert math.hypot(orientation.x, orientation.y, orientation.z, orientation.w) == pytest.approx(1.0, abs=1e-4)

    h = Harness({**stages, "publish_unverified": True})
    try:
        flagged = [c for frame in drive[:4] for c in h.send(image_message(frame.image, frame.stamp_ns)).candidates]
    finally:
        h.close()
    assert any(not c.consistent for c in flagged)  # the first images, published only because it was asked


def test_old_maps_and_maps_without_local_features_are_refused_with_a_rebuild_message(tmp_path, reference_map,
                                                                                      reference_frames):
    """A map of an older format (before maps fitted their vocabulary) is refused; one without local features
    is refused with verification on, and works without."""
    import json
    import shutil

    from tscm_ros.errors import MapError

    older = tmp_path / "older_map"
    shutil.copytree(reference_map, older)
    manifest = json.loads((older / "manifest.json").read_text())
    (older / "manifest.json").write_text(json.dumps({**manifest, "format_version": 2}))
    with pytest.raises(MapError, match="format_version 2.*rebuild the map with build_map"):
        Harness({"map_path": str(older)})
    old = tmp_path / "old_map"
    shutil.copytree(reference_map, old)
    (old / "local_features.npz").unlink()
    del manifest["files"]["local_features.npz"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match="no local features .* rebuild it with build_map"):
        Harness({"map_path": str(old), "verify": True})
    h = Harness({"map_path": str(old), "exclude_recent_s": 0.0, "min_score": 0.0, **RETRIEVAL_ONLY})
    try:
        frame = reference_frames[3]
        assert h.send(image_message(frame.image, frame.stamp_ns)).candidates[0].keyframe_id == 3
    finally:
        h.close()


def test_bad_start_up_is_a_clear_error(tmp_path, reference_map):
    with pytest.raises(ConfigError, match="map_path is empty"):
        Harness({})
    with pytest.raises(ConfigError, match="does not exist"):
        Harness({"map_path": str(tmp_path / "nowhere")})
    with pytest.raises(ConfigError, match="device"):
        Harness({"map_path": str(reference_map), "device": "tpu"})
    with pytest.raises(ConfigError, match="min_score"):
        Harness({"map_path": str(reference_map), "min_score": 1.5})
    with pytest.raises(ConfigError, match="min_inliers"):
        Harness({"map_path": str(reference_map), "min_inliers": 2})
    with pytest.raises(ConfigError, match="camera_intrinsics"):
        Harness({"map_path": str(reference_map), "camera_intrinsics": "100 100 80"})
    for name in ("diagnostics_period_s", "pose_history_s", "pose_max_gap_s", "exclude_recent_s"):
        for value in (math.nan, math.inf):
            with pytest.raises(ConfigError, match=f"parameter {name} must be a finite number"):
                Harness({"map_path": str(reference_map), name: value})


def test_map_of_another_model_is_refused(tmp_path, reference_map):
    """A map records its model's fingerprint; the node refuses it for a different model."""
    from tscm_ros.map.keyframe_map import KeyframeMap, KeyframeMeta

    built = KeyframeMap.load(reference_map)
    forged = KeyframeMap(built.dim, "0" * 16, built.preprocess, model_name="another-model")
    vector = np.zeros((1, built.dim), dtype=np.float32)
    vector[0, 0] = 1.0
    forged.add(vector, [KeyframeMeta(stamp_ns=1, pose=None, bag="forged")])
    forged.save(tmp_path / "forged_map")
    with pytest.raises(MapError, match="another-model"):
        Harness({"map_path": str(tmp_path / "forged_map")})


# ----- the launch file and the parameter file --------------------------------------------------------

def _launch_source() -> ast.Module:
    return ast.parse((REPO / "launch/place_recognition.launch.py").read_text())


def test_launch_file_matches_the_node_and_the_parameter_file():
    declared = {p.name for p in PARAMETERS}
    config = yaml.safe_load((REPO / "config/place_recognition.yaml").read_text())
    node_keys = set(config) - {"/**"}
    assert node_keys == {"tscm_place_recognition"}, "parameter file's top-level key must be the node name"
    in_file = set(config["tscm_place_recognition"]["ros__parameters"])
    assert in_file == declared, f"file-only: {in_file - declared}, undocumented: {declared - in_file}"
    defaults = {p.name: p.default for p in PARAMETERS}
    for name, value in config["tscm_place_recognition"]["ros__parameters"].items():
        assert type(value) is type(defaults[name]), f"{name}: file has {value!r}, node default {defaults[name]!r}"

    tree = _launch_source()
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "Node"]
    assert len(calls) == 1
    keywords = {k.arg: k.value for k in calls[0].keywords}
    assert ast.literal_eval(keywords["package"]) == "tscm_ros"
    assert ast.literal_eval(keywords["executable"]) == "place_recognition_node"
    assert ast.literal_eval(keywords["name"]) == "tscm_place_recognition"
    # when the node exits, launch shuts down; when it failed, launch fails (an exception in the exit handler
    # is what makes LaunchService.run return non-zero: a process's exit code alone does not)
    handler = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == keywords["on_exit"].id)
    assert "returncode" in ast.unparse(handler) and any(isinstance(n, ast.Raise) for n in ast.walk(handler))
    assert "Shutdown(" in ast.unparse(handler)
    cmake = (REPO / "CMakeLists.txt").read_text()
    assert re.search(r"set\(TSCM_EXECUTABLES[^)]*place_recognition_node", cmake)
    arguments = next(n for n in ast.walk(tree) if isinstance(n, ast.Assign)
                     and getattr(n.targets[0], "id", "") == "COMMON_ARGUMENTS")
    mapped = {ast.literal_eval(k): ast.literal_eval(v.elts[0]) for k, v in zip(arguments.value.keys,
                                                                                arguments.value.values)}
    assert set(mapped) >= {"map", "model", "image_topic", "device", "use_compressed"}
    assert set(mapped.values()) <= declared
    assert "params_file" in (REPO / "launch/place_recognition.launch.py").read_text()


def test_launch_description_loads_where_launch_is_installed():
    pytest.importorskip("launch_ros", reason="launch / launch_ros are not installable here (no PyPI wheels)")
    import importlib.util

    spec = importlib.util.spec_from_file_location("launch_file", REPO / "launch/place_recognition.launch.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    description = module.generate_launch_description()
    names = {a.name for a in description.entities if hasattr(a, "default_value")}
    assert {"map", "model", "image_topic", "device", "use_compressed", "params_file"} <= names


# ----- parameters at run time, parameter types, signals ----------------------------------------------

def test_matching_parameters_change_at_run_time(harness, reference_frames):
    frame = reference_frames[3]
    assert len(harness.send(image_message(frame.image, frame.stamp_ns)).candidates) == 3
    results = harness.set_parameters(k=1)
    assert results[0].successful
    assert len(harness.send(image_message(frame.image, frame.stamp_ns + 1)).candidates) == 1  # the next image
    # min_score 1 (an integer for a number, as `ros2 param set ... min_score 1` sends it): no calibrated score
    # reaches it, not even an identical image's
    assert harness.set_parameters(min_score=1)[0].successful
    assert harness.node.get_parameter("min_score").value == 1.0
    assert harness.send(image_message(frame.image, frame.stamp_ns + 2)).candidates == []
    # refused as at start-up, and nothing changes
    refused = harness.set_parameters(min_score=7.0)[0]
    assert not refused.successful and "min_score" in refused.reason
    assert not harness.set_parameters(k=0)[0].successful
    assert not harness.set_parameters(max_rate_hz=-1.0)[0].successful
    assert not harness.set_parameters(max_rate_hz=math.nan)[0].successful
    assert not harness.set_parameters(exclude_recent_s=math.nan)[0].successful
    assert not harness.set_parameters(min_inliers=2)[0].successful  # verification's threshold: checked the same way
    assert harness.set_parameters(min_inliers=30)[0].successful
    assert not harness.set_parameters(verify=True)[0].successful  # switching a stage needs a restart (read-only)
    read_only = harness.set_parameters(image_topic="/elsewhere")[0]
    assert not read_only.successful and "read-only" in read_only.reason
    assert harness.node.get_parameter("min_score").value == 1.0
    assert harness.node.get_parameter("image_topic").value == "/camera/image_raw"
    assert harness.set_parameters(min_score=0.0)[0].successful
    assert harness.send(image_message(frame.image, frame.stamp_ns + 3)).candidates[0].keyframe_id == 3


def test_integers_are_accepted_for_number_parameters(tmp_path, reference_map, reference_frames):
    params = tmp_path / "params.yaml"
    params.write_text("tscm_place_recognition:\n  ros__parameters:\n    min_score: 0\n    exclude_recent_s: 0\n")
    h = Harness({"map_path": str(reference_map), "max_rate_hz": 100, "k": 2, **RETRIEVAL_ONLY},
                cli_args=["--ros-args", "--params-file", str(params)])
    try:
        assert h.node.get_parameter("min_score").value == 0.0
        assert h.node.get_parameter("max_rate_hz").value == 100.0
        frame = reference_frames[0]
        assert h.send(image_message(frame.image, frame.stamp_ns)).candidates[0].keyframe_id == 0
    finally:
        h.close()
    with pytest.raises(ConfigError, match="parameter k: expected an integer, got 2.5"):
        Harness({"map_path": str(reference_map), "k": 2.5})


def test_wrong_parameter_type_is_one_line_and_exit_code_2(reference_map):
    result = subprocess.run(node_command("-p", f"map_path:={reference_map}", "-p", "min_score:=high"),
                            capture_output=True, text=True, timeout=120, env=node_env())
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "parameter min_score: expected a number, got 'high'" in lines[0], result.stderr


def test_repeated_signals_shut_down_cleanly(tmp_path):
    """ros2 launch sends a second SIGINT (then SIGTERM) while the node shuts down: still a clean exit 0."""
    map_dir = tmp_path / "signal_map"
    process = subprocess.Popen(node_command("-p", "mapping:=true", "-p", f"map_path:={map_dir}"),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=node_env(),
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        lines = []
        for line in process.stdout:
            lines.append(line)
            if "listening on" in line:
                break
        assert any("listening on" in line for line in lines), "".join(lines)
        for signum in (signal.SIGINT, signal.SIGINT, signal.SIGTERM, signal.SIGINT):
            process.send_signal(signum)
        output = "".join(lines) + process.communicate(timeout=120)[0]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, output
    assert "Traceback" not in output and "KeyboardInterrupt" not in output, output
    assert (map_dir / "manifest.json").is_file()  # mapping mode saved on the way out


# ----- poses, max_rate_hz, ~/save_map ------------------------------------------------------------------

def test_pose_topic_gives_query_poses_with_a_bounded_history(reference_map, reference_frames):
    h = Harness({"map_path": str(reference_map), "pose_topic": "/odom", "pose_history_s": 1.0, "pose_max_gap_s": 0.5,
                 "exclude_recent_s": 0.0, "min_score": 0.0})
    try:
        # a best-effort odometry stream at 100 Hz (robot bases often publish so); default pose_qos sensor_data
        poses = h.tester.create_publisher(Odometry, "/odom", qos_profile_sensor_data)
        assert spin_until(h.executor, lambda: poses.get_subscription_count() > 0)
        start = 50 * 10**9
        for i in range(300):  # 3 s of poses, x = 1 m per second; every 50th a NaN, skipped and counted
            poses.publish(odometry(start + i * 10**7, i / 100.0 if i % 50 != 25 else math.nan))
            h.executor.spin_once(timeout_sec=0.005)  # best effort: let the node take them as they come
        assert spin_until(h.executor, lambda: h.node.statistics()["poses received"] >= 200, timeout_s=30)
        stats = h.node.statistics()
        assert stats["poses held"] <= 1.5 * 101 + 1, stats  # 1 s of history, not every pose received
        assert 1 <= stats["poses invalid (skipped)"] <= 6, stats

        frame = reference_frames[0]
        answer = h.send(image_message(frame.image, start + 2_505 * 10**6))
        assert answer.query_pose_valid and answer.query_pose_frame_id == "odom"
        assert answer.query_pose.position.x == pytest.approx(2.505, abs=1e-6)
        stale = h.send(image_message(frame.image, start + 500 * 10**6))  # older than the history kept
        assert not stale.query_pose_valid
    finally:
        h.close()


def test_pose_publishers_without_poses_are_reported(reference_map):
    h = Harness({"map_path": str(reference_map), "pose_topic": "/odom", "pose_qos": "reliable",
                 "diagnostics_period_s": 0.2})
    try:
        warnings = []
        h.tester.create_subscription(
            DiagnosticArray, "/diagnostics",
            lambda m: warnings.extend(s.message for s in m.status if s.level == DiagnosticStatus.WARN), 10)
        best_effort = h.tester.create_publisher(Odometry, "/odom", qos_profile_sensor_data)
        # a reliable subscription never matches a best-effort publisher: no pose arrives, the node says why
        for i in range(200):
            best_effort.publish(odometry(i * 10**7, 0.0))
            h.executor.spin_once(timeout_sec=0.02)
            if warnings:
                break
        assert spin_until(h.executor, lambda: bool(warnings), timeout_s=30)
        assert "pose_topic /odom has 1 publisher(s)" in warnings[-1] and "pose_qos sensor_data" in warnings[-1]
        assert h.node.statistics()["poses received"] == 0
    finally:
        h.close()


def test_max_rate_hz_drops_images_in_between(reference_map, reference_frames):
    h = Harness({"map_path": str(reference_map), "max_rate_hz": 1.0, "exclude_recent_s": 0.0, "min_score": 0.0,
                 **RETRIEVAL_ONLY})
    try:
        frame = reference_frames[0]
        h.send(image_message(frame.image, frame.stamp_ns))
        for i in range(1, 11):  # a burst well within the 1 s the node waits after each image
            h.send(image_message(frame.image, frame.stamp_ns + i), wait=False)
            h.executor.spin_once(timeout_sec=0)
        assert spin_until(h.executor, lambda: h.node.statistics()["images received"] >= 8, timeout_s=30)
        last = h.send(image_message(frame.image, frame.stamp_ns + 11))  # the newest one is processed
        assert last.candidates
        stats = h.node.statistics()
        assert stats["images dropped"] >= 5 and stats["images processed"] <= 4, stats
        assert h.set_parameters(max_rate_hz=0)[0].successful  # off at run time: every image answered
        for i in range(12, 15):
            assert h.send(image_message(frame.image, frame.stamp_ns + i)).candidates
    finally:
        h.close()


def test_save_map_service(tmp_path, reference_frames):
    map_dir = tmp_path / "served_map"
    h = Harness({"mapping": True, "map_path": str(map_dir), "keyframe_min_distance_m": 0.0,
                 "keyframe_min_interval_s": 0.0, "exclude_recent_s": 0.0})
    try:
        for frame in reference_frames[:3]:
            h.send(image_message(frame.image, frame.stamp_ns))
        client = h.tester.create_client(Trigger, f"{h.node.get_fully_qualified_name()}/save_map")
        assert spin_until(h.executor, client.service_is_ready)
        future = client.call_async(Trigger.Request())
        assert spin_until(h.executor, future.done)
        assert future.result().success, future.result().message
        assert "saved 3 keyframes" in future.result().message
        from tscm_ros.map.keyframe_map import KeyframeMap

        assert len(KeyframeMap.load(map_dir)) == 3
    finally:
        h.close()


LAUNCH_MISSING_MAP = """
import sys
import launch
from launch.actions import IncludeLaunchDescription
from launch.launch_description_sources import PythonLaunchDescriptionSource
service = launch.LaunchService()
service.include_launch_description(IncludeLaunchDescription(
    PythonLaunchDescriptionSource(sys.argv[1]), launch_arguments={"map": sys.argv[2]}.items()))
sys.exit(service.run())
"""


def test_launch_fails_when_the_node_dies(tmp_path):
    pytest.importorskip("launch_ros", reason="launch / launch_ros are not installable here (no PyPI wheels)")
    result = subprocess.run([sys.executable, "-c", LAUNCH_MISSING_MAP, str(REPO / "launch/place_recognition.launch.py"),
                             str(tmp_path / "no_map")], capture_output=True, text=True, timeout=180, env=node_env())
    output = result.stdout + result.stderr
    assert "does not exist" in output, output  # the node's own error line
    assert result.returncode != 0, output
