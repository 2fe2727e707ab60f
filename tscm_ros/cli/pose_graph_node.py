"""pose_graph_node: odometry and loop candidates in, the corrected path and map -> odom out."""

from __future__ import annotations

import sys
from collections.abc import Sequence

USAGE = """usage: pose_graph_node [--ros-args -p NAME:=VALUE ... --params-file FILE -r FROM:=TO]

ROS 2 node: the pose-graph back-end (GTSAM iSAM2) behind place_recognition_node. Subscribes to the robot's
odometry and to /tscm/loop_candidates; each published loop pulls the query's pose onto its keyframe's position
in the map (robust kernel: one false loop does not bend the path). Publishes the corrected path
(nav_msgs/Path on /tscm/corrected_path) and the map -> odometry-frame transform (/tscm/map_to_odom, and /tf
where the ROS install has tf2_msgs). The odometry must be in the frame the map was built in, starting where
the map says. Usually started with
  ros2 launch tscm_ros place_recognition.launch.py map:=MAP pose_graph:=true odom_topic:=/odom

parameters (defaults as in config/pose_graph.yaml):
"""


def help_text() -> str:
    from tscm_ros.node.pose_graph_node import PARAMETERS

    width = max(len(p.name) for p in PARAMETERS)
    lines = [f"  {p.name:<{width}}  {p.description} (default: {p.default!r})" for p in PARAMETERS]
    return USAGE + "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    own_args = argv[: argv.index("--ros-args")] if "--ros-args" in argv else argv
    if "-h" in own_args or "--help" in own_args:
        print(help_text())
        return 0
    from tscm_ros.node.pose_graph_node import main as node_main

    return node_main(args=["pose_graph_node", *argv])


if __name__ == "__main__":
    raise SystemExit(main())
