"""Start the pose-graph back-end (pose_graph_node) with config/pose_graph.yaml.

    ros2 launch tscm_ros pose_graph.launch.py odom_topic:=/odom

place_recognition.launch.py includes it with pose_graph:=true. An argument left empty keeps the parameter
file's value. When the node fails (a bad parameter: exit code 2; a crash), `ros2 launch` shuts down what it
started and exits non-zero, here and where place_recognition.launch.py includes it.
"""

import os

from ament_index_python.packages import get_package_share_directory
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node

from launch import LaunchDescription

ARGUMENTS = {"odom_topic": "the robot's odometry (nav_msgs/Odometry), in the frame the map was built in",
             "map_frame": "frame of the corrected path"}


class NodeFailed(RuntimeError):
    """Raised when the node exits with an error: launch then shuts down and exits non-zero."""


def _on_node_exit(event, context):
    if event.returncode != 0:
        raise NodeFailed(f"{event.action.name} exited with code {event.returncode}: shutting down")


def _node(context):
    overrides = {name: LaunchConfiguration(name).perform(context) for name in ARGUMENTS}
    return [Node(package="tscm_ros", executable="pose_graph_node", name="tscm_pose_graph", output="screen",
                 emulate_tty=True, on_exit=_on_node_exit,
                 parameters=[LaunchConfiguration("pose_graph_params_file").perform(context),
                             {name: value for name, value in overrides.items() if value != ""}])]


def generate_launch_description():
    default_params = os.path.join(get_package_share_directory("tscm_ros"), "config", "pose_graph.yaml")
    arguments = [DeclareLaunchArgument("pose_graph_params_file", default_value=default_params,
                                       description="ROS parameter file for pose_graph_node")]
    arguments += [DeclareLaunchArgument(name, default_value="", description=description)
                  for name, description in ARGUMENTS.items()]
    return LaunchDescription(arguments + [OpaqueFunction(function=_node)])
