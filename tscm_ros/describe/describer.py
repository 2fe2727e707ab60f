"""The one inference path: RGB images -> L2-normalised float32 descriptors, for maps, evaluation and the node.

``describer_for(model)`` is the one way to a Describer from a model name or checkpoint; the ``Describer``
constructor is for code that already holds a network. ``load_named_model(model)`` is the one place that
resolves the names the command lines take (``export_model`` wants the network itself): ``default`` (or
None) is the training-free default, VLAD over pretrained EfficientNet-Lite tokens
(config/model_vlad_default.yaml, tscm_ros/describe/models/vlad.py) with the generic vocabulary shipped in the package
(tscm_ros/weights/generic_vocabulary.npz); a map replaces that vocabulary with one fitted on its own images
(``Describer.with_vocabulary``). ``pretrained`` is the "pretrained backbone + GeM" baseline for evaluation;
anything else is a checkpoint path.
"""

from __future__ import annotations

import copy
import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tscm_ros.describe.calibration import ScoreCalibration
from tscm_ros.describe.checkpoint import load_checkpoint, load_model_config, model_fingerprint, onnx_model_bytes
from tscm_ros.describe.models.nets import build_model, prepare_for_inference
from tscm_ros.describe.models.vlad import VladNet, Vocabulary
from tscm_ros.describe.preprocess import PreprocessConfig, preprocess
from tscm_ros.errors import ConfigError

LOG = logging.getLogger(__name__)

DEFAULT_CONFIG = "vlad_default"
GENERIC_VOCABULARY = Path(__file__).resolve().parents[1] / "weights" / "generic_vocabulary.npz"
BASELINE_CONFIG = "baseline_offline"
PRETRAINED = "pretrained"  # model name of the pretrained backbone + GeM baseline
DEFAULT_MODEL = "default"  # model name of the training-free default


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' -> the first CUDA GPU when one is usable, else the CPU; ConfigError for an unusable device."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"invalid device {device!r}: {exc}") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} was requested but no CUDA GPU is usable here; use 'auto' or 'cpu'")
    return resolved


BACKENDS = ("auto", "torch", "onnxruntime")
VOCABULARY_INPUTS = ("centres", "token_mean", "token_basis")  # the exported graph's inputs after the images


def onnxruntime_available() -> bool:
    """Whether the ONNX Runtime backend can be used here (``onnxruntime`` and ``onnx`` import)."""
    try:
        import onnx  # noqa: F401  (the exporter needs it)
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


class DescriberGraph(nn.Module):
    """A network as the Describer runs it: ``(descriptors, *feature_maps)`` from images, the feature maps being
    its ``trunk()`` outputs; a VLAD network takes its vocabulary's tensors as further inputs, so a map's own
    vocabulary needs no other graph."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor, *vocabulary: torch.Tensor) -> tuple[torch.Tensor, ...]:
        maps = self.model.trunk(images)
        return (self.model.head(*maps, *vocabulary), *maps)


class OnnxRuntimeRunner:
    """A network's :class:`DescriberGraph` exported to ONNX in memory and run by ONNX Runtime on the CPU.

    Worker threads sleep instead of spinning between operators: on a robot's CPU shared with other
    processes, spinning threads (and torch's OpenMP threads) lose whole time slices to each other.
    """

    def __init__(self, model: nn.Module, preprocess_config: PreprocessConfig, threads: int) -> None:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        graph = DescriberGraph(model)
        vocabulary = ({name: t.clone() for name, t in zip(VOCABULARY_INPUTS, model.vlad.vocabulary_tensors())}
                      if isinstance(model, VladNet) else {})
        with torch.no_grad():
            images = torch.zeros(1, 3, preprocess_config.height, preprocess_config.width)
            maps = len(graph(images, *vocabulary.values())) - 1
        self.outputs = ("descriptors", *(f"feature_map_{i}" for i in range(maps)))
        self.inputs = ("images", *vocabulary)
        exported = onnx_model_bytes(graph, preprocess_config, outputs=self.outputs, extra_inputs=vocabulary)
        self.session = onnxruntime.InferenceSession(exported, options, providers=["CPUExecutionProvider"])

    def __call__(self, images: torch.Tensor, *vocabulary: torch.Tensor, maps: bool = True) -> tuple[torch.Tensor, ...]:
        """``(descriptors, *feature_maps)``, or ``(descriptors,)`` without ``maps``."""
        inputs = dict(zip(self.inputs, (x.contiguous().numpy() for x in (images, *vocabulary))))
        wanted = list(self.outputs if maps else self.outputs[:1])
        return tuple(torch.from_numpy(x) for x in self.session.run(wanted, inputs))


def adapted_fingerprint(base_fingerprint: str, own: Vocabulary, vocabulary: Vocabulary) -> str:
    """The fingerprint of a model (``base_fingerprint``, with its ``own`` vocabulary) that describes with
    ``vocabulary`` instead (a map's own): the model's when it is the same vocabulary."""
    if vocabulary.fingerprint() == own.fingerprint():
        return base_fingerprint
    return hashlib.sha256(f"{base_fingerprint}|{vocabulary.fingerprint()}".encode()).hexdigest()[:16]


class Describer:
    """Computes descriptors with a model in inference mode, in batches, on CPU or GPU.

    Attributes: ``fingerprint`` (the hash maps record: the model's own, ``base_fingerprint``, combined with
    the vocabulary when a map's vocabulary replaced the model's), ``dim``, ``preprocess_config``, ``device``,
    ``model_name``, ``backend`` ('torch' or 'onnxruntime'), ``calibration`` (the checkpoint's
    :class:`~tscm_ros.describe.calibration.ScoreCalibration`, or None) and ``vocabulary`` (the VLAD vocabulary in use,
    None for models without one).

    A descriptor is the network's ``head`` applied to its ``trunk`` outputs (the backbone's feature maps):
    ``describe`` computes descriptors, ``describe_with_maps`` also returns the feature maps, ``aggregate``
    computes descriptors from kept feature maps. A model with a vocabulary (``adapts_to_map``) fits one on
    a map's images (``fit_vocabulary``), and ``with_vocabulary`` gives the describer that uses it, sharing
    this one's network.

    Backends (bench/descriptor_latency.py measures them): 'onnxruntime' runs the network exported to ONNX,
    the fastest CPU path here (about 2x the torch path, and it stays fast when other processes load the
    CPU); 'torch' runs it with batch norms folded into convolutions in channels-last layout (on GPU, or
    when ONNX Runtime is not installed). 'auto' picks 'onnxruntime' on the CPU when it is installed.
    CPU threads follow ``torch.get_num_threads()``, which is left to the caller.
    """

    def __init__(
        self, model: nn.Module, preprocess_config: PreprocessConfig, fingerprint: str, model_name: str,
        device: str | torch.device = "auto", batch_size: int = 16, backend: str = "auto",
        vocabulary: Vocabulary | None = None, calibration: ScoreCalibration | None = None,
    ) -> None:
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        if backend not in BACKENDS:
            raise ConfigError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if isinstance(model, VladNet) and vocabulary is None:
            raise ConfigError(f"{model_name} describes with a VLAD vocabulary: give one (the generic one, or a map's)")
        self.device = resolve_device(device)
        self.preprocess_config = preprocess_config
        self.base_fingerprint = self.fingerprint = fingerprint
        self.model_name = model_name
        self.dim = int(model.dim)
        self.batch_size = int(batch_size)
        self.calibration = calibration  # from the checkpoint; None: scores are raw similarity
        self.vocabulary = self._own_vocabulary = vocabulary if isinstance(model, VladNet) else None
        self._adapts_to_map = isinstance(model, VladNet) and model.adapts_to_map
        self._network = prepare_for_inference(model).to(self.device)
        self._vocabulary_tensors = self._tensors(self.vocabulary)
        self._runner: Any = None
        if backend == "onnxruntime":
            if self.device.type != "cpu":
                raise ConfigError(f"the onnxruntime backend runs on the CPU only, not on {self.device}")
            if not onnxruntime_available():
                raise ConfigError("backend 'onnxruntime' needs the PyPI packages onnxruntime and onnx")
            self._runner = OnnxRuntimeRunner(model, preprocess_config, torch.get_num_threads())
        elif backend == "auto" and self.device.type == "cpu" and onnxruntime_available():
            try:
                self._runner = OnnxRuntimeRunner(model, preprocess_config, torch.get_num_threads())
            except Exception as exc:  # an operator the exporter or runtime lacks: the torch path still works
                LOG.warning("ONNX Runtime cannot run %s (%s); using the torch backend", model_name, exc)
        self.backend = "onnxruntime" if self._runner is not None else "torch"

    @property
    def adapts_to_map(self) -> bool:
        """Whether a map fits this model's vocabulary from its own images (a distilled student keeps its own)."""
        return self._adapts_to_map

    def with_vocabulary(self, vocabulary: Vocabulary) -> Describer:
        """This model with ``vocabulary`` in place of its own (sharing the network); its fingerprint combines
        the model's and the vocabulary's. ConfigError for a model without a vocabulary or of another shape."""
        if not self.adapts_to_map:
            raise ConfigError(f"{self.model_name} has no VLAD vocabulary to replace")
        if vocabulary.shapes != self.vocabulary.shapes:
            raise ConfigError(f"a vocabulary of shapes {vocabulary.shapes} does not fit {self.model_name}, "
                              f"which needs {self.vocabulary.shapes}")
        adapted = copy.copy(self)
        adapted.vocabulary = vocabulary
        adapted._vocabulary_tensors = self._tensors(vocabulary)
        adapted.fingerprint = adapted_fingerprint(self.base_fingerprint, self._own_vocabulary, vocabulary)
        return adapted

    def _tensors(self, vocabulary: Vocabulary | None) -> tuple[torch.Tensor, ...]:
        return () if vocabulary is None else tuple(t.to(self.device) for t in vocabulary.tensors())

    def fit_vocabulary(self, feature_maps: Sequence[np.ndarray]) -> Vocabulary:
        """A vocabulary fitted on the feature maps of a map's images (``feature_maps``, one per image)."""
        if not self.adapts_to_map:
            raise ConfigError(f"{self.model_name} has no VLAD vocabulary to fit")
        return self._network.fit_vocabulary(np.stack([np.asarray(m, dtype=np.float32) for m in feature_maps]))

    def _batches(self, images: Sequence[np.ndarray], maps: bool):
        """``(descriptors, *feature_maps)`` as float32 arrays for each batch of ``images``."""
        with torch.inference_mode():
            for start in range(0, len(images), self.batch_size):
                batch = preprocess(images[start : start + self.batch_size], self.preprocess_config, self.device)
                if self.backend == "onnxruntime":
                    outputs = self._runner(batch, *self._vocabulary_tensors, maps=maps)
                else:
                    outputs = DescriberGraph(self._network)(batch.contiguous(memory_format=torch.channels_last),
                                                            *self._vocabulary_tensors)
                    outputs = outputs if maps else outputs[:1]
                yield [x.float().cpu().numpy() for x in outputs]

    def describe(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Descriptors (N, dim) float32 with unit-norm rows for HxWx3 uint8 RGB images of any size."""
        output = np.empty((len(images), self.dim), dtype=np.float32)
        start = 0
        for descriptors, *_ in self._batches(images, maps=False):
            output[start : start + len(descriptors)] = descriptors
            start += len(descriptors)
        return output

    def describe_with_maps(self, images: Sequence[np.ndarray]) -> tuple[np.ndarray, list[tuple[np.ndarray, ...]]]:
        """``describe(images)`` and, per image, the trunk's feature maps (without the batch axis), which
        ``aggregate`` and ``fit_vocabulary`` take."""
        output = np.empty((len(images), self.dim), dtype=np.float32)
        maps: list[tuple[np.ndarray, ...]] = []
        for descriptors, *feature_maps in self._batches(images, maps=True):
            output[len(maps) : len(maps) + len(descriptors)] = descriptors
            maps += [tuple(x[i] for x in feature_maps) for i in range(len(descriptors))]
        return output, maps

    def aggregate(self, feature_maps: Sequence[tuple[np.ndarray, ...]]) -> np.ndarray:
        """Descriptors (N, dim) float32 with unit-norm rows from kept feature maps (``describe_with_maps``)."""
        output = np.empty((len(feature_maps), self.dim), dtype=np.float32)
        with torch.inference_mode():
            for start in range(0, len(feature_maps), self.batch_size):
                chunk = feature_maps[start : start + self.batch_size]
                inputs = [torch.from_numpy(np.stack([np.asarray(maps[i], dtype=np.float32) for maps in chunk]))
                          .to(self.device) for i in range(len(chunk[0]))]
                descriptors = self._network.head(*inputs, *self._vocabulary_tensors)
                output[start : start + len(chunk)] = descriptors.float().cpu().numpy()
        return output


@dataclass
class NamedModel:
    """A network with what describing with it needs: preprocessing, fingerprint, name, score calibration and,
    for a VLAD model, its vocabulary."""

    network: nn.Module
    preprocess: PreprocessConfig
    fingerprint: str
    name: str
    calibration: ScoreCalibration | None = field(default=None)
    vocabulary: Vocabulary | None = field(default=None)


def load_named_model(model: str | Path | None) -> NamedModel:
    """The network a model name stands for: ``default`` or None (the training-free VLAD with the generic
    vocabulary), ``pretrained`` (the GeM baseline), else a checkpoint path (a ``Path`` is always one)."""
    if model == PRETRAINED:
        return _untrained(*load_model_config(BASELINE_CONFIG))
    if model is None or model == DEFAULT_MODEL:
        config, preprocess_config = load_model_config(DEFAULT_CONFIG)
        network = build_model(config)
        vocabulary = generic_vocabulary()
        network.set_vocabulary(vocabulary)
        fingerprint = model_fingerprint(config, preprocess_config, network.state_dict())
        return NamedModel(network, preprocess_config, fingerprint, str(config.get("name", config["kind"])),
                          vocabulary=vocabulary)
    loaded = load_checkpoint(model)
    calibration = loaded.extra.get("score_calibration")
    vocabulary = None
    if isinstance(loaded.model, VladNet):
        arrays = dict(zip(VOCABULARY_INPUTS, (t.numpy() for t in loaded.model.vlad.vocabulary_tensors())))
        vocabulary = Vocabulary(**arrays, images=int(loaded.extra.get("vocabulary_images", 0)),
                                source="generic" if loaded.model.adapts_to_map else "distilled")
    return NamedModel(loaded.model, loaded.preprocess, loaded.fingerprint,
                      str(loaded.model_config.get("name", loaded.kind)),
                      None if calibration is None else ScoreCalibration.from_dict(calibration, str(model)), vocabulary)


def generic_vocabulary(path: Path = GENERIC_VOCABULARY) -> Vocabulary:
    """The vocabulary shipped with the package (tools/fit_generic_vocabulary.py fits it), for maps too small to
    fit their own; ConfigError naming the file when it is missing or damaged."""
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in VOCABULARY_INPUTS if name in data.files}
            return Vocabulary(**arrays, images=int(data["images"]), source="generic")
    except (OSError, KeyError, ValueError, ConfigError) as exc:
        raise ConfigError(f"the generic vocabulary {path} is missing or damaged ({exc}): reinstall tscm_ros, or "
                          "rebuild it with tools/fit_generic_vocabulary.py") from exc


def _untrained(model_config: dict[str, Any], preprocess_config: PreprocessConfig) -> NamedModel:
    network = build_model(model_config)
    fingerprint = model_fingerprint(model_config, preprocess_config, network.state_dict())
    return NamedModel(network, preprocess_config, fingerprint, str(model_config.get("name", model_config["kind"])))


def describer_for(model: str | Path | None, device: str = "auto", batch_size: int = 16,
                  backend: str = "auto") -> Describer:
    """The Describer of a model name or checkpoint (``load_named_model``): ``default`` or None, ``pretrained``,
    else a checkpoint path."""
    named = load_named_model(model)
    return Describer(named.network, named.preprocess, named.fingerprint, named.name, device, batch_size, backend,
                     named.vocabulary, named.calibration)
