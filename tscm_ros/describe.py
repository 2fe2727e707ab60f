"""The one inference path: RGB images -> L2-normalised float32 descriptors, for maps, evaluation and the node.

``load_named_model(model)`` is the one place that resolves the model names the command lines take:
``default`` (or None) is the default student, the checkpoint shipped in the package
(tscm_ros/weights/default_student.pt, pretrained on rendered worlds by ``make pretrain``, loaded offline
like the ImageNet weights; without that file, the untrained student of config/model_student_offline.yaml,
and a warning says so); ``pretrained`` is the "pretrained backbone + GeM" baseline for evaluation;
anything else is a checkpoint path. ``describer_for(model)`` gives its Describer;
``Describer.from_checkpoint(path)`` loads a checkpoint (None: the default student).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tscm_ros.calibration import ScoreCalibration
from tscm_ros.checkpoint import load_checkpoint, load_model_config, model_fingerprint, onnx_model_bytes
from tscm_ros.errors import ConfigError
from tscm_ros.models.nets import build_model, prepare_for_inference
from tscm_ros.preprocess import PreprocessConfig, preprocess

LOG = logging.getLogger(__name__)

DEFAULT_STUDENT_CONFIG = "student_offline"
DEFAULT_WEIGHTS = Path(__file__).resolve().parent / "weights" / "default_student.pt"
BASELINE_CONFIG = "baseline_offline"
PRETRAINED = "pretrained"  # model name of the pretrained backbone + GeM baseline
DEFAULT_MODEL = "default"  # model name of the default student


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


def onnxruntime_available() -> bool:
    """Whether the ONNX Runtime backend can be used here (``onnxruntime`` and ``onnx`` import)."""
    try:
        import onnx  # noqa: F401  (the exporter needs it)
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


class OnnxRuntimeRunner:
    """A network exported to ONNX in memory and run by ONNX Runtime on the CPU.

    Worker threads sleep instead of spinning between operators: on a robot's CPU shared with other
    processes, spinning threads (and torch's OpenMP threads) lose whole time slices to each other.
    """

    def __init__(self, model: nn.Module, preprocess_config: PreprocessConfig, threads: int) -> None:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = onnxruntime.InferenceSession(
            onnx_model_bytes(model, preprocess_config), options, providers=["CPUExecutionProvider"]
        )

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        (descriptors,) = self.session.run(None, {"images": images.contiguous().numpy()})
        return torch.from_numpy(descriptors)


class Describer:
    """Computes descriptors with a model in inference mode, in batches, on CPU or GPU.

    Attributes: ``fingerprint`` (the model's hash, recorded by maps), ``dim``, ``preprocess_config``,
    ``device``, ``model_name``, ``backend`` ('torch' or 'onnxruntime'), ``calibration`` (the checkpoint's
    :class:`~tscm_ros.calibration.ScoreCalibration`, or None).

    Backends (bench/descriptor_latency.py measures them): 'onnxruntime' runs the network exported to ONNX,
    the fastest CPU path here (about 2x the torch path, and it stays fast when other processes load the
    CPU); 'torch' runs it with batch norms folded into convolutions in channels-last layout (on GPU, or
    when ONNX Runtime is not installed). 'auto' picks 'onnxruntime' on the CPU when it is installed.
    CPU threads follow ``torch.get_num_threads()``, which is left to the caller.
    """

    def __init__(
        self, model: nn.Module, preprocess_config: PreprocessConfig, fingerprint: str, model_name: str,
        device: str | torch.device = "auto", batch_size: int = 16, backend: str = "auto",
    ) -> None:
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        if backend not in BACKENDS:
            raise ConfigError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.device = resolve_device(device)
        self.preprocess_config = preprocess_config
        self.fingerprint = fingerprint
        self.model_name = model_name
        self.dim = int(model.dim)
        self.batch_size = int(batch_size)
        self.calibration: ScoreCalibration | None = None  # from the checkpoint; None: scores are raw similarity
        self._network: Any = None
        if backend == "onnxruntime":
            if self.device.type != "cpu":
                raise ConfigError(f"the onnxruntime backend runs on the CPU only, not on {self.device}")
            if not onnxruntime_available():
                raise ConfigError("backend 'onnxruntime' needs the PyPI packages onnxruntime and onnx")
            self._network = OnnxRuntimeRunner(model, preprocess_config, torch.get_num_threads())
        elif backend == "auto" and self.device.type == "cpu" and onnxruntime_available():
            try:
                self._network = OnnxRuntimeRunner(model, preprocess_config, torch.get_num_threads())
            except Exception as exc:  # an operator the exporter or runtime lacks: the torch path still works
                LOG.warning("ONNX Runtime cannot run %s (%s); using the torch backend", model_name, exc)
        self.backend = "onnxruntime" if self._network is not None else "torch"
        if self._network is None:
            self._network = prepare_for_inference(model).to(self.device)

    @classmethod
    def from_checkpoint(
        cls, path: str | Path | None, device: str = "auto", batch_size: int = 16, backend: str = "auto"
    ) -> Describer:
        """Load a checkpoint (any kind), or the default student when ``path`` is None."""
        return describer_for(DEFAULT_MODEL if path is None else Path(path), device, batch_size, backend)

    @classmethod
    def from_config(
        cls, source: str | Path | dict[str, Any], device: str = "auto", batch_size: int = 16, kind: str | None = None,
        preprocess_config: PreprocessConfig | None = None, backend: str = "auto",
    ) -> Describer:
        """Build an untrained model (pretrained backbone weights, seeded rest) from a config file, preset
        name, or an already-loaded model config dict (then ``preprocess_config`` is required)."""
        if isinstance(source, dict):
            if preprocess_config is None:
                raise ConfigError("Describer.from_config with a config dict needs preprocess_config")
            model_config = source
        else:
            model_config, preprocess_config = load_model_config(source, kind=kind)
        model = build_model(model_config)
        fingerprint = model_fingerprint(model_config, preprocess_config, model.state_dict())
        name = str(model_config.get("name", model_config["kind"]))
        return cls(model, preprocess_config, fingerprint, name, device, batch_size, backend)

    def describe(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Descriptors (N, dim) float32 with unit-norm rows for HxWx3 uint8 RGB images of any size."""
        output = np.empty((len(images), self.dim), dtype=np.float32)
        with torch.inference_mode():
            for start in range(0, len(images), self.batch_size):
                batch = preprocess(images[start : start + self.batch_size], self.preprocess_config, self.device)
                if self.backend == "torch":
                    batch = batch.contiguous(memory_format=torch.channels_last)
                output[start : start + len(batch)] = self._network(batch).float().cpu().numpy()
        return output


@dataclass
class NamedModel:
    """A network with what describing with it needs: preprocessing, fingerprint, name, score calibration."""

    network: nn.Module
    preprocess: PreprocessConfig
    fingerprint: str
    name: str
    calibration: ScoreCalibration | None = field(default=None)


def load_named_model(model: str | Path | None) -> NamedModel:
    """The network a model name stands for: ``pretrained`` (the baseline), ``default`` or None (the default
    student), else a checkpoint path (a ``Path`` is always a checkpoint)."""
    if model == PRETRAINED:
        config, preprocess_config = load_model_config(BASELINE_CONFIG)
        return _untrained(config, preprocess_config)
    path = model
    if model is None or model == DEFAULT_MODEL:
        if not DEFAULT_WEIGHTS.is_file():
            LOG.warning("the pretrained default student %s is missing: using the untrained student "
                        "(run `make pretrain` to rebuild it)", DEFAULT_WEIGHTS)
            return _untrained(*load_model_config(DEFAULT_STUDENT_CONFIG))
        path = DEFAULT_WEIGHTS
    loaded = load_checkpoint(path)
    calibration = loaded.extra.get("score_calibration")
    return NamedModel(loaded.model, loaded.preprocess, loaded.fingerprint,
                      str(loaded.model_config.get("name", loaded.kind)),
                      None if calibration is None else ScoreCalibration.from_dict(calibration, str(path)))


def _untrained(model_config: dict[str, Any], preprocess_config: PreprocessConfig) -> NamedModel:
    network = build_model(model_config)
    fingerprint = model_fingerprint(model_config, preprocess_config, network.state_dict())
    return NamedModel(network, preprocess_config, fingerprint, str(model_config.get("name", model_config["kind"])))


def describer_for(model: str | Path | None, device: str = "auto", batch_size: int = 16,
                  backend: str = "auto") -> Describer:
    """The Describer of ``load_named_model(model)``."""
    named = load_named_model(model)
    describer = Describer(named.network, named.preprocess, named.fingerprint, named.name, device, batch_size,
                          backend)
    describer.calibration = named.calibration
    return describer
