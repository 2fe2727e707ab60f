"""Reading the world in: recordings, image messages, poses and datasets on disk.

- ``bag``: ``FrameSource`` (the one way to open a bag), ``Frame``, ``FrameReader``.
- ``image_messages``: sensor_msgs/Image and CompressedImage to RGB arrays.
- ``geometry``: ``Pose``, stamps, pose messages, ``PoseInterpolator``.
- ``dataset``: a place-recognition dataset on disk; ``dataset_extraction`` makes one from bags.
- ``revisit_set``: reference images, query images and their ground truth (``RevisitSet``).

Imports only the package floor (``tscm_ros.errors``, ``atomic``, ``progress``).
"""
