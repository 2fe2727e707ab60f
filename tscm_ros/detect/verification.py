"""Geometric verification of loop candidates: the local features of query and keyframe
(tscm_ros/describe/local_features.py), RANSAC two-view geometry.

Matches are mutual nearest neighbours passing Lowe's ratio test. The geometry is the essential matrix
when the camera intrinsics are known (five-point RANSAC, then the relative pose: rotation and
unit-length translation), the fundamental matrix otherwise (no pose). ``inliers`` is the number of
matches consistent with it; a candidate is verified when it has at least ``min_inliers``.

The query and the keyframe are assumed to come from the same camera (one set of intrinsics).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from tscm_ros.describe.local_features import LocalFeatures
from tscm_ros.errors import ConfigError

DEFAULT_MIN_INLIERS = 12  # the least of 8-20 that kept published precision >= 99 % on the tuning worlds
AUTO_VERIFY_MIN_SIDE = 360  # camera-sized images (480p and up) carry local features worth verifying; renders at
# 320x240 and thumbnails do not (bench/verification.py)


@dataclass(frozen=True)
class CameraIntrinsics:
    """Pinhole intrinsics in pixels of the images the features come from."""

    fx: float
    fy: float
    cx: float
    cy: float

    def __post_init__(self) -> None:
        if not (np.isfinite([self.fx, self.fy, self.cx, self.cy]).all() and self.fx > 0 and self.fy > 0):
            raise ConfigError(f"camera intrinsics need finite fx, fy > 0 and finite cx, cy, got {self}")

    @classmethod
    def from_values(cls, values) -> CameraIntrinsics | None:
        """From [fx, fy, cx, cy] (a parameter or a command-line list); None for an empty list."""
        values = [float(v) for v in values]
        if not values:
            return None
        if len(values) != 4:
            raise ConfigError(f"camera intrinsics: expected 4 values fx, fy, cx, cy, got {len(values)}")
        return cls(*values)

    @classmethod
    def from_camera_info(cls, message) -> CameraIntrinsics | None:
        """From a sensor_msgs/CameraInfo (its K matrix); None while the camera is uncalibrated (K all 0)."""
        k = [float(v) for v in message.k]
        if k[0] <= 0 or k[4] <= 0:
            return None
        return cls(fx=k[0], fy=k[4], cx=k[2], cy=k[5])

    @property
    def matrix(self) -> np.ndarray:
        return np.array([[self.fx, 0.0, self.cx], [0.0, self.fy, self.cy], [0.0, 0.0, 1.0]])


@dataclass(frozen=True)
class VerificationConfig:
    """Thresholds of geometric verification; see the module doc."""

    min_inliers: int = DEFAULT_MIN_INLIERS
    ratio: float = 0.8
    ransac_threshold_px: float = 2.0

    def __post_init__(self) -> None:
        if self.min_inliers < 5:
            raise ConfigError(f"min_inliers must be >= 5 (a two-view geometry needs 5 points), got {self.min_inliers}")
        if not 0.0 < self.ratio <= 1.0:
            raise ConfigError(f"the match ratio must be in (0, 1], got {self.ratio}")
        if self.ransac_threshold_px <= 0:
            raise ConfigError(f"the RANSAC threshold must be > 0 pixels, got {self.ransac_threshold_px}")


@dataclass(frozen=True)
class Verification:
    """What the two-view geometry says about a query and a keyframe.

    ``rotation`` (x, y, z, w quaternion) and ``translation`` (unit vector) take points from the query
    camera's frame to the keyframe camera's (OpenCV camera axes: x right, y down, z forward); None without
    intrinsics or when the pose could not be recovered.
    """

    inliers: int
    verified: bool
    rotation: np.ndarray | None = None
    translation: np.ndarray | None = None


def _quaternion(rotation: np.ndarray) -> np.ndarray:
    """(x, y, z, w) unit quaternion of a 3x3 rotation matrix."""
    w = np.sqrt(max(0.0, 1.0 + np.trace(rotation))) / 2.0
    x = np.copysign(np.sqrt(max(0.0, 1.0 + rotation[0, 0] - rotation[1, 1] - rotation[2, 2])) / 2.0,
                    rotation[2, 1] - rotation[1, 2])
    y = np.copysign(np.sqrt(max(0.0, 1.0 - rotation[0, 0] + rotation[1, 1] - rotation[2, 2])) / 2.0,
                    rotation[0, 2] - rotation[2, 0])
    z = np.copysign(np.sqrt(max(0.0, 1.0 - rotation[0, 0] - rotation[1, 1] + rotation[2, 2])) / 2.0,
                    rotation[1, 0] - rotation[0, 1])
    q = np.array([x, y, z, w])
    return q / np.linalg.norm(q)


def _matches(query: LocalFeatures, keyframe: LocalFeatures, ratio: float) -> tuple[np.ndarray, np.ndarray]:
    """Matched keypoints (M, 2) of query and keyframe: mutual nearest neighbours passing the ratio test."""
    matcher = cv2.BFMatcher(cv2.NORM_HAMMING)
    forward = matcher.knnMatch(query.descriptors, keyframe.descriptors, k=2)
    backward = {m.queryIdx: m.trainIdx for m in matcher.match(keyframe.descriptors, query.descriptors)}
    pairs = [(pair[0].queryIdx, pair[0].trainIdx) for pair in forward
             if len(pair) == 2 and pair[0].distance < ratio * pair[1].distance
             and backward.get(pair[0].trainIdx) == pair[0].queryIdx]
    if not pairs:
        return np.zeros((0, 2), np.float32), np.zeros((0, 2), np.float32)
    q, k = np.array(pairs).T
    return query.keypoints[q], keyframe.keypoints[k]


def verify(query: LocalFeatures, keyframe: LocalFeatures, config: VerificationConfig,
           intrinsics: CameraIntrinsics | None = None) -> Verification:
    """Match the features of a query and a keyframe and fit their two-view geometry with RANSAC."""
    if len(query) < 8 or len(keyframe) < 8:
        return Verification(inliers=0, verified=False)
    a, b = _matches(query, keyframe, config.ratio)
    if len(a) < 8:
        return Verification(inliers=0, verified=False)
    rotation = translation = None
    if intrinsics is not None:
        essential, mask = cv2.findEssentialMat(a, b, intrinsics.matrix, cv2.RANSAC, 0.999, config.ransac_threshold_px)
        if essential is None or mask is None or essential.shape != (3, 3):
            return Verification(inliers=0, verified=False)
        inliers = int(mask.sum())
        if inliers >= 5:
            _, r, t, _ = cv2.recoverPose(essential, a, b, intrinsics.matrix, mask=mask.copy())
            rotation, translation = _quaternion(r), t.reshape(3) / max(np.linalg.norm(t), 1e-12)
    else:
        _, mask = cv2.findFundamentalMat(a, b, cv2.FM_RANSAC, config.ransac_threshold_px, 0.999)
        inliers = 0 if mask is None else int(mask.sum())
    return Verification(inliers=inliers, verified=inliers >= config.min_inliers,
                        rotation=rotation, translation=translation)
