"""The keyframe map: descriptors in a FAISS index with each keyframe's stamp, pose and local features.

- ``keyframe_map``: ``KeyframeMap``, its ``Candidate`` results and ``KeyframeMeta``.
- ``building``: the one keyframe-building path (``KeyframeBuilder``, ``KeyframeSelector``, ``build_map``).
- ``storage``: the map directory on disk (``write_map``, ``read_map``); ``autosave``: ``MapSaver``.
- ``index``: ``IndexConfig`` and the FAISS index chain; ``calibration``: per-map score calibration;
  ``exclusion``: which keyframes a query must not return; ``growing_array``: ``GrowingArray``.

Imports ``describe``, ``io`` and the package floor.
"""
