"""pip install path for machines without a ROS 2 workspace (library + the same executables).

Inside a ROS 2 workspace, colcon builds the package with CMakeLists.txt instead, which also
generates the tscm_ros.msg messages (rosidl) and installs the executables under lib/tscm_ros.
"""

from glob import glob

from setuptools import find_packages, setup

PACKAGE = "tscm_ros"
EXECUTABLES = [
    "place_recognition_node",
    "pose_graph_node",
    "build_map",
    "extract_dataset",
    "train",
    "evaluate",
    "simulate_route",
    "export_model",
]

setup(
    name=PACKAGE,
    version="0.1.0",
    description="Visual place recognition and loop-closure detection with a TSCM-distilled student",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=[PACKAGE, f"{PACKAGE}.*"]),
    package_data={PACKAGE: ["weights/*.npz"]},
    data_files=[
        ("share/ament_index/resource_index/packages", [f"resource/{PACKAGE}"]),
        (f"share/{PACKAGE}", ["package.xml"]),
        (f"share/{PACKAGE}/launch", glob("launch/*.py")),
        (f"share/{PACKAGE}/config", glob("config/*.yaml")),
    ],
    entry_points={
        "console_scripts": [f"{exe}={PACKAGE}.cli.{exe}:main" for exe in EXECUTABLES],
    },
)
