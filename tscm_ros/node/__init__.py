"""The ROS 2 node: camera images in, tscm_ros/LoopCandidates out (the only part that needs rclpy).

- ``node``: ``PlaceRecognitionNode`` and its ``main``.
- ``parameters``: the node's parameters; ``inputs``: the image mailbox and input checks;
  ``messages``: the output message; ``markers``: RViz markers; ``diagnostics``: /diagnostics.

Imports ``detect``, ``map``, ``describe``, ``io``, the generated ``tscm_ros.msg`` and the package floor.
"""
