"""build_map: build a keyframe map (FAISS index + metadata) from rosbag2 recordings."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from tscm_ros.cli.common import run_main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="build_map",
        description="Build a keyframe map for place recognition from one or more rosbag2 recordings.",
    )
    parser.add_argument("--bag", action="append", required=True, help="rosbag2 directory (repeatable)")
    parser.add_argument("--out", required=True, help="map directory to write")
    parser.add_argument("--model", help="student checkpoint (default: the offline-pretrained student)")
    return parser


def _main(argv: Sequence[str] | None) -> int:
    build_parser().parse_args(argv)
    print("build_map: not implemented yet", file=sys.stderr)
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(_main, argv)
