"""place_recognition_node: camera images in, tscm_ros/LoopCandidates out on /tscm/loop_candidates.

The subscription callback only keeps the newest image; one worker thread processes the newest image
whenever it is free (``LoopDetector.process``: describe, match, optionally add a keyframe) and
counts the images it never got to, so the node never falls behind and its memory stays bounded at any
input rate. One LoopCandidates message is published per processed image, with an empty candidate list
when nothing matched (see msg/LoopCandidates.msg).

Parameters are in tscm_ros/node/parameters.py. The matching parameters (``RUNTIME_PARAMETERS``) can be
changed while the node runs (``ros2 param set``), validated as at start-up and applied from the next image;
every other parameter is read-only.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from pathlib import Path

import numpy as np
from diagnostic_msgs.msg import DiagnosticArray
from rcl_interfaces.msg import SetParametersResult
from rclpy.node import Node
from rclpy.parameter import Parameter as RosParameter
from rclpy.qos import QoSProfile, qos_profile_sensor_data
from sensor_msgs.msg import CameraInfo, CompressedImage, Image
from std_srvs.srv import Trigger

from tscm_ros.describe.describer import DEFAULT_MODEL, Describer, describer_for
from tscm_ros.detect.loop_detector import LoopDetector
from tscm_ros.detect.verification import CameraIntrinsics
from tscm_ros.errors import ConfigError, TscmError
from tscm_ros.io.geometry import PoseInterpolator, pose_from_message, stamp_to_ns
from tscm_ros.io.image_messages import ImageDecodeError, image_message_to_rgb
from tscm_ros.map.autosave import MapSaver
from tscm_ros.map.building import KeyframeSelector, describer_for_map
from tscm_ros.map.keyframe_map import KeyframeMap
from tscm_ros.msg import LoopCandidates
from tscm_ros.node.diagnostics import POSE_SILENCE_WARN_S, diagnostic_status, pose_silence_warning
from tscm_ros.node.inputs import MalformedImages, NewestImage, StampGaps
from tscm_ros.node.markers import LoopMarkerPublisher
from tscm_ros.node.messages import loop_candidates_message
from tscm_ros.node.parameters import (
    POSE_QOS,
    POSE_TYPES,
    RUNTIME_PARAMETERS,
    check_runtime_values,
    declare_parameters,
    integers_as_numbers,
    matching_config,
    min_period,
    stages,
    validate,
)
from tscm_ros.node.spin import spin_until_signal

NODE_NAME = "tscm_place_recognition"
OUTPUT_TOPIC = "/tscm/loop_candidates"


class PlaceRecognitionNode(Node):
    """The ROS 2 node; ``LoopDetector`` does the work, this class moves messages."""

    def __init__(self, **node_kwargs) -> None:
        super().__init__(NODE_NAME, **node_kwargs)
        p = declare_parameters(self)
        validate(p)
        self._mapping = bool(p["mapping"])
        self._save_path = p["map_save_path"] or p["map_path"]
        self._min_period_s = min_period(p["max_rate_hz"])

        keyframe_map, describer = self._open_map(p["map_path"], describer_for(p["model_path"] or DEFAULT_MODEL,
                                                                              device=p["device"]))
        selector = (KeyframeSelector(min_interval_s=p["keyframe_min_interval_s"],
                                     min_distance_m=p["keyframe_min_distance_m"]) if self._mapping else None)
        verification, temporal, intrinsics = stages(p)
        self._publish_unverified = bool(p["publish_unverified"])
        self._map = keyframe_map  # the detector matches against it (and grows it in mapping mode)
        self.detector = LoopDetector(describer, keyframe_map, matching_config(p), selector,
                                     source=f"live:{self.get_name()}", verification=verification,
                                     temporal=temporal, intrinsics=intrinsics,
                                     vocabulary_keyframes=p["vocabulary_keyframes"],
                                     auto_verify_min_side=p["auto_verify_min_side"])
        if p["camera_info_topic"]:
            self.create_subscription(CameraInfo, p["camera_info_topic"], self._on_camera_info,
                                     qos_profile_sensor_data)

        self._poses: PoseInterpolator | None = None
        self._pose_frame_id = ""
        self._pose_topic, self._pose_qos, self._pose_type = p["pose_topic"], p["pose_qos"], p["pose_type"]
        self._poses_received = 0
        self._poses_invalid = 0
        self._pose_publishers_since: float | None = None
        self._pose_warning = ""
        if p["pose_topic"]:
            self._poses = PoseInterpolator(max_gap_s=p["pose_max_gap_s"], max_age_s=p["pose_history_s"])
            self.create_subscription(POSE_TYPES[p["pose_type"]], p["pose_topic"], self._on_pose,
                                     POSE_QOS[p["pose_qos"]])
        image_type = CompressedImage if p["use_compressed"] else Image
        qos = qos_profile_sensor_data if p["qos"] == "sensor_data" else QoSProfile(depth=10)
        self.create_subscription(image_type, p["image_topic"], self._on_image, qos)
        self._publisher = self.create_publisher(LoopCandidates, OUTPUT_TOPIC, 10)
        self._diagnostics = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self.create_timer(p["diagnostics_period_s"], self._publish_diagnostics)
        self._inbox = NewestImage()
        self._lock = threading.Lock()  # counters and the pose stream
        self._map_lock = threading.Lock()  # the map: the worker adds keyframes, saves copy it
        self._saver: MapSaver | None = None
        if self._mapping:
            self.create_service(Trigger, "~/save_map", self._on_save_map)
            self._saver = MapSaver(self._map_snapshot, self._save_path, p["autosave_keyframes"],
                                   p["autosave_period_s"])
            self._saver.start(len(keyframe_map))
        self._markers = (LoopMarkerPublisher(self, lambda: self._map, self._map_lock)
                         if p["loop_markers"] else None)
        if self._markers is not None:
            self._markers.refresh()
        self._processed = 0
        self._malformed = MalformedImages()
        self._gaps = StampGaps()
        self._latencies_ms: deque[float] = deque(maxlen=1000)
        self._started = time.monotonic()
        self._running = True
        self.add_pre_set_parameters_callback(self._before_set_parameters)
        self.add_on_set_parameters_callback(self._check_new_parameters)
        self.add_post_set_parameters_callback(self._apply_new_parameters)
        self._worker = threading.Thread(target=self._work, name="tscm_worker", daemon=True)
        self._worker.start()
        self.get_logger().info(
            f"listening on {p['image_topic']} ({image_type.__name__}), publishing on {OUTPUT_TOPIC}; "
            f"model {describer.model_name} on {describer.device}; map {keyframe_map.summary()}"
            + (" ; mapping on" if self._mapping else ""))

    # ----- set-up ------------------------------------------------------------------------------------

    def _open_map(self, map_path: str, describer: Describer) -> tuple[KeyframeMap, Describer]:
        """The map and the describer of its descriptors (the model with the map's own vocabulary)."""
        if map_path and Path(map_path).exists():
            keyframe_map = KeyframeMap.load(map_path, expected_fingerprint=describer.fingerprint,
                                            expected_model_name=describer.model_name)
            return keyframe_map, describer_for_map(describer, keyframe_map)
        if map_path and not self._mapping:
            raise ConfigError(f"map {map_path} does not exist: build one with build_map, or set mapping:=true")
        return KeyframeMap.for_describer(describer), describer

    # ----- parameters at run time ------------------------------------------------------------------

    def _runtime_values(self, changes: list[RosParameter]) -> dict:
        """The run-time parameters' values once ``changes`` are applied."""
        values = {name: self.get_parameter(name).value for name in RUNTIME_PARAMETERS}
        values.update({change.name: change.value for change in changes if change.name in RUNTIME_PARAMETERS})
        return values

    def _before_set_parameters(self, changes: list[RosParameter]) -> list[RosParameter]:
        """``ros2 param set NODE min_score 1``: an integer for a number parameter is that number."""
        return integers_as_numbers(changes)

    def _check_new_parameters(self, changes: list[RosParameter]) -> SetParametersResult:
        """Refuse run-time values that start-up would refuse (read-only parameters are refused by rclpy)."""
        try:
            check_runtime_values(self._runtime_values(changes))
        except (ConfigError, TypeError, ValueError) as exc:
            return SetParametersResult(successful=False, reason=str(exc))
        return SetParametersResult(successful=True)

    def _apply_new_parameters(self, changes: list[RosParameter]) -> None:
        """Applied from the next image on (the image being processed finishes with the old values)."""
        if not any(change.name in RUNTIME_PARAMETERS for change in changes):
            return
        values = self._runtime_values([])
        matching = matching_config(values)
        with self._map_lock:
            self.detector.set_matching(matching, min_inliers=values["min_inliers"])
            self._publish_unverified = bool(values["publish_unverified"])
            self._min_period_s = min_period(values["max_rate_hz"])
        self.get_logger().info("matching now " + ", ".join(f"{name} {values[name]}" for name in sorted(values)))

    # ----- callbacks ---------------------------------------------------------------------------------

    def _on_image(self, message) -> None:
        with self._lock:
            self._gaps.add(stamp_to_ns(message.header.stamp))
        self._inbox.put(message)

    def _on_pose(self, message) -> None:
        with self._lock:
            self._poses_received += 1
            self._pose_frame_id = message.header.frame_id
            if self._mapping and not self._map.frame_id:  # a map started here takes the frame of its poses
                self._map.frame_id = message.header.frame_id
            pose = pose_from_message(message)
            if pose is None:  # NaN or infinity, or a zero quaternion: counted on /diagnostics
                self._poses_invalid += 1
                return
            self._poses.add(stamp_to_ns(message.header.stamp), pose)

    def _on_camera_info(self, message) -> None:
        intrinsics = CameraIntrinsics.from_camera_info(message)
        if intrinsics is not None and self.detector.set_intrinsics(intrinsics):
            self.get_logger().info(f"camera intrinsics from {message.header.frame_id or 'CameraInfo'}: "
                                   f"fx {intrinsics.fx:.1f}, fy {intrinsics.fy:.1f}, cx {intrinsics.cx:.1f}, "
                                   f"cy {intrinsics.cy:.1f}")

    def _on_save_map(self, request, response):
        try:
            response.message = f"saved {self.save_map()} keyframes to {self._save_path}"
            response.success = True
        except (TscmError, OSError) as exc:
            response.success = False
            response.message = str(exc)
        return response

    # ----- the worker --------------------------------------------------------------------------------

    def _work(self) -> None:
        last_start = 0.0
        while self._running:
            wait = last_start + self._min_period_s - time.monotonic()
            if wait > 0:  # max_rate_hz: images arriving meanwhile replace each other in the inbox
                time.sleep(wait)
            message = self._inbox.take(timeout_s=0.2)
            if message is None:
                continue
            last_start = time.monotonic()
            try:
                self._process(message)
            except ImageDecodeError as exc:
                with self._lock:
                    summary = self._malformed.add(exc.kind, str(exc), time.monotonic())
                if summary:
                    self.get_logger().warning(summary)
            except Exception as exc:  # the worker must survive anything one image does
                self.get_logger().error(f"failed to process an image: {exc!r}", throttle_duration_sec=5.0)

    def _process(self, message) -> None:
        image = image_message_to_rgb(message)
        stamp_ns = stamp_to_ns(message.header.stamp)
        with self._lock:
            pose = self._poses.at(stamp_ns) if self._poses is not None else None
            pose_frame_id = self._pose_frame_id
        with self._map_lock:
            detection = self.detector.process(image, stamp_ns, pose)
            keyframes, map_frame_id = len(self._map), self._map.frame_id
        published = detection.candidates if self._publish_unverified else detection.accepted
        self._publisher.publish(loop_candidates_message(message.header, pose, pose_frame_id, map_frame_id,
                                                        detection.fingerprint, published))
        if self._saver is not None and detection.added_keyframe_id is not None:
            self._saver.keyframes_added(keyframes)
        if self._markers is not None:
            self._markers.loops(published, pose, pose_frame_id, map_frame_id, message.header.stamp)
        latency_ms = (self.get_clock().now().nanoseconds - stamp_ns) / 1e6
        with self._lock:
            self._processed += 1
            self._latencies_ms.append(latency_ms)

    # ----- diagnostics and shutdown ------------------------------------------------------------------

    def statistics(self) -> dict:
        """Counters and latency figures, as published on /diagnostics."""
        with self._lock:
            latencies = np.asarray(self._latencies_ms, dtype=np.float64)
            elapsed = max(time.monotonic() - self._started, 1e-9)
            return {
                "images received": self._inbox.received,
                "images processed": self._processed,
                "images dropped": self._inbox.dropped,
                "images malformed": self._malformed.total,
                **{f"images malformed: {kind}": n for kind, n in sorted(self._malformed.by_kind.items())},
                "images lost (input stamp gaps)": self._gaps.lost,
                "images lost recently (%)": 100.0 * self._gaps.recent_loss,
                "input stamp rate (Hz)": self._gaps.rate_hz,
                "input rate (Hz)": self._inbox.received / elapsed,
                "processed rate (Hz)": self._processed / elapsed,
                "latency median (ms)": float(np.median(latencies)) if len(latencies) else float("nan"),
                "latency p95 (ms)": float(np.percentile(latencies, 95)) if len(latencies) else float("nan"),
                "map keyframes": len(self._map),
                "map score calibration": self.detector.score_basis,
                "temporal consistency along": self.detector.temporal_basis,
                "poses received": self._poses_received,
                "poses invalid (skipped)": self._poses_invalid,
                "poses held": len(self._poses) if self._poses is not None else 0,
                "device": str(self.detector.device),
                **(self._saver.status() if self._saver is not None else {}),
            }

    def _check_pose_stream(self) -> None:
        """Warn when the pose topic has publishers but no pose arrives (QoS or type mismatch)."""
        if not self._pose_topic or self._poses_received:
            self._pose_warning = ""
            return
        publishers = self.get_publishers_info_by_topic(self._pose_topic)
        if not publishers:
            self._pose_publishers_since, self._pose_warning = None, ""
            return
        now = time.monotonic()
        if self._pose_publishers_since is None:
            self._pose_publishers_since = now
        if now - self._pose_publishers_since < POSE_SILENCE_WARN_S:
            return
        self._pose_warning = pose_silence_warning(self._pose_topic, self._pose_type, self._pose_qos, publishers,
                                                  now - self._pose_publishers_since)
        self.get_logger().warning(self._pose_warning, throttle_duration_sec=10.0)

    def _publish_diagnostics(self) -> None:
        self._check_pose_stream()
        with self._lock:
            summary = self._malformed.due(time.monotonic())
        if summary:
            self.get_logger().warning(summary)
        if self._markers is not None:
            self._markers.refresh()
        stats = self.statistics()
        status = diagnostic_status(f"{self.get_name()}: place recognition", stats, self._pose_warning,
                                   self._saver.last_error if self._saver is not None else "")
        array = DiagnosticArray(status=[status])
        array.header.stamp = self.get_clock().now().to_msg()
        self._diagnostics.publish(array)

    def _map_snapshot(self):
        with self._map_lock:
            return self._map.snapshot(), len(self._map)

    def save_map(self) -> int:
        """Save the map atomically to map_save_path (mapping mode); the keyframes saved."""
        count = self._saver.save()
        self.get_logger().info(f"saved {count} keyframes to {self._save_path}")
        return count

    def shutdown(self) -> None:
        """Stop the worker; in mapping mode, stop autosaving and save the map."""
        self._running = False
        self._inbox.close()
        self._worker.join(timeout=30.0)
        if self._saver is not None:
            self._saver.stop()
            self.save_map()


def main(args=None) -> int:
    """Run the node until SIGINT or SIGTERM (tscm_ros/node/spin.py); a bad parameter, model or map is one clear
    error line and exit code 2. A second signal while the worker stops and a mapping map is saved is only
    logged."""
    return spin_until_signal(NODE_NAME, PlaceRecognitionNode, args)
