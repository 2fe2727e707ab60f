"""Temporal consistency: a loop is the current image *and the images before it* matching the map in order.

SeqSLAM's idea, made online and odometry-aware. Each processed query leaves in a short history its
candidate keyframes and their similarities. A candidate keyframe ``j`` of the current query is scored by
the mean, over the last ``window`` queries, of the best similarity each of them had to a keyframe where
it should have been if ``j`` is right: the keyframe's position along the map's path (path length,
``KeyframeMap.path_lengths``) minus the distance the robot travelled since that query (from the query
poses), within ``tolerance_m``. Without a query pose the travel is unknown: any keyframe between
``max_step_m`` per query behind and ``tolerance_m`` ahead counts. In a map without poses (``by_order``),
the coordinate is the keyframe's place in the map's order (its id), and any keyframe between
``ORDER_MAX_STEP`` keyframes per query behind and ``ORDER_TOLERANCE`` ahead counts. A query whose history
has no candidate in the window contributes the lowest similarity it had among its candidates.

A single look-alike image scores high alone but gets no support from the images before it, so its
sequence score is low: isolated false matches are suppressed, and a copied stretch of street is told
apart from the original by what was seen before entering it. A candidate is ``consistent`` once the
history holds ``window`` queries (the first images after start-up or a gap longer than ``max_gap_s``
are never consistent). Keyframes are assumed to be in driving order along the map (as build_map and
online mapping add them) and revisits to be driven in the mapped direction.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from tscm_ros.errors import ConfigError

ORDER_TOLERANCE = 2.0  # keyframes, in a map without poses
ORDER_MAX_STEP = 2.0  # keyframes per query, in a map without poses


@dataclass(frozen=True)
class TemporalConfig:
    """Settings of temporal consistency; see the module doc."""

    window: int = 5
    tolerance_m: float = 3.0
    max_step_m: float = 3.0
    max_gap_s: float = 5.0

    def __post_init__(self) -> None:
        if self.window < 1:
            raise ConfigError(f"temporal consistency window must be >= 1 query, got {self.window}")
        if self.tolerance_m < 0 or self.max_step_m < 0 or self.max_gap_s <= 0:
            raise ConfigError("temporal consistency: tolerance_m and max_step_m must be >= 0, max_gap_s > 0")


@dataclass
class _Query:
    stamp_ns: int
    travel_m: float | None  # path length of the query trajectory, None without a pose
    coordinates: np.ndarray  # along-map coordinates of its candidates (NaN: keyframe without a pose)
    similarities: np.ndarray


class TemporalConsistency:
    """The query history and the sequence score of each new query's candidates."""

    def __init__(self, config: TemporalConfig) -> None:
        self.config = config
        self._history: deque[_Query] = deque(maxlen=config.window)
        self._last_position: np.ndarray | None = None

    def reset(self) -> None:
        self._history.clear()
        self._last_position = None

    def _travel(self, position: np.ndarray | None) -> float | None:
        if position is None:
            self._last_position = None
            return None
        previous = self._history[-1].travel_m if self._history else None
        step = 0.0 if self._last_position is None else float(np.linalg.norm(position - self._last_position))
        self._last_position = np.asarray(position, dtype=np.float64)
        return step if previous is None else previous + step

    def update(self, stamp_ns: int, position: np.ndarray | None, coordinates: np.ndarray,
               similarities: np.ndarray, by_order: bool = False) -> tuple[np.ndarray, bool]:
        """Record a query (its candidates' along-map ``coordinates`` and raw ``similarities``) and return
        the candidates' sequence scores and whether the history is long enough to call them consistent.
        ``by_order``: the coordinates are keyframe ids (a map without poses; ``position`` is ignored)."""
        coordinates = np.asarray(coordinates, dtype=np.float64)
        similarities = np.asarray(similarities, dtype=np.float64)
        if self._history and abs(stamp_ns - self._history[-1].stamp_ns) > self.config.max_gap_s * 1e9:
            self.reset()
        self._history.append(_Query(stamp_ns, self._travel(position), coordinates, similarities))
        if not len(similarities):
            return similarities, False
        now = self._history[-1]
        total = np.zeros(len(coordinates))
        for lag, past in enumerate(reversed(self._history)):
            if not len(past.similarities):
                continue
            if by_order:
                low = coordinates - lag * ORDER_MAX_STEP - ORDER_TOLERANCE
                high = coordinates + ORDER_TOLERANCE
            elif now.travel_m is not None and past.travel_m is not None:
                travelled = now.travel_m - past.travel_m
                low = coordinates - travelled - self.config.tolerance_m
                high = coordinates - travelled + self.config.tolerance_m
            else:
                low = coordinates - lag * self.config.max_step_m - self.config.tolerance_m
                high = coordinates + self.config.tolerance_m
            inside = (past.coordinates[None, :] >= low[:, None]) & (past.coordinates[None, :] <= high[:, None])
            best = np.where(inside, past.similarities[None, :], -np.inf).max(axis=1)
            total += np.where(np.isfinite(best), best, past.similarities.min())
        # A keyframe without a pose cannot be placed along the path: it keeps its own similarity only.
        scores = np.where(np.isnan(coordinates), similarities, total / len(self._history))
        return scores, len(self._history) == self.config.window
