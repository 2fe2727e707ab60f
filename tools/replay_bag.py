#!/usr/bin/env python3
"""Replay a rosbag2 traversal's camera images over DDS and print the node's loop candidates as they arrive.

Used by `make demo`: publishes every frame of BAG as sensor_msgs/Image (rgb8, the bag's stamps) on
IMAGE_TOPIC at a fixed rate, subscribes to /tscm/loop_candidates, and prints for each LoopCandidates
message the query stamp, the top candidate's keyframe id and score, and whether it is a true loop:
the keyframe's pose (carried in the message) within --radius-m of the query's ground-truth pose (from
the bag's odometry). Waits for the node to appear first; ends with a summary line. With --odometry-drift it
also publishes the bag's poses as nav_msgs/Odometry on /odom (frame odom), drifted as `evaluate --drift`
drifts them, one per image just before it: the odometry a pose-graph back-end closes the loops on.
Run after `. ./env.sh` (needs rclpy and the built tscm_ros messages).
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import rclpy
from nav_msgs.msg import Odometry
from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node
from rclpy.qos import QoSProfile
from sensor_msgs.msg import Image
from tscm_ros.msg import LoopCandidates

from tscm_ros.evaluate.trajectory import OdometryDrift
from tscm_ros.io.bag import FrameSource
from tscm_ros.node.messages import fill_pose

OUTPUT_TOPIC = "/tscm/loop_candidates"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bag", help="rosbag2 directory to replay (with ground-truth odometry)")
    parser.add_argument("--rate", type=float, default=4.0, help="images per second (default 4)")
    parser.add_argument("--image-topic", default="/camera/image_raw", help="topic to publish images on")
    parser.add_argument("--radius-m", type=float, default=10.0, help="a true loop is within this distance (default 10)")
    parser.add_argument("--wait-node-s", type=float, default=120.0, help="how long to wait for the node (default 120)")
    parser.add_argument("--odometry-drift", metavar="BIAS,NOISE,POS",
                        help="also publish the poses, drifted (heading bias deg/m, heading noise deg/sqrt(m), "
                        "position noise fraction; seed 0), as odometry on /odom")
    return parser.parse_args(argv)


class Replayer(Node):
    """Publishes images, collects LoopCandidates and prints one line per message."""

    def __init__(self, image_topic: str, radius_m: float, query_positions: dict[int, np.ndarray],
                 start_ns: int) -> None:
        super().__init__("tscm_demo_replay")
        self.radius_m = radius_m
        self.start_ns = start_ns
        self.query_positions = query_positions
        self.received = 0
        self.with_candidates = 0
        self.true_loops = 0
        self.publisher = self.create_publisher(Image, image_topic, QoSProfile(depth=10))
        self.odometry = self.create_publisher(Odometry, "/odom", QoSProfile(depth=10))
        self.subscription = self.create_subscription(LoopCandidates, OUTPUT_TOPIC, self.on_candidates, 100)

    def on_candidates(self, message: LoopCandidates) -> None:
        self.received += 1
        stamp_ns = message.header.stamp.sec * 1_000_000_000 + message.header.stamp.nanosec
        line = f"  query at {(stamp_ns - self.start_ns) / 1e9:6.2f} s into the bag: "
        if not message.candidates:
            print(line + "no candidate", flush=True)
            return
        self.with_candidates += 1
        top = message.candidates[0]
        line += f"top-1 keyframe {top.keyframe_id:4d}  score {top.score:.3f}  "
        query = self.query_positions.get(stamp_ns)
        if query is None or not top.keyframe_pose_valid:
            print(line + "(no ground truth)", flush=True)
            return
        keyframe = np.array([top.keyframe_pose.position.x, top.keyframe_pose.position.y, top.keyframe_pose.position.z])
        distance = float(np.linalg.norm(keyframe - query))
        is_true = distance <= self.radius_m
        self.true_loops += is_true
        print(line + f"{'TRUE loop ' if is_true else 'false loop'} ({distance:5.1f} m away)", flush=True)


def to_image_message(image: np.ndarray, stamp_ns: int) -> Image:
    message = Image()
    message.header.stamp.sec, message.header.stamp.nanosec = divmod(int(stamp_ns), 1_000_000_000)
    message.header.frame_id = "camera"
    message.height, message.width = image.shape[:2]
    message.encoding = "rgb8"
    message.step = 3 * image.shape[1]
    message.data = np.ascontiguousarray(image).tobytes()
    return message


def spin_for(executor: SingleThreadedExecutor, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        executor.spin_once(timeout_sec=min(left, 0.05))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    frames = list(FrameSource(args.bag).open())
    positions = {f.stamp_ns: np.asarray(f.pose.position, dtype=float) for f in frames if f.pose is not None}
    rclpy.init()
    if not frames:
        print(f"replay: {args.bag} has no images", file=sys.stderr)
        return 1
    node = Replayer(args.image_topic, args.radius_m, positions, frames[0].stamp_ns)
    drifted = {}
    if args.odometry_drift:
        posed = [frame for frame in frames if frame.pose is not None]
        drift = OdometryDrift(*(float(v) for v in args.odometry_drift.split(",")))
        drifted = dict(zip((frame.stamp_ns for frame in posed), drift.apply([frame.pose for frame in posed])))
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    try:
        print(f"replay: waiting for the node on {args.image_topic} -> {OUTPUT_TOPIC} ...", flush=True)
        deadline = time.monotonic() + args.wait_node_s
        while not (node.publisher.get_subscription_count() and node.subscription.get_publisher_count()):
            if time.monotonic() > deadline:
                print(f"replay: no node subscribed to {args.image_topic} within {args.wait_node_s:g} s",
                      file=sys.stderr)
                return 1
            executor.spin_once(timeout_sec=0.1)
        spin_for(executor, 1.0)  # let both matched endpoints settle before the first image
        print(f"replay: publishing {len(frames)} images from {args.bag} at {args.rate:g} Hz", flush=True)
        for frame in frames:
            if frame.stamp_ns in drifted:
                odometry = Odometry()
                odometry.header.stamp.sec, odometry.header.stamp.nanosec = divmod(frame.stamp_ns, 1_000_000_000)
                odometry.header.frame_id = "odom"
                fill_pose(odometry.pose.pose, drifted[frame.stamp_ns])
                node.odometry.publish(odometry)
            node.publisher.publish(to_image_message(frame.image, frame.stamp_ns))
            spin_for(executor, 1.0 / args.rate)
        deadline = time.monotonic() + 15.0
        while node.received < len(frames) and time.monotonic() < deadline:
            executor.spin_once(timeout_sec=0.1)
        print(f"replay: published {len(frames)} images, received {node.received} LoopCandidates "
              f"({len(frames) - node.received} images skipped by the node while busy); "
              f"{node.with_candidates} with candidates, top-1 a true loop (within {args.radius_m:g} m) "
              f"in {node.true_loops}", flush=True)
        return 0 if node.received else 1
    finally:
        executor.shutdown()
        node.destroy_node()
        rclpy.try_shutdown()


if __name__ == "__main__":
    raise SystemExit(main())
