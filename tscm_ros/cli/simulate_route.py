"""simulate_route: render a camera route through a textured 3D town or garden into a rosbag2 (test and demo data)."""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

from rosbags.rosbag2 import Reader

from tscm_ros.cli.common import finite_number, run_main
from tscm_ros.errors import ConfigError
from tscm_ros.sim.appearance import CONDITIONS
from tscm_ros.sim.simulate import IMAGE_TOPIC, STORAGES, WORLDS, simulate_route


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="simulate_route",
        description="""\
Render one traversal of a closed-loop route through a seeded 3D town (pybullet, CPU) and write it as a
rosbag2 with sensor_msgs/Image on /camera/image_raw and nav_msgs/Odometry ground truth on /odom.
Traversal 0 is the reference; traversals 1, 2, ... revisit the same places (same --seed, same
--aliasing) under changed light, colour, exposure, camera offsets and clutter.

--condition auto (the default) scales a random change by --appearance-change. The other conditions are
hard changes for benchmarks; with them, traversals >= 1 also drive 1-2 m off the centre line with a
slow weave, a heading wobble of 3-5 degrees, the camera up to 0.3 m higher or lower, and take images at
other points along the route (all of it in the /odom ground truth). --traversal 0 with a condition
is a reference under that condition, driven on the centre line.

--world garden swaps the town for a world unlike it (other content, photographic textures, another
sun and sky), to test recognition on a rendered world nobody tuned on; route, drive, conditions,
--aliasing and --skip-arc work the same there.""",
        epilog="""\
examples:
  simulate_route --out routes/t0 --traversal 0 && simulate_route --out routes/t1 --traversal 1
  a hard benchmark (perceptual aliasing, a stretch the map never saw, a night-time query):
    simulate_route --out routes/ref --aliasing 0.3 --skip-arc 0.4,0.5
    simulate_route --out routes/night --aliasing 0.3 --traversal 1 --condition night
  the same in the held-out garden world:
    simulate_route --out garden/ref --world garden && simulate_route --out garden/night --world garden \\
      --traversal 1 --condition night""",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", required=True, metavar="BAG", help="rosbag2 directory to write")
    parser.add_argument("--seed", type=int, default=0, help="world seed: same seed and --world, same place (default 0)")
    parser.add_argument("--world", default="town", metavar="NAME",
                        help="the scene (default town): " + "; ".join(f"{name}: {scene.summary}"
                                                                     for name, scene in WORLDS.items()))
    parser.add_argument("--traversal", type=int, default=0, help="0 = reference appearance, >= 1 changed (default 0)")
    parser.add_argument("--frames", type=int, default=100, help="images per lap (default 100)")
    parser.add_argument("--route-length", type=finite_number, default=300.0, metavar="M",
                        help="lap length in metres (default 300)")
    parser.add_argument("--laps", type=int, default=1, help="laps driven in this bag (2+ = loops within one run)")
    parser.add_argument("--width", type=int, default=320, help="image width (default 320)")
    parser.add_argument("--height", type=int, default=240, help="image height (default 240)")
    parser.add_argument("--appearance-change", type=finite_number, default=0.6, metavar="X",
                        help="strength of the appearance change of traversals >= 1, in [0, 1] (default 0.6)")
    parser.add_argument("--condition", choices=list(CONDITIONS), default="auto",
                        help="the change of appearance (default auto): "
                        + "; ".join(f"{name}: {text}" for name, text in CONDITIONS.items()))
    parser.add_argument("--aliasing", type=finite_number, default=0.0, metavar="X",
                        help="fraction in [0, 1] of the 20 m street blocks whose buildings, poles and pavements copy "
                        "an earlier block, so that distinct places look alike; part of the world, so give every "
                        "traversal of a --seed the same value (default 0)")
    parser.add_argument("--skip-arc", metavar="START,END",
                        help="write no images where the position along the lap, as a fraction in [0, 1], is in "
                        "[START, END), e.g. 0.4,0.5: a reference that never mapped that stretch, so query images "
                        "there have no true match (odometry goes on through the gap)")
    parser.add_argument("--storage", choices=sorted(STORAGES), default="sqlite3",
                        help="rosbag2 storage (default sqlite3)")
    parser.add_argument("--compressed", action="store_true",
                        help="also write JPEG sensor_msgs/CompressedImage on /camera/image_raw/compressed")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")
    return parser


def _interval(text: str | None) -> tuple[float, float] | None:
    """``START,END`` as two floats (None stays None)."""
    if text is None:
        return None
    try:
        start, end = (float(value) for value in text.split(","))
    except ValueError:
        raise ConfigError(f"--skip-arc must be START,END, two fractions of the lap, got {text!r}") from None
    return start, end


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    started = time.perf_counter()
    out = simulate_route(args.out, seed=args.seed, traversal=args.traversal, frames=args.frames, width=args.width,
                         height=args.height, laps=args.laps, storage=args.storage, compressed=args.compressed,
                         appearance_change=args.appearance_change, route_length_m=args.route_length,
                         force=args.force, condition=args.condition, aliasing=args.aliasing,
                         skip_arc=_interval(args.skip_arc), world=args.world)
    elapsed = time.perf_counter() - started
    with Reader(out) as reader:
        count = sum(c.msgcount for c in reader.connections if c.topic == IMAGE_TOPIC)
    print(f"simulate_route: wrote {count} frames ({args.width}x{args.height}) of traversal {args.traversal}, "
          f"seed {args.seed}, {args.laps} x {args.route_length:.0f} m, world {args.world}, condition {args.condition}, "
          f"aliasing {args.aliasing:g}, to {out} ({args.storage}) in {elapsed:.1f} s "
          f"({count / elapsed:.1f} frames/s)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(_main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
