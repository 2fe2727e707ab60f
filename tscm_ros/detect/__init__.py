"""Loop-closure detection: one image in, ranked and checked loop candidates out.

- ``detection``: ``Detector`` (the protocol), ``Detection``, ``Match`` and ``MatchingConfig``.
- ``loop_detector``: ``LoopDetector``, the learned detector the node, ``build_map`` and evaluation share.
- ``verification``: geometric verification (``verify``, ``VerificationConfig``, ``CameraIntrinsics``).
- ``temporal``: temporal consistency (``TemporalConsistency``, ``TemporalConfig``).
- ``bow_baseline``: the classical ORB bag-of-words baseline (``BowLoopDetector``).

Imports ``map``, ``describe``, ``io`` and the package floor.
"""
