"""How many verification inliers a place the map does not hold would give, estimated from the map itself.

Each sampled keyframe is verified (tscm_ros/detect/verification.py, fundamental matrix) against the keyframe
most similar to it *outside the stretch that still looks like it* and outside its place
(tscm_ros/detect/sequence_null.py's look-alike stretch): the hardest look-alike of another place. Its inlier
count is one sample of the null distribution, a ``MapCalibration`` (tscm_ros/map/calibration.py) whose
false-alarm rate of an inlier count is the share of look-alikes with as many or more (the tail extrapolated,
at least one inlier wide).

The online detector combines it with the sequence's false-alarm rate (Fisher's method, ``combined_rate``).
"""

from __future__ import annotations

import math

import numpy as np

from tscm_ros.detect.sequence_null import HELD_DESCRIPTORS, look_alike_stretch
from tscm_ros.detect.temporal import Normaliser
from tscm_ros.detect.verification import VerificationConfig, verify
from tscm_ros.map.calibration import MIN_KEYFRAMES, MapCalibration

MAX_PAIRS = 300  # keyframes verified against their hardest look-alike: about a second at start-up


def estimate_inlier_null(keyframe_map, normaliser: Normaliser, config: VerificationConfig) -> MapCalibration | None:
    """The map's null distribution of verification inliers; None for a map without local features, larger than
    the descriptors held in memory, or with fewer than ``MIN_KEYFRAMES`` usable pairs."""
    count = len(keyframe_map)
    if count < MIN_KEYFRAMES or count > HELD_DESCRIPTORS or not keyframe_map.has_local_features:
        return None
    held = keyframe_map.descriptors(np.arange(count))
    means, _ = normaliser.stats(held)
    null = []
    for member in np.unique(np.linspace(0, count - 1, min(count, MAX_PAIRS)).round().astype(np.int64)):
        excluded = keyframe_map.same_place(np.array([member]), np.arange(count))[0].copy()
        lo, hi = look_alike_stretch(held.__getitem__, count, normaliser, int(member), held[member], means[member])
        excluded[lo:hi + 1] = True
        order = np.argsort(-(held @ held[member]), kind="stable")
        order = order[~excluded[order]]
        if len(order):
            null.append(verify(keyframe_map.local_features(int(member)), keyframe_map.local_features(int(order[0])),
                               config).inliers)
    if len(null) < MIN_KEYFRAMES:
        return None
    # Inliers are counts: a tail at least one inlier wide, so that a null with no spread (a textureless map,
    # every look-alike at 0) does not make a handful of inliers look impossible.
    return MapCalibration(np.array(null, dtype=np.float64), count, min_tail_scale=1.0)


def combined_rate(sequence_rate: float, inlier_rate: float) -> float:
    """Fisher's combination of two independent false-alarm rates: the chance that both would be as small,
    q (1 - ln q) with q their product."""
    product = max(sequence_rate * inlier_rate, 1e-300)
    return min(1.0, product * (1.0 - math.log(product)))
