"""Start the pose-graph back-end (pose_graph_node) with config/pose_graph.yaml.

    ros2 launch tscm_ros pose_graph.launch.py odom_topic:=/odom

place_recognition.launch.py includes it with pose_graph:=true. An argument left empty keeps the parameter
file's value.
"""

import os

from ament_index_python.packages import get_package_share_directory
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node

from launch import LaunchDescription

ARGUMENTS = {"odom_topic": "the robot's odometry (nav_msgs/Odometry), in the frame the map was built in",
             "map_frame": "frame of the corrected path"}


def _node(context):
    overrides = {name: LaunchConfiguration(name).perform(context) for name in ARGUMENTS}
    return [Node(package="tscm_ros", executable="pose_graph_node", name="tscm_pose_graph", output="screen",
                 emulate_tty=True,
                 parameters=[LaunchConfiguration("pose_graph_params_file").perform(context),
                             {name: value for name, value in overrides.items() if value != ""}])]


def generate_launch_description():
    default_params = os.path.join(get_package_share_directory("tscm_ros"), "config", "pose_graph.yaml")
    arguments = [DeclareLaunchArgument("pose_graph_params_file", default_value=default_params,
                                       description="ROS parameter file for pose_graph_node")]
    arguments += [DeclareLaunchArgument(name, default_value="", description=description)
                  for name, description in ARGUMENTS.items()]
    return LaunchDescription(arguments + [OpaqueFunction(function=_node)])
