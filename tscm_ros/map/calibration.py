"""Scores calibrated per map, without labels: how rarely a query from a place the map does not hold would
match as distinctly as a candidate does.

A candidate's *margin* is its similarity minus the best similarity of a candidate of another place among
the ``POOL`` best (``candidate_margins``; places as ``KeyframeMap.same_place`` says): a true revisit stands
out from the rest of the map, while a query from an unmapped place, or a look-alike, matches several places
about equally. Similarities themselves do not transfer between sites or light (a map of blank corridors
scores everything high), margins much better.

The map gives the margins of unmapped places itself (``estimate``): each keyframe (at most
``MAX_PSEUDO_QUERIES``, spread over the map) queries the map with its own place removed, as a query from a
place the map never saw would, and the margin of its best candidate is one sample of that null
distribution. A margin's *false-alarm rate* is the share of null margins at least as large, with the upper
tail (beyond the ``TAIL_QUANTILE`` quantile) extrapolated exponentially (peaks over a threshold), so that
rates far below one over the map's size are estimated too; its score is one minus that rate. A score of
0.99 then means: fewer than one unmapped place in a hundred would match this distinctly. A map of fewer
than ``MIN_KEYFRAMES`` keyframes has no calibration.

The null margins come from the map's own images, under the light of the recording: queries under other
light match less distinctly, so the rate is an overestimate for them and the score a cautious one.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from tscm_ros.errors import MapError

POOL = 20  # candidates a margin is taken among (the node's candidate pool)
MIN_KEYFRAMES = 20
MAX_PSEUDO_QUERIES = 2000
TAIL_QUANTILE = 0.8
NEIGHBOURS_SEARCHED = 256  # the pseudo-query's own place is removed from this many nearest keyframes


@dataclass(frozen=True)
class MapCalibration:
    """The null distribution of margins (sorted float32) and what it was estimated from."""

    null: np.ndarray
    keyframes: int
    min_tail_scale: float = 1e-6  # the exponential tail's scale is at least this (in the null's unit)

    def __post_init__(self) -> None:
        null = np.sort(np.asarray(self.null, dtype=np.float32))
        if null.ndim != 1 or len(null) < 2 or not np.isfinite(null).all():
            raise MapError(f"a map calibration needs at least 2 finite null margins, got shape {null.shape}")
        object.__setattr__(self, "null", null)

    @functools.cached_property
    def _tail(self) -> tuple[float, float]:
        """Where the exponential tail starts, and its scale."""
        null = self.null.astype(np.float64)
        threshold = float(np.quantile(null, TAIL_QUANTILE))
        excess = null[null > threshold] - threshold
        return threshold, max(float(excess.mean()) if len(excess) else 0.0, self.min_tail_scale)

    def false_alarm_rate(self, margins: np.ndarray | float) -> np.ndarray:
        """Estimated share of unmapped-place queries whose best candidate would have at least this margin."""
        margins = np.asarray(margins, dtype=np.float64)
        null = self.null
        empirical = (1 + len(null) - np.searchsorted(null, margins, side="left")) / (1 + len(null))
        threshold, scale = self._tail
        tail = (1 - TAIL_QUANTILE) * np.exp(-(margins - threshold) / scale)
        return np.where(margins > threshold, tail, empirical)

    def score(self, margins: np.ndarray | float) -> np.ndarray:
        """One minus the false-alarm rate, in [0, 1]."""
        return np.clip(1.0 - self.false_alarm_rate(margins), 0.0, 1.0)

    def summary(self) -> str:
        return (f"scores calibrated on {self.keyframes} keyframes (margin of an unmapped place: median "
                f"{np.median(self.null):.3f}, 99th percentile {np.quantile(self.null, 0.99):.3f})")


def candidate_margins(similarities: np.ndarray, same_place: np.ndarray) -> np.ndarray:
    """Each candidate's similarity minus the best similarity of a candidate of another place (``same_place``:
    (n, n) bool); when every candidate is of its place, minus the lowest (the margin is then at least that)."""
    similarities = np.asarray(similarities, dtype=np.float64)
    if len(similarities) == 0:
        return similarities
    others = np.where(same_place, -np.inf, similarities[None, :]).max(axis=1)
    return similarities - np.where(np.isfinite(others), others, similarities.min())


def estimate(keyframe_map, descriptors: Callable[[np.ndarray], np.ndarray]) -> MapCalibration | None:
    """The map's calibration, its keyframes queried with their ``descriptors(ids)``; None below
    ``MIN_KEYFRAMES``."""
    count = len(keyframe_map)
    if count < MIN_KEYFRAMES:
        return None
    ids = np.unique(np.linspace(0, count - 1, min(count, MAX_PSEUDO_QUERIES)).round().astype(np.int64))
    searched = min(count, NEIGHBOURS_SEARCHED + POOL)
    null = []
    for start in range(0, len(ids), 256):
        chunk = ids[start:start + 256]
        for query, candidates in zip(chunk, keyframe_map.query_batch(descriptors(chunk), searched)):
            found = np.array([c.keyframe_id for c in candidates], dtype=np.int64)
            other = ~keyframe_map.same_place(np.array([query]), found)[0]
            pool = found[other][:POOL]
            if len(pool) < 2:
                continue
            similarities = np.array([c.score for c in candidates])[other][:POOL]
            null.append(candidate_margins(similarities, keyframe_map.same_place(pool, pool))[0])
    if len(null) < MIN_KEYFRAMES:
        return None
    return MapCalibration(np.array(null), count)
