"""Training-time image augmentation: photometric and mild geometric changes of RGB uint8 images.

A robot's few traversals show each place under one or two lights; augmentation stands in for the
conditions it has not recorded (dusk, haze, another camera's colours, a bumpier drive). Each change is
applied with probability ``probability`` and a strength drawn uniformly up to its setting:

- brightness (gain), contrast (around the image mean), gamma, colour cast (per-channel gain),
  haze (blend towards a light grey), Gaussian blur, Gaussian sensor noise, JPEG re-compression;
- crop and rescale (keeping at least ``1 - crop`` of each side), rotation about the centre.

Everything is NumPy / OpenCV and seeded by the caller's ``numpy.random.Generator``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import cv2
import numpy as np

from tscm_ros.errors import ConfigError


@dataclass(frozen=True)
class AugmentConfig:
    """Augmentation strengths (0 switches a change off); the ``augment:`` section of config/train_*.yaml."""

    enabled: bool = True
    probability: float = 0.6
    brightness: float = 0.5
    contrast: float = 0.4
    gamma: float = 0.5
    colour_cast: float = 0.15
    haze: float = 0.5
    blur_sigma: float = 1.5
    noise_sigma: float = 10.0
    jpeg_quality_min: int = 30
    crop: float = 0.15
    rotation_deg: float = 5.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.probability <= 1.0:
            raise ConfigError(f"augment.probability must be in [0, 1], got {self.probability}")
        for name in ("brightness", "contrast", "gamma", "colour_cast", "haze", "crop"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"augment.{name} must be in [0, 1), got {getattr(self, name)}")
        for name in ("blur_sigma", "noise_sigma", "rotation_deg"):
            if getattr(self, name) < 0:
                raise ConfigError(f"augment.{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.jpeg_quality_min <= 100:
            raise ConfigError(f"augment.jpeg_quality_min must be in 0..100 (100: off), got {self.jpeg_quality_min}")

    @classmethod
    def from_dict(cls, values: dict | None, source: str = "augment") -> AugmentConfig:
        """Build from a mapping (missing keys keep their defaults); ConfigError on unknown keys or types."""
        if values is None:
            return cls()
        if isinstance(values, bool):
            return cls(enabled=values)
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: augment must be a mapping of settings (or true/false), got {values!r}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise ConfigError(f"{source}: unknown augment setting(s) {unknown}; known: {sorted(fields)}")
        checked = {}
        for name, value in values.items():
            default = fields[name].default
            ok = isinstance(value, bool) if isinstance(default, bool) else (
                isinstance(value, (int, float)) and not isinstance(value, bool))
            if not ok:
                raise ConfigError(f"{source}: augment.{name}={value!r} has the wrong type")
            checked[name] = int(value) if type(default) is int else value
        return cls(**checked)


def augment_image(image: np.ndarray, rng: np.random.Generator, config: AugmentConfig) -> np.ndarray:
    """A randomly changed copy of an RGB uint8 image (same size); the image itself when disabled."""
    if not config.enabled:
        return image

    def chosen(strength: float) -> bool:
        return strength > 0 and rng.random() < config.probability

    height, width = image.shape[:2]
    out = image
    if chosen(config.crop) or chosen(config.rotation_deg):
        scale = 1.0 / rng.uniform(1.0 - config.crop, 1.0) if config.crop > 0 else 1.0
        angle = rng.uniform(-config.rotation_deg, config.rotation_deg)
        centre = (width / 2 + rng.uniform(-0.5, 0.5) * (scale - 1) * width / scale,
                  height / 2 + rng.uniform(-0.5, 0.5) * (scale - 1) * height / scale)
        matrix = cv2.getRotationMatrix2D(centre, angle, scale)
        matrix[:, 2] += (width / 2 - centre[0], height / 2 - centre[1])
        out = cv2.warpAffine(out, matrix, (width, height), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    pixels = out.astype(np.float32) / 255.0
    if chosen(config.brightness):
        pixels = pixels * rng.uniform(1.0 - config.brightness, 1.0 + config.brightness)
    if chosen(config.contrast):
        mean = pixels.mean()
        pixels = (pixels - mean) * rng.uniform(1.0 - config.contrast, 1.0 + config.contrast) + mean
    if chosen(config.colour_cast):
        pixels = pixels * rng.uniform(1.0 - config.colour_cast, 1.0 + config.colour_cast, 3).astype(np.float32)
    if chosen(config.haze):
        amount = rng.uniform(0.0, config.haze)
        pixels = (1.0 - amount) * pixels + amount * np.float32(rng.uniform(0.7, 0.95))
    pixels = np.clip(pixels, 0.0, 1.0)
    if chosen(config.gamma):
        pixels = pixels ** np.float32(np.exp(rng.uniform(-config.gamma, config.gamma)))
    if chosen(config.blur_sigma):
        pixels = cv2.GaussianBlur(pixels, (0, 0), rng.uniform(0.3, config.blur_sigma))
    if chosen(config.noise_sigma):
        pixels = pixels + rng.normal(0.0, rng.uniform(0, config.noise_sigma) / 255.0, pixels.shape).astype(np.float32)
    out = np.clip(pixels * 255.0 + 0.5, 0, 255).astype(np.uint8)
    if config.jpeg_quality_min < 100 and rng.random() < config.probability:
        quality = int(rng.integers(config.jpeg_quality_min, 96))
        ok, encoded = cv2.imencode(".jpg", out, [cv2.IMWRITE_JPEG_QUALITY, quality])
        if ok:
            out = cv2.imdecode(encoded, cv2.IMREAD_UNCHANGED)
    return out
