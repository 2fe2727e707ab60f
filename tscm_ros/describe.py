"""The one inference path: RGB images -> L2-normalised float32 descriptors, for maps, evaluation and the node.

``Describer.from_checkpoint(path)`` loads a trained student (or any tscm_ros checkpoint);
``Describer.from_checkpoint(None)`` is the offline-pretrained default student (config/model_student_offline.yaml:
ImageNet EfficientNet-Lite0, everything else initialised from a fixed seed, no VPR training), identical
in every process, so maps built with it keep accepting it. ``pretrained_baseline()`` is the
"pretrained backbone + GeM" baseline for evaluation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from tscm_ros.checkpoint import load_checkpoint, load_model_config, model_fingerprint
from tscm_ros.errors import ConfigError
from tscm_ros.models.nets import build_model, prepare_for_inference
from tscm_ros.preprocess import PreprocessConfig, preprocess

DEFAULT_STUDENT_CONFIG = "student_offline"
BASELINE_CONFIG = "baseline_offline"


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


class Describer:
    """Computes descriptors with a model in inference mode, in batches, on CPU or GPU.

    Attributes: ``fingerprint`` (the model's hash, recorded by maps), ``dim``, ``preprocess_config``,
    ``device``, ``model_name``. The network runs with batch norms folded into its convolutions and in
    channels-last layout (``prepare_for_inference``), which bench/descriptor_latency.py measured as the
    fastest CPU path here (as fast as a frozen TorchScript trace, without the deprecated TorchScript API).
    Torch's thread count is left to the caller (``torch.set_num_threads``).
    """

    def __init__(
        self, model: nn.Module, preprocess_config: PreprocessConfig, fingerprint: str, model_name: str,
        device: str | torch.device = "auto", batch_size: int = 16,
    ) -> None:
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        self.device = resolve_device(device)
        self.preprocess_config = preprocess_config
        self.fingerprint = fingerprint
        self.model_name = model_name
        self.dim = int(model.dim)
        self.batch_size = int(batch_size)
        self.model = prepare_for_inference(model).to(self.device)

    @classmethod
    def from_checkpoint(cls, path: str | Path | None, device: str = "auto", batch_size: int = 16) -> "Describer":
        """Load a checkpoint (any kind), or the offline-pretrained default student when ``path`` is None."""
        if path is None:
            return cls.from_config(DEFAULT_STUDENT_CONFIG, device=device, batch_size=batch_size)
        loaded = load_checkpoint(path)
        name = str(loaded.model_config.get("name", loaded.kind))
        return cls(loaded.model, loaded.preprocess, loaded.fingerprint, name, device=device, batch_size=batch_size)

    @classmethod
    def from_config(
        cls, source: str | Path | dict[str, Any], device: str = "auto", batch_size: int = 16, kind: str | None = None,
        preprocess_config: PreprocessConfig | None = None,
    ) -> "Describer":
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
        return cls(model, preprocess_config, fingerprint, name, device=device, batch_size=batch_size)

    def describe(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Descriptors (N, dim) float32 with unit-norm rows for HxWx3 uint8 RGB images of any size."""
        output = np.empty((len(images), self.dim), dtype=np.float32)
        with torch.inference_mode():
            for start in range(0, len(images), self.batch_size):
                batch = preprocess(images[start : start + self.batch_size], self.preprocess_config, self.device)
                batch = batch.contiguous(memory_format=torch.channels_last)
                output[start : start + len(batch)] = self.model(batch).float().cpu().numpy()
        return output


def default_student(device: str = "auto", batch_size: int = 16) -> Describer:
    """The offline-pretrained default student (same as ``Describer.from_checkpoint(None)``)."""
    return Describer.from_config(DEFAULT_STUDENT_CONFIG, device=device, batch_size=batch_size)


def pretrained_baseline(device: str = "auto", batch_size: int = 16) -> Describer:
    """Evaluation baseline: the student's ImageNet-pretrained CNN + GeM, no VPR training
    (config/model_baseline_offline.yaml)."""
    return Describer.from_config(BASELINE_CONFIG, device=device, batch_size=batch_size)
