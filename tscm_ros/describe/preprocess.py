"""The one image preprocessing shared by training, map building and the live node.

HxWx3 uint8 RGB images of any size -> a (N, 3, H, W) float tensor: resized (stretched, or the short side
scaled and the centre cropped), scaled to [0, 1] and normalised per channel.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import cv2
import numpy as np
import torch

from tscm_ros.errors import ConfigError, TscmError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESIZE_POLICIES = ("stretch", "short_side_center_crop")


@dataclass(frozen=True)
class PreprocessConfig:
    """How images become network input: target ``height`` x ``width``, per-channel ``mean``/``std`` of
    [0, 1] RGB, and the ``resize`` policy ('stretch' or 'short_side_center_crop')."""

    height: int
    width: int
    mean: tuple[float, float, float] = field(default=IMAGENET_MEAN)
    std: tuple[float, float, float] = field(default=IMAGENET_STD)
    resize: str = "stretch"

    def __post_init__(self) -> None:
        for name in ("height", "width"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 8:
                raise ConfigError(f"preprocess {name} must be an integer >= 8, got {value!r}")
        for name in ("mean", "std"):
            value = getattr(self, name)
            try:
                floats = tuple(float(v) for v in value)
            except (TypeError, ValueError):
                raise ConfigError(f"preprocess {name} must be three numbers, got {value!r}") from None
            if len(floats) != 3:
                raise ConfigError(f"preprocess {name} must be three numbers, got {value!r}")
            object.__setattr__(self, name, floats)
        if any(s <= 0 for s in self.std):
            raise ConfigError(f"preprocess std must be positive, got {self.std}")
        if self.resize not in RESIZE_POLICIES:
            raise ConfigError(f"preprocess resize must be one of {RESIZE_POLICIES}, got {self.resize!r}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON/YAML-friendly dict (lists, not tuples)."""
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PreprocessConfig:
        """Build from a dict such as ``to_dict()`` gives; ConfigError on unknown, missing or bad values."""
        if not isinstance(d, dict):
            raise ConfigError(f"preprocess config must be a mapping, got {d!r}")
        allowed = {"height", "width", "mean", "std", "resize"}
        unknown = set(d) - allowed
        if unknown:
            raise ConfigError(f"preprocess config: unknown key(s) {sorted(unknown)}; allowed: {sorted(allowed)}")
        missing = {"height", "width"} - set(d)
        if missing:
            raise ConfigError(f"preprocess config lacks {sorted(missing)}")
        return cls(**d)


def resize_image(image: np.ndarray, cfg: PreprocessConfig) -> np.ndarray:
    """Resize one HxWx3 uint8 image to ``cfg.height`` x ``cfg.width`` following ``cfg.resize``."""
    height, width = image.shape[:2]
    if cfg.resize == "short_side_center_crop":
        # Crop the source region that scaling the short side to the target would keep, then resize it.
        scale = max(cfg.height / height, cfg.width / width)
        crop_h = min(height, max(1, round(cfg.height / scale)))
        crop_w = min(width, max(1, round(cfg.width / scale)))
        top, left = (height - crop_h) // 2, (width - crop_w) // 2
        image = image[top : top + crop_h, left : left + crop_w]
        height, width = crop_h, crop_w
    if (height, width) == (cfg.height, cfg.width):
        return image
    shrinking = height * width > cfg.height * cfg.width
    return cv2.resize(
        np.ascontiguousarray(image), (cfg.width, cfg.height),
        interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR,
    )


def preprocess(
    images: Sequence[np.ndarray], cfg: PreprocessConfig, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Turn HxWx3 uint8 RGB images (any sizes) into a normalised (N, 3, H, W) float32 tensor on ``device``.

    Resizing and normalisation run on the CPU (OpenCV, NumPy); the result is moved to ``device``.
    Raises TscmError naming the image when one is not an HxWx3 uint8 array.
    """
    if len(images) == 0:
        return torch.empty((0, 3, cfg.height, cfg.width), dtype=torch.float32, device=device)
    batch = np.empty((len(images), cfg.height, cfg.width, 3), dtype=np.uint8)
    for i, image in enumerate(images):
        if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            shape = getattr(image, "shape", None)
            dtype = getattr(image, "dtype", type(image).__name__)
            raise TscmError(f"image {i} has shape {shape} and dtype {dtype}; expected an HxWx3 uint8 RGB array")
        if image.shape[0] == 0 or image.shape[1] == 0:
            raise TscmError(f"image {i} is empty (shape {image.shape})")
        batch[i] = resize_image(image, cfg)
    # Normalised with NumPy (single-threaded): torch's thread pool stalls for whole time slices on a CPU
    # shared with other processes, which cost more than these few element-wise operations.
    pixels = np.ascontiguousarray(batch.transpose(0, 3, 1, 2)).astype(np.float32)
    pixels *= np.array([1.0 / (255.0 * s) for s in cfg.std], dtype=np.float32).reshape(1, 3, 1, 1)
    pixels -= np.array([m / s for m, s in zip(cfg.mean, cfg.std)], dtype=np.float32).reshape(1, 3, 1, 1)
    return torch.from_numpy(pixels).to(device)
