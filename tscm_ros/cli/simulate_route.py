"""simulate_route: render a camera route through a textured 3D town into a rosbag2 (test and demo data)."""

from __future__ import annotations

import argparse
import time
from typing import Sequence

from tscm_ros.cli.common import run_main
from tscm_ros.simulate import STORAGES, simulate_route


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="simulate_route",
        description="Render one traversal of a closed-loop route through a seeded 3D town (pybullet, CPU) and "
        "write it as a rosbag2 with sensor_msgs/Image on /camera/image_raw and nav_msgs/Odometry ground "
        "truth on /odom. Traversal 0 is the reference; traversals 1, 2, ... revisit the same places "
        "(same --seed) under changed light, colour, exposure, camera offsets and clutter.",
        epilog="example: simulate_route --out routes/t0 --traversal 0 && simulate_route --out routes/t1 --traversal 1",
    )
    parser.add_argument("--out", required=True, metavar="BAG", help="rosbag2 directory to write")
    parser.add_argument("--seed", type=int, default=0, help="world seed: same seed, same town (default 0)")
    parser.add_argument("--traversal", type=int, default=0, help="0 = reference appearance, >= 1 changed (default 0)")
    parser.add_argument("--frames", type=int, default=100, help="images per lap (default 100)")
    parser.add_argument("--route-length", type=float, default=300.0, metavar="M", help="lap length in metres (default 300)")
    parser.add_argument("--laps", type=int, default=1, help="laps driven in this bag (2+ = loops within one run)")
    parser.add_argument("--width", type=int, default=320, help="image width (default 320)")
    parser.add_argument("--height", type=int, default=240, help="image height (default 240)")
    parser.add_argument("--appearance-change", type=float, default=0.6, metavar="X",
                        help="strength of the appearance change of traversals >= 1, in [0, 1] (default 0.6)")
    parser.add_argument("--storage", choices=sorted(STORAGES), default="sqlite3", help="rosbag2 storage (default sqlite3)")
    parser.add_argument("--compressed", action="store_true",
                        help="also write JPEG sensor_msgs/CompressedImage on /camera/image_raw/compressed")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")
    return parser


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    started = time.perf_counter()
    out = simulate_route(args.out, seed=args.seed, traversal=args.traversal, frames=args.frames, width=args.width,
                         height=args.height, laps=args.laps, storage=args.storage, compressed=args.compressed,
                         appearance_change=args.appearance_change, route_length_m=args.route_length,
                         force=args.force)
    elapsed = time.perf_counter() - started
    count = args.frames * args.laps
    print(f"simulate_route: wrote {count} frames ({args.width}x{args.height}) of traversal {args.traversal}, "
          f"seed {args.seed}, {args.laps} x {args.route_length:.0f} m, to {out} ({args.storage}) "
          f"in {elapsed:.1f} s ({count / elapsed:.1f} frames/s)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(_main, argv)
