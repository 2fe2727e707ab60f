"""place_recognition_node: camera images in, loop-closure candidates out on /tscm/loop_candidates."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from tscm_ros.cli.common import run_main


def _main(argv: Sequence[str] | None) -> int:
    parser = argparse.ArgumentParser(
        prog="place_recognition_node",
        description="ROS 2 node: describes camera images with the student network, matches them against "
        "a keyframe map and publishes tscm_ros/LoopCandidates on /tscm/loop_candidates.",
    )
    parser.parse_known_args(argv)
    print("place_recognition_node: not implemented yet", file=sys.stderr)
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(_main, argv)
