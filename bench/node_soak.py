"""Soak: place_recognition_node for minutes at 60 Hz with a pose topic at 100 Hz; memory must stay flat.

Runs the real node as its own process (the default model, a 10k-keyframe map as in node_throughput.py, the
pose stream on /odom as best-effort nav_msgs/Odometry, the node's default pose_qos) and publishes from this
process over DDS: 320x240 rgb8 images at --rate Hz, stamped with the wall clock, and odometry at --pose-rate
Hz along the route. Every 10 s it samples the node's resident memory (VmRSS) and reads its /diagnostics
(poses held). Reports RSS at the end of the warm-up minute ("start"), its peak after warm-up and at the end,
the node's VmHWM, latency (image stamp -> LoopCandidates received here) median / p95 / max per period and
overall, drops, the share of answers with a query pose, and the node's exit code on SIGINT.

    . ./env.sh && python -m bench.node_soak [--minutes 10] [--rate 60] [--pose-rate 100]
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
from diagnostic_msgs.msg import DiagnosticArray
from nav_msgs.msg import Odometry
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import Image
from tscm_ros.msg import LoopCandidates

from bench.node_throughput import join_loopback_domain, peak_rss_mb, route_and_map

SAMPLE_S = 10.0
WARM_UP_S = 60.0


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def stamp(message, wall: float) -> None:
    message.header.stamp.sec, message.header.stamp.nanosec = int(wall), int((wall % 1) * 1e9)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="soak duration after start-up (default 10)")
    parser.add_argument("--rate", type=float, default=60.0, help="image rate, Hz (default 60)")
    parser.add_argument("--pose-rate", type=float, default=100.0, help="odometry rate, Hz (default 100)")
    parser.add_argument("--map-size", type=int, default=10_000)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="tscm_bench_soak_"))
    frames, map_dir, images = route_and_map(work, args.map_size)
    path = np.array([f.pose.position for f in frames])

    env, node, executor = join_loopback_domain("tscm_soak")
    node_process = subprocess.Popen(
        [shutil.which("place_recognition_node"), "--ros-args", "-p", f"map_path:={map_dir}",
         "-p", "min_score:=0.0", "-p", "pose_topic:=/odom", "-p", "exclude_within_m:=5.0"],
        env=env, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    image_publisher = node.create_publisher(Image, "/camera/image_raw", qos_profile_sensor_data)
    pose_publisher = node.create_publisher(Odometry, "/odom", qos_profile_sensor_data)
    sent: dict[tuple[int, int], float] = {}
    answers: list[tuple[float, float, bool]] = []  # (receive time since start, latency ms, has query pose)
    poses_held: list[int] = []
    began = time.monotonic()

    def on_result(message: LoopCandidates) -> None:
        key = (message.header.stamp.sec, message.header.stamp.nanosec)
        if key in sent:
            answers.append((time.monotonic() - began, (time.time() - sent.pop(key)) * 1e3, message.query_pose_valid))

    def on_diagnostics(message: DiagnosticArray) -> None:
        for status in message.status:
            for item in status.values:
                if item.key == "poses held":
                    poses_held.append(int(item.value))

    node.create_subscription(LoopCandidates, "/tscm/loop_candidates", on_result, 100)
    node.create_subscription(DiagnosticArray, "/diagnostics", on_diagnostics, 10)
    samples: list[tuple[float, float]] = []
    exit_code = None
    try:
        deadline = time.monotonic() + 180
        while image_publisher.get_subscription_count() == 0 and time.monotonic() < deadline:
            executor.spin_once(timeout_sec=0.1)
        began = time.monotonic()
        duration = args.minutes * 60.0
        next_image = next_pose = next_sample = began
        i = poses = 0
        while (now := time.monotonic()) - began < duration:
            if now >= next_pose:  # odometry along the route, 1 m/s
                odometry = Odometry()
                stamp(odometry, time.time())
                odometry.header.frame_id = "odom"
                x, y, z = path[poses % len(path)]
                odometry.pose.pose.position.x, odometry.pose.pose.position.y = float(x), float(y)
                odometry.pose.pose.orientation.w = 1.0
                pose_publisher.publish(odometry)
                poses += 1
                next_pose += 1.0 / args.pose_rate
            if now >= next_image:
                message = images[i % len(images)]
                wall = time.time()
                stamp(message, wall)
                sent[(message.header.stamp.sec, message.header.stamp.nanosec)] = wall
                image_publisher.publish(message)
                i += 1
                next_image += 1.0 / args.rate
            if now >= next_sample:
                samples.append((now - began, rss_mb(node_process.pid)))
                print(f"  {now - began:5.0f} s: node RSS {samples[-1][1]:.0f} MB, {len(answers)} answers, "
                      f"poses held {poses_held[-1] if poses_held else '?'}", file=sys.stderr, flush=True)
                next_sample += SAMPLE_S
            executor.spin_once(timeout_sec=max(0.0, min(next_image, next_pose) - time.monotonic()))
        drain_until = time.monotonic() + 1.0
        while time.monotonic() < drain_until:
            executor.spin_once(timeout_sec=0.01)
        samples.append((time.monotonic() - began, rss_mb(node_process.pid)))
        hwm = peak_rss_mb(node_process.pid)
    finally:
        node_process.send_signal(signal.SIGINT)
        try:
            exit_code = node_process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            node_process.kill()
            node_process.wait()
        executor.shutdown()
        node.destroy_node()
        rclpy.try_shutdown()
        shutil.rmtree(work, ignore_errors=True)

    latencies = np.array([a[1] for a in answers])
    after = [rss for t, rss in samples if t >= min(WARM_UP_S, duration / 2)]
    start_rss = after[0]
    print(f"\nplace_recognition_node soak: {args.minutes:g} min, images {args.rate:g} Hz (320x240 rgb8), odometry "
          f"{args.pose_rate:g} Hz, default model, {args.map_size}-keyframe map, exclusion on, "
          f"{os.cpu_count()} CPUs\n")
    print(f"- images sent {i}, answered {len(answers)} ({len(answers) / duration:.1f} Hz), dropped "
          f"{100.0 * (1 - len(answers) / max(i, 1)):.1f} % (the node keeps only the newest image), "
          f"odometry sent {poses}")
    print(f"- answers with a query pose: {100.0 * np.mean([a[2] for a in answers]):.1f} %; poses held by the node "
          f"(diagnostics): min {min(poses_held, default=0)}, max {max(poses_held, default=0)}")
    print(f"- latency median {np.median(latencies):.1f} ms, p95 {np.percentile(latencies, 95):.1f} ms, "
          f"max {latencies.max():.1f} ms")
    print(f"- node RSS after the warm-up {start_rss:.0f} MB, peak after it {max(after):.0f} MB, "
          f"end {samples[-1][1]:.0f} MB (VmHWM {hwm:.0f} MB; {len(samples)} samples every {SAMPLE_S:g} s)")
    print(f"- node exit code on SIGINT: {exit_code}\n")
    print("| minute | answers | latency median ms | p95 ms | RSS MB (end of minute) |")
    print("|---|---|---|---|---|")
    for minute in range(int(np.ceil(duration / 60.0))):
        inside = [a for a in answers if minute * 60 <= a[0] < (minute + 1) * 60]
        lat = np.array([a[1] for a in inside]) if inside else np.array([np.nan])
        rss = [r for t, r in samples if t <= (minute + 1) * 60]
        print(f"| {minute + 1} | {len(inside)} | {np.median(lat):.1f} | {np.percentile(lat, 95):.1f} | {rss[-1]:.0f} |")
    return 0 if exit_code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
