"""Images to descriptors: preprocessing, the networks, checkpoints, score calibration and local features.

- ``describer``: ``describer_for`` (the one way to get a ``Describer`` by name or checkpoint), ``Describer``.
- ``models``: the networks (building blocks, backbones, teacher / student / baseline nets, VLAD).
- ``checkpoint``: versioned checkpoints, model config files, TorchScript and ONNX export.
- ``preprocess``: the one image preprocessing (``PreprocessConfig``, ``preprocess``).
- ``calibration``: ``ScoreCalibration``, a similarity turned into a precision.
- ``local_features``: ``LocalFeatures`` and ``extract_local_features`` (what verification matches and the map
  stores).

Imports the package floor only (not ``io``).
"""
