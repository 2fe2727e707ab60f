"""The pose-graph back-end: what the loop candidates are for.

- ``pose_graph``: ``PoseGraph``, odometry and loop closures in one incremental (iSAM2) graph on GTSAM, with a
  robust kernel on the loops; the online ``pose_graph_node`` and ``evaluate --pose-graph`` share it.

Imports ``io`` and the package floor (no ROS).
"""
