"""Start the tscm_ros place-recognition node with config/place_recognition.yaml.

    ros2 launch tscm_ros place_recognition.launch.py map:=/path/to/map model:=/path/to/student.pt

Launch arguments override the common parameters; everything else comes from the parameter file
(params_file:=... to use another one). An argument left empty keeps the parameter file's value.

pose_graph:=true also starts the pose-graph back-end (pose_graph.launch.py, with its odom_topic:=...).

The launch ends with the node: when it exits, everything launched shuts down, and when it failed (a bad
parameter, a missing map: exit code 2; a crash) `ros2 launch` itself exits non-zero, so scripts and CI see it.

Camera-sized images: Fast DDS's shared-memory segment (512 kB by default) cannot hold a 640x480 image, and
best-effort fragments sent instead are lost. The launch sets FASTDDS_DEFAULT_PROFILES_FILE to
config/fastdds_large_images.xml (a 32 MB segment) for what it starts and what a launch including it starts
afterwards, unless the environment names a profile already (dds_profile:=none leaves it alone). The camera
driver, which writes the images, needs it too: launch it after this, or export the variable (README).
"""

import os

from ament_index_python.packages import get_package_share_directory
from launch.actions import (
    DeclareLaunchArgument,
    IncludeLaunchDescription,
    OpaqueFunction,
    SetEnvironmentVariable,
    Shutdown,
)
from launch.conditions import IfCondition
from launch.launch_description_sources import PythonLaunchDescriptionSource
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node

from launch import LaunchDescription

# launch argument -> (node parameter, type, description)
COMMON_ARGUMENTS = {
    "map": ("map_path", str, "keyframe map directory (from build_map)"),
    "model": ("model_path", str, "checkpoint from train; empty in the file = the training-free default (VLAD "
              "with the map's vocabulary)"),
    "image_topic": ("image_topic", str, "camera image topic"),
    "device": ("device", str, "auto, cpu or cuda"),
    "use_compressed": ("use_compressed", bool, "subscribe to sensor_msgs/CompressedImage (true/false)"),
    "camera_info_topic": ("camera_info_topic", str,
                          "sensor_msgs/CameraInfo topic: verification then gives relative poses"),
    "verify": ("verify", bool, "geometric verification of candidates (true/false)"),
    "temporal_consistency": ("temporal_consistency", bool, "temporal consistency of candidates (true/false)"),
}


def _parameter_value(text, kind):
    if kind is bool:
        if text.lower() not in ("true", "false"):
            raise ValueError(f"expected true or false, got {text!r}")
        return text.lower() == "true"
    return text


class NodeFailed(RuntimeError):
    """Raised when the node exits with an error: launch then shuts down and returns a non-zero exit code
    (LaunchService.run returns 1 on an exception; a process's own exit code alone does not change it)."""


def _on_node_exit(event, context):
    if event.returncode != 0:
        raise NodeFailed(f"{event.action.name} exited with code {event.returncode}: shutting down")
    return [Shutdown(reason=f"{event.action.name} exited")]


PROFILE_VARIABLE = "FASTDDS_DEFAULT_PROFILES_FILE"


def _dds_profile(context):
    chosen = LaunchConfiguration("dds_profile").perform(context)
    if chosen == "none" or (chosen == "" and os.environ.get(PROFILE_VARIABLE)):
        return []
    default = os.path.join(get_package_share_directory("tscm_ros"), "config", "fastdds_large_images.xml")
    return [SetEnvironmentVariable(PROFILE_VARIABLE, chosen or default)]


def _node(context):
    overrides = {}
    for argument, (parameter, kind, _) in COMMON_ARGUMENTS.items():
        text = LaunchConfiguration(argument).perform(context)
        if text != "":
            overrides[parameter] = _parameter_value(text, kind)
    return [
        Node(
            package="tscm_ros",
            executable="place_recognition_node",
            name="tscm_place_recognition",
            output="screen",
            emulate_tty=True,
            parameters=[LaunchConfiguration("params_file").perform(context), overrides],
            on_exit=_on_node_exit,
        )
    ]


def generate_launch_description():
    default_params = os.path.join(get_package_share_directory("tscm_ros"), "config", "place_recognition.yaml")
    arguments = [DeclareLaunchArgument("params_file", default_value=default_params,
                                       description="ROS parameter file for the node"),
                 DeclareLaunchArgument("dds_profile", default_value="",
                                       description="Fast DDS XML profile (FASTDDS_DEFAULT_PROFILES_FILE) for what this "
                                       "launch starts; empty: config/fastdds_large_images.xml unless the environment "
                                       "names one; none: leave the environment alone")]
    arguments += [DeclareLaunchArgument(name, default_value="", description=description)
                  for name, (_, _, description) in COMMON_ARGUMENTS.items()]
    arguments.append(DeclareLaunchArgument("pose_graph", default_value="false",
                                           description="also start the pose-graph back-end (pose_graph.launch.py; "
                                           "its odom_topic argument names the odometry)"))
    pose_graph = IncludeLaunchDescription(
        PythonLaunchDescriptionSource(os.path.join(get_package_share_directory("tscm_ros"), "launch",
                                                   "pose_graph.launch.py")),
        condition=IfCondition(LaunchConfiguration("pose_graph")))
    return LaunchDescription(arguments + [OpaqueFunction(function=_dds_profile), OpaqueFunction(function=_node),
                                          pose_graph])
