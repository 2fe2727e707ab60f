"""What the query stream itself says about false alarms: the node's own images, under the light they are
taken in.

The map's null (tscm_ros/detect/sequence_null.py) comes from the map's images, under the light of the
recording. A revisit under other light (another season, haze, a corridor driven beside the first pass)
matches everything less distinctly than the map's images match each other, and its evidence falls inside
that null: Corridor's queries spread their similarities 0.49 as widely as the map's images do, and the
map's null left 85 % of its true revisits unpublished. Two measurements of the stream correct for it; a
candidate's false-alarm rate is the larger of the two (``StreamNull.false_alarm_rate``):

- *contrast*: the median spread of the last ``CONTRAST_QUERIES`` queries' similarities over the map's own
  (``Normaliser.spread``, ``Normaliser.map_spread``), between ``MIN_CONTRAST`` and 1. The map's null is read
  with the evidence divided by it.
- *the stream's wrong places*: each image with a full history gives the evidence of its best candidate
  outside the top candidate's place, its look-alike stretch and the ``WRONG_PLACE_SPAN`` x window keyframes
  either side (``wrong_place_candidates``): a place the sequence cannot be at if the top is right, scored
  under the stream's light. The last ``SAMPLES`` of them make the second rate once ``MIN_SAMPLES`` are in;
  before, the map's null as it is.

Either alone published false loops on rendered routes: the contrast alone in a garden under haze, whose far
places look alike once the haze takes the detail; the wrong places alone where the stream shows places the
map does not hold (the best wrong place is then the top itself, and the next one a weaker sample).
"""

from __future__ import annotations

from collections import deque

import numpy as np

from tscm_ros.detect.sequence_null import look_alike_stretch
from tscm_ros.map.calibration import MapCalibration

CONTRAST_QUERIES = 50
MIN_CONTRAST = 0.5  # the map's null is read at most twice as leniently
SAMPLES = 200
MIN_SAMPLES = 20
WRONG_PLACE_SPAN = 2  # x window keyframes either side of the top, beside its place and look-alike stretch
SEARCHED = 100  # candidates searched for the wrong places


class StreamNull:
    """The recent queries' contrast and wrong-place evidence, per way of placing the sequence (along the
    path or the map's order) and sequence length."""

    def __init__(self) -> None:
        self._spreads: deque[float] = deque(maxlen=CONTRAST_QUERIES)
        self._samples: dict[tuple[bool, int], deque[float]] = {}

    def observe(self, spread: float) -> None:
        """One query's ``Normaliser.spread``."""
        if np.isfinite(spread):
            self._spreads.append(float(spread))

    def contrast(self, map_spread: float) -> float:
        """The recent queries' median spread over the map's, within [``MIN_CONTRAST``, 1]; 1 before any."""
        if not self._spreads or not map_spread > 0:
            return 1.0
        return float(np.clip(np.median(self._spreads) / map_spread, MIN_CONTRAST, 1.0))

    def add(self, key: tuple[bool, int], evidence: float) -> None:
        """One wrong-place sample for ``key`` (along the path, window)."""
        if np.isfinite(evidence):
            self._samples.setdefault(key, deque(maxlen=SAMPLES)).append(float(evidence))

    def samples(self, key: tuple[bool, int]) -> int:
        return len(self._samples.get(key, ()))

    def false_alarm_rate(self, key: tuple[bool, int], evidence: np.ndarray, null: MapCalibration,
                         map_spread: float) -> np.ndarray:
        """The larger of the map's null read at the stream's contrast and the stream's wrong places' (the
        map's null as it is, before ``MIN_SAMPLES``)."""
        evidence = np.asarray(evidence, dtype=np.float64)
        at_contrast = null.false_alarm_rate(evidence / self.contrast(map_spread))
        samples = self._samples.get(key, ())
        stream = (MapCalibration(np.array(samples), len(samples)).false_alarm_rate(evidence)
                  if len(samples) >= MIN_SAMPLES else null.false_alarm_rate(evidence))
        return np.maximum(at_contrast, stream)

    def summary(self, map_spread: float) -> str:
        counts = ", ".join(f"{'path' if path else 'order'} {window}: {len(samples)}"
                           for (path, window), samples in sorted(self._samples.items()))
        return (f"the stream's contrast {self.contrast(map_spread):.2f} of the map's, its wrong places "
                f"({counts or 'none yet'})")


def wrong_place_candidates(keyframe_map, normaliser, descriptor: np.ndarray, found: np.ndarray, top: int,
                           window: int, count: int) -> np.ndarray:
    """The first ``count`` of ``found`` (keyframe ids, best first) that are not of ``top``'s place, its
    look-alike stretch (``look_alike_stretch`` at the query's mean) or within ``WRONG_PLACE_SPAN * window``
    keyframes of it along the map."""
    found = np.asarray(found, dtype=np.int64)
    mean = float(normaliser.stats(np.asarray(descriptor)[None, :])[0][0])
    lo, hi = look_alike_stretch(keyframe_map.descriptors, len(keyframe_map), normaliser, int(top), descriptor, mean)
    excluded = (keyframe_map.same_place(np.array([top]), found)[0] | ((found >= lo) & (found <= hi))
                | (np.abs(found - top) <= WRONG_PLACE_SPAN * window))
    return found[~excluded][:count]
