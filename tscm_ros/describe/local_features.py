"""Local features of an image: what geometric verification matches, and what the map stores per keyframe.

Features are OpenCV ORB keypoints on the contrast-equalised (CLAHE) grey image: binary, 32 bytes each,
fast enough for five candidates per image at 10 Hz on two cores, and stored in the map per keyframe
(``LocalFeatures.BYTES_PER_FEATURE`` each: the descriptor and two 1/8-pixel fixed-point coordinates).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from tscm_ros.errors import MapError

DEFAULT_MAX_FEATURES = 500
_FIXED_POINT = 8.0  # keypoint coordinates are stored in 1/8 pixel (uint16: images up to 8191 px)
_CLAHE = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8))


@dataclass(frozen=True)
class LocalFeatures:
    """One image's keypoints (N, 2) float32 pixel (x, y) and ORB descriptors (N, 32) uint8."""

    keypoints: np.ndarray
    descriptors: np.ndarray

    BYTES_PER_FEATURE = 36  # 32-byte descriptor + two uint16 coordinates

    def __post_init__(self) -> None:
        if (self.keypoints.ndim != 2 or self.keypoints.shape[1] != 2 or self.descriptors.dtype != np.uint8
                or self.descriptors.shape != (len(self.keypoints), 32)):
            raise MapError(f"local features need (N, 2) keypoints and (N, 32) uint8 descriptors, got "
                           f"{self.keypoints.shape} and {self.descriptors.dtype} {self.descriptors.shape}")

    def __len__(self) -> int:
        return len(self.keypoints)

    def packed_keypoints(self) -> np.ndarray:
        """(N, 2) uint16 in 1/8 pixel: how the map stores them."""
        return np.clip(np.round(self.keypoints * _FIXED_POINT), 0, np.iinfo(np.uint16).max).astype(np.uint16)

    @classmethod
    def unpack(cls, keypoints: np.ndarray, descriptors: np.ndarray) -> LocalFeatures:
        return cls(keypoints.astype(np.float32) / _FIXED_POINT, np.ascontiguousarray(descriptors, dtype=np.uint8))


def extract_local_features(image: np.ndarray, max_features: int = DEFAULT_MAX_FEATURES) -> LocalFeatures:
    """ORB features of an HxWx3 uint8 RGB image (or HxW grey), at most ``max_features``."""
    grey = image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    if min(grey.shape[:2]) < 2:  # ORB's pyramid cannot shrink a one-pixel side: no features to find anyway
        return LocalFeatures(np.zeros((0, 2), np.float32), np.zeros((0, 32), np.uint8))
    orb = cv2.ORB_create(nfeatures=max_features, fastThreshold=10)
    keypoints, descriptors = orb.detectAndCompute(_CLAHE.apply(grey), None)
    if descriptors is None:
        return LocalFeatures(np.zeros((0, 2), np.float32), np.zeros((0, 32), np.uint8))
    points = np.array([k.pt for k in keypoints], dtype=np.float32).reshape(-1, 2)
    # Round-tripped through the stored form, so that online and map features are the same numbers.
    return LocalFeatures.unpack(LocalFeatures(points, descriptors).packed_keypoints(), descriptors)
