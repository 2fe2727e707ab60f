"""place_recognition_node: camera images in, loop-closure candidates out on /tscm/loop_candidates."""

from __future__ import annotations

import sys
from collections.abc import Sequence

USAGE = """usage: place_recognition_node [--ros-args -p NAME:=VALUE ... --params-file FILE -r FROM:=TO]

ROS 2 node: describes camera images with the TSCM student network, matches them against a keyframe
map (build_map) and publishes tscm_ros/LoopCandidates on /tscm/loop_candidates (one message per
processed image, empty candidate list when nothing matched). Status on /diagnostics; in mapping
mode a std_srvs/Trigger service ~/save_map. Usually started with
  ros2 launch tscm_ros place_recognition.launch.py map:=MAP [model:=CKPT]

parameters (defaults as in config/place_recognition.yaml):
"""


def help_text() -> str:
    from tscm_ros.node.parameters import PARAMETERS

    width = max(len(p.name) for p in PARAMETERS)
    lines = [f"  {p.name:<{width}}  {p.description} (default: {p.default!r})" for p in PARAMETERS]
    return USAGE + "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    own_args = argv[: argv.index("--ros-args")] if "--ros-args" in argv else argv
    if "-h" in own_args or "--help" in own_args:
        print(help_text())
        return 0
    from tscm_ros.node.node import main as node_main

    return node_main(args=["place_recognition_node", *argv])


if __name__ == "__main__":
    raise SystemExit(main())
