"""Training the teacher and the distilled student.

- ``training``: ``train``, set up, then per epoch train, validate and save.
- ``config``: ``TrainConfig`` (config/train_*.yaml) and the model it names; ``run``: the run directory.
- ``validation``: recall and score calibration on the val split while training.
- ``feature_cache``: the frozen backbones' outputs, computed once; ``augment``: image augmentation.
- ``losses``: the TSCM losses; ``mining``: triplet mining by place.

Imports ``evaluate`` (metrics and reports), ``describe``, ``io`` and the package floor.
"""
