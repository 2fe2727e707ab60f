"""Benchmark: how many camera-sized images arrive over DDS between two processes on this machine.

A publisher process sends --count images of each size at each rate; this process subscribes (a plain rclpy
subscription, or with --node the real place_recognition_node, whose /diagnostics say how many images its
subscription received) and reports delivered / published, per transport set-up:

- ``default``: the wheels' Fast DDS as it comes, both sides best effort (the node's default image QoS);
- ``reliable``: both sides reliable (the node's ``qos: reliable``);
- ``large_data``: best effort, ``FASTDDS_BUILTIN_TRANSPORTS=LARGE_DATA`` (shared memory and TCP for data);
- ``profile``: best effort, config/fastdds_large_images.xml through FASTDDS_DEFAULT_PROFILES_FILE (what the
  launch file passes).

Both processes run with the same environment, discovery on this machine only unless
ROS_AUTOMATIC_DISCOVERY_RANGE says otherwise.

    . ./env.sh && python -m bench.image_transport [--sizes 640x480,1280x720] [--rates 4,10,30] [--node]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROFILE = REPO / "config" / "fastdds_large_images.xml"
PROFILE_ENV = {"FASTDDS_DEFAULT_PROFILES_FILE": str(PROFILE)}
VARIANTS = {  # name -> (environment of both sides, of the subscriber only, reliable QoS on both sides)
    "default": ({}, {}, False),
    "reliable": ({}, {}, True),
    "large_data": ({"FASTDDS_BUILTIN_TRANSPORTS": "LARGE_DATA"}, {}, False),
    "profile": (PROFILE_ENV, {}, False),
    "profile_subscriber_only": ({}, PROFILE_ENV, False),
}
TOPIC = "/camera/image_raw"


def qos(reliable: bool):
    from rclpy.qos import QoSProfile, qos_profile_sensor_data

    return QoSProfile(depth=10) if reliable else qos_profile_sensor_data


def publish(size: str, rate: float, count: int, reliable: bool) -> None:
    """The publisher process: waits for a subscriber, sends ``count`` images at ``rate``, lingers, exits."""
    import numpy as np
    import rclpy
    from sensor_msgs.msg import Image

    width, height = (int(v) for v in size.split("x"))
    rclpy.init()
    node = rclpy.create_node("image_transport_publisher")
    publisher = node.create_publisher(Image, TOPIC, qos(reliable))
    deadline = time.monotonic() + 60
    while publisher.get_subscription_count() == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)  # discovery settles
    pixels = np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8).tobytes()
    start = time.monotonic()
    for i in range(count):
        message = Image(height=height, width=width, encoding="rgb8", step=width * 3, data=pixels)
        message.header.stamp = node.get_clock().now().to_msg()
        message.header.frame_id = str(i)
        publisher.publish(message)
        time.sleep(max(0.0, start + (i + 1) / rate - time.monotonic()))
    time.sleep(2.0)  # let the subscriber take the last ones
    node.destroy_node()
    rclpy.shutdown()


def _publisher(size: str, rate: float, count: int, reliable: bool, env: dict) -> subprocess.Popen:
    command = [sys.executable, "-m", "bench.image_transport", "--publish", size, "--rates", str(rate),
               "--count", str(count)]
    return subprocess.Popen(command + (["--reliable"] if reliable else []), env=env)


def measure_plain(size: str, rate: float, count: int, reliable: bool, env: dict, subscriber_env: dict) -> int:
    """Images a plain rclpy subscription in another process received (both run with ``env``, the subscriber
    also with ``subscriber_env``)."""
    code = f"""
import time, rclpy
from bench.image_transport import TOPIC, qos
from sensor_msgs.msg import Image
rclpy.init()
node = rclpy.create_node("image_transport_subscriber")
seen = set()
node.create_subscription(Image, TOPIC, lambda m: seen.add(m.header.frame_id), qos({reliable}))
publisher_seen = False
while True:
    rclpy.spin_once(node, timeout_sec=0.05)
    if node.count_publishers(TOPIC):
        publisher_seen = True
    elif publisher_seen:
        break
print(len(seen))
"""
    subscriber = subprocess.Popen([sys.executable, "-c", code], env={**env, **subscriber_env}, stdout=subprocess.PIPE,
                                  text=True)
    time.sleep(1.0)
    publisher = _publisher(size, rate, count, reliable, env)
    publisher.wait(timeout=300)
    out, _ = subscriber.communicate(timeout=120)
    return int(out.strip().splitlines()[-1])


def measure_node(size: str, rate: float, count: int, reliable: bool, env: dict, subscriber_env: dict,
                 map_dir: Path) -> int:
    """Images the real node's subscription received (its /diagnostics 'images received')."""
    import rclpy
    from diagnostic_msgs.msg import DiagnosticArray

    node_command = [sys.executable, "-m", "tscm_ros.cli.place_recognition_node", "--ros-args",
                    "-p", f"map_path:={map_dir}", "-p", "verify:=false", "-p", "temporal_consistency:=false",
                    "-p", "diagnostics_period_s:=0.5", "-p", f"qos:={'reliable' if reliable else 'sensor_data'}"]
    node_process = subprocess.Popen(node_command, env={**env, **subscriber_env}, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)
    context = rclpy.Context()
    os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = env["ROS_AUTOMATIC_DISCOVERY_RANGE"]
    rclpy.init(context=context, domain_id=int(env["ROS_DOMAIN_ID"]))
    received = {}
    try:
        listener = rclpy.create_node("image_transport_listener", context=context)
        listener.create_subscription(DiagnosticArray, "/diagnostics", lambda m: received.update(
            {v.key: v.value for s in m.status for v in s.values}), 10)
        executor = rclpy.executors.SingleThreadedExecutor(context=context)
        executor.add_node(listener)
        while "images received" not in received:
            executor.spin_once(timeout_sec=0.1)
        publisher = _publisher(size, rate, count, reliable, env)
        while publisher.poll() is None:
            executor.spin_once(timeout_sec=0.1)
        end = time.monotonic() + 2.0
        while time.monotonic() < end:
            executor.spin_once(timeout_sec=0.1)
        return int(received["images received"])
    finally:
        node_process.terminate()
        node_process.wait(timeout=60)
        rclpy.try_shutdown(context=context)


def small_map(directory: Path) -> Path:
    from tscm_ros.cli import build_map
    from tscm_ros.sim.simulate import simulate_route

    bag = simulate_route(directory / "bag", frames=20, width=160, height=120, progress=False)
    assert build_map.main(["--bag", str(bag), "--out", str(directory / "map"), "--min-distance", "0"]) == 0
    return directory / "map"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="320x240,640x480,1280x720")
    parser.add_argument("--rates", default="4,10,30", help="images per second, comma-separated")
    parser.add_argument("--count", type=int, default=40, help="images per measurement (default 40)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"of {', '.join(VARIANTS)}")
    parser.add_argument("--profile", action="append", default=[], metavar="NAME=XML",
                        help="also measure best effort with this Fast DDS XML profile on both sides (repeatable)")
    parser.add_argument("--subscriber-profile", action="append", default=[], metavar="NAME=XML",
                        help="also measure best effort with this Fast DDS XML profile on the subscriber only")
    parser.add_argument("--node", action="store_true", help="the real node subscribes, not a plain subscription")
    parser.add_argument("--publish", metavar="WxH", help=argparse.SUPPRESS)
    parser.add_argument("--reliable", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.publish:
        publish(args.publish, float(args.rates), args.count, args.reliable)
        return 0
    base = {**os.environ, "ROS_DOMAIN_ID": str(1 + os.getpid() % 100),
            "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    base.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    for entry in args.profile:
        name, _, path = entry.partition("=")
        VARIANTS[name] = ({"FASTDDS_DEFAULT_PROFILES_FILE": str(Path(path).resolve())}, {}, False)
        args.variants += f",{name}"
    for entry in args.subscriber_profile:
        name, _, path = entry.partition("=")
        VARIANTS[name] = ({}, {"FASTDDS_DEFAULT_PROFILES_FILE": str(Path(path).resolve())}, False)
        args.variants += f",{name}"
    with tempfile.TemporaryDirectory() as scratch:
        map_dir = small_map(Path(scratch)) if args.node else None
        results = []
        print("| subscriber | set-up | size | rate Hz | delivered / published |\n|---|---|---|---:|---:|")
        for variant in args.variants.split(","):
            both, subscriber_only, reliable = VARIANTS[variant]
            env = {**base, **both}
            for size in args.sizes.split(","):
                for rate in (float(r) for r in args.rates.split(",")):
                    if args.node:
                        got = measure_node(size, rate, args.count, reliable, env, subscriber_only, map_dir)
                    else:
                        got = measure_plain(size, rate, args.count, reliable, env, subscriber_only)
                    who = "node" if args.node else "rclpy"
                    print(f"| {who} | {variant} | {size} | {rate:g} | {got} / {args.count} |", flush=True)
                    results.append({"subscriber": who, "variant": variant, "size": size, "rate_hz": rate,
                                    "delivered": got, "published": args.count})
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
