"""Benchmark: place_recognition_node under a live image stream at 10, 30 and 60 Hz.

Runs the real node as its own process (the default model, a 10k-keyframe map with local features, indexed
as build_map does by default) and, from this process, publishes a rendered 320x240 route over DDS at each
rate for --duration seconds, stamping each image with the wall clock when it is sent. The node runs three
times in the same run, with min_score 0 so that every image goes through every stage: global retrieval
only; its shipped defaults (temporal consistency); and with geometric verification of its k = 5
candidates turned on as well. With --student, a fourth time at its shipped defaults with a student distilled
on the route itself (``train student --bag``) and a map of the same size built with it.
Reports per configuration and rate: processed rate, drop rate (images sent without an answer),
end-to-end latency median / p95 (image stamp -> LoopCandidates received here, so both DDS hops are
included), the p95 ratio to retrieval only, and the node's peak RSS (VmHWM). Goal on a 2-core CPU: p95
<= 20 ms at 10 Hz with the shipped stages, and no drops at 30 Hz.

    . ./env.sh && python -m bench.node_throughput [--duration 30] [--rates 10 30 60] [--student]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import rclpy
from rclpy.executors import SingleThreadedExecutor
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import Image
from tscm_ros.msg import LoopCandidates

from tscm_ros.describe.describer import DEFAULT_MODEL, Describer, describer_for
from tscm_ros.describe.local_features import extract_local_features
from tscm_ros.io.bag import FrameSource
from tscm_ros.map.index import auto_index_config
from tscm_ros.map.keyframe_map import KeyframeMap, KeyframeMeta
from tscm_ros.sim.simulate import simulate_route

CONFIGURATIONS = {  # row name -> node parameters
    "retrieval only": ["-p", "verify:=false", "-p", "temporal_consistency:=false"],
    "shipped defaults (temporal consistency)": [],
    "+ verification (k = 5)": ["-p", "verify:=true"],
}


START_TIMEOUT_S = 600  # the node loads the model and the map and estimates its sequence nulls first


STUDENT_ROW = "shipped defaults, distilled student"


def make_map(frames, describer: Describer, size: int, out: Path) -> Path:
    """The route's real keyframes plus perturbed copies of them up to ``size`` keyframes (the noise as large
    against the descriptor whatever its dimension)."""
    real = describer.describe([f.image for f in frames])
    rng = np.random.default_rng(0)
    filler = real[rng.integers(len(real), size=size - len(real))]
    filler = filler + rng.normal(0, 0.05 * np.sqrt(3840 / real.shape[1]), filler.shape).astype(np.float32)
    filler /= np.linalg.norm(filler, axis=1, keepdims=True)
    # The generic vocabulary (no refit of the filler); the index build_map gives such a map by default.
    keyframe_map = KeyframeMap.for_describer(describer, auto_index_config(describer.dim))
    features = [extract_local_features(f.image) for f in frames]
    keyframe_map.add(real, [KeyframeMeta(stamp_ns=f.stamp_ns, pose=f.pose, bag="bench", local_features=lf)
                            for f, lf in zip(frames, features)])
    copied = rng.integers(len(features), size=len(filler))
    # A second recording one image a second, so that its keyframes are places of their own (stamped alike,
    # they would all be one place, and the map would have no sequence null for the shipped stages to use).
    start_ns = frames[-1].stamp_ns + 3600 * 10**9
    keyframe_map.add(filler.astype(np.float32), [KeyframeMeta(stamp_ns=start_ns + n * 10**9, pose=None, bag="filler",
                                                              local_features=features[i])
                                                 for n, i in enumerate(copied)])
    keyframe_map.save(out)
    return out


def route_and_map(work: Path, map_size: int) -> tuple[list, Path, list[Image]]:
    """A rendered 100-frame 320x240 route, a ``map_size``-keyframe map of it, and its frames as rgb8 Images."""
    route = simulate_route(work / "route", frames=100, width=320, height=240, progress=False)
    frames = list(FrameSource(route).open())
    map_dir = make_map(frames, describer_for(DEFAULT_MODEL), map_size, work / "map")
    images = [Image(height=f.image.shape[0], width=f.image.shape[1], encoding="rgb8", step=f.image.shape[1] * 3,
                    data=f.image.tobytes()) for f in frames]
    return frames, map_dir, images


def student_and_map(work: Path, frames, map_size: int) -> tuple[Path, Path]:
    """A student distilled on the route (the train student command a user runs) and a map built with it."""
    student_run = work / "student"
    subprocess.run([shutil.which("train"), "student", "--bag", str(work / "route"), "--out", str(student_run),
                    "--no-progress"], check=True)
    checkpoint = student_run / "student.pt"
    return checkpoint, make_map(frames, describer_for(str(checkpoint)), map_size, work / "map_student")


def join_loopback_domain(node_name: str):
    """A DDS domain of this process's own, discovery on loopback: the environment for the node's process, and
    an rclpy node of ours in that domain with its executor."""
    domain = str(10 + os.getpid() % 90)
    os.environ.update(ROS_DOMAIN_ID=domain, ROS_AUTOMATIC_DISCOVERY_RANGE="LOCALHOST")
    rclpy.init()
    node = rclpy.create_node(node_name)
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    return dict(os.environ), node, executor


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_rate(node, executor, publisher, images, rate_hz: float, duration_s: float) -> dict:
    sent: dict[tuple[int, int], float] = {}
    latencies_ms: list[float] = []

    def on_result(message: LoopCandidates) -> None:
        key = (message.header.stamp.sec, message.header.stamp.nanosec)
        if key in sent:
            latencies_ms.append((time.time() - sent[key]) * 1e3)

    subscription = node.create_subscription(LoopCandidates, "/tscm/loop_candidates", on_result, 100)
    period = 1.0 / rate_hz
    start = time.monotonic()
    next_send = start
    i = 0
    while time.monotonic() - start < duration_s:
        now = time.monotonic()
        if now >= next_send:
            message = images[i % len(images)]
            wall = time.time()
            message.header.stamp.sec, message.header.stamp.nanosec = int(wall), int((wall % 1) * 1e9)
            sent[(message.header.stamp.sec, message.header.stamp.nanosec)] = wall
            publisher.publish(message)
            i += 1
            next_send += period
        executor.spin_once(timeout_sec=max(0.0, min(next_send - time.monotonic(), 0.005)))
    drain_until = time.monotonic() + 1.0
    while time.monotonic() < drain_until:
        executor.spin_once(timeout_sec=0.01)
    node.destroy_subscription(subscription)
    answered = len(latencies_ms)
    return {
        "rate_hz": rate_hz, "sent": len(sent), "processed_hz": answered / duration_s,
        "drop_pct": 100.0 * (1 - answered / max(len(sent), 1)),
        "latency_median_ms": float(np.median(latencies_ms)) if latencies_ms else float("nan"),
        "latency_p95_ms": float(np.percentile(latencies_ms, 95)) if latencies_ms else float("nan"),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=30.0, help="seconds per rate (default 30)")
    parser.add_argument("--rates", type=float, nargs="+", default=[10.0, 30.0, 60.0])
    parser.add_argument("--map-size", type=int, default=10_000)
    parser.add_argument("--student", action="store_true",
                        help="also run the shipped defaults with a student distilled on the route and its own map")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="tscm_bench_node_"))
    frames, map_dir, images = route_and_map(work, args.map_size)
    configurations = {name: ["-p", f"map_path:={map_dir}", *parameters] for name, parameters in CONFIGURATIONS.items()}
    if args.student:
        checkpoint, student_map = student_and_map(work, frames, args.map_size)
        configurations[STUDENT_ROW] = ["-p", f"map_path:={student_map}", "-p", f"model_path:={checkpoint}"]

    env, node, executor = join_loopback_domain("tscm_bench")
    publisher = node.create_publisher(Image, "/camera/image_raw", qos_profile_sensor_data)
    results: dict[str, tuple[list[dict], float]] = {}
    try:
        for name, parameters in configurations.items():
            node_process = subprocess.Popen(
                [shutil.which("place_recognition_node"), "--ros-args", "-p", "exclude_recent_s:=0.0",
                 "-p", "min_score:=0.0", *parameters], env=env)
            try:
                started, deadline = time.monotonic(), time.monotonic() + START_TIMEOUT_S
                while publisher.get_subscription_count() == 0:
                    if time.monotonic() > deadline or node_process.poll() is not None:
                        raise RuntimeError(f"{name}: the node did not subscribe to the images within "
                                           f"{START_TIMEOUT_S} s (exit code {node_process.poll()})")
                    executor.spin_once(timeout_sec=0.1)
                print(f"{name}: the node subscribed {time.monotonic() - started:.0f} s after its start", flush=True)
                run_rate(node, executor, publisher, images, 5.0, 3.0)  # warm-up
                rows = [run_rate(node, executor, publisher, images, rate, args.duration) for rate in args.rates]
                results[name] = (rows, peak_rss_mb(node_process.pid))
            finally:
                node_process.send_signal(signal.SIGINT)
                node_process.wait(timeout=60)
            while publisher.get_subscription_count() > 0:  # the next node must not meet this one's endpoint
                executor.spin_once(timeout_sec=0.1)
    finally:
        executor.shutdown()
        node.destroy_node()
        rclpy.try_shutdown()
        shutil.rmtree(work, ignore_errors=True)

    print(f"\nplace_recognition_node, default model (the last row: the student), {args.map_size}-keyframe map "
          "(build_map's default index), "
          f"320x240 rgb8, {args.duration:.0f} s per rate, {os.cpu_count()} CPUs\n")
    print("| configuration | input rate | sent | processed rate | dropped | latency median | latency p95 | "
          "p95 / retrieval only | node peak RSS |")
    print("|---|---|---|---|---|---|---|---|---|")
    baseline = results["retrieval only"][0]
    for name, (rows, rss) in results.items():
        for r, base in zip(rows, baseline):
            print(f"| {name} | {r['rate_hz']:.0f} Hz | {r['sent']} | {r['processed_hz']:.1f} Hz | "
                  f"{r['drop_pct']:.1f} % | "
                  f"{r['latency_median_ms']:.1f} ms | {r['latency_p95_ms']:.1f} ms | "
                  f"{r['latency_p95_ms'] / base['latency_p95_ms']:.2f} | {rss:.0f} MB |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
