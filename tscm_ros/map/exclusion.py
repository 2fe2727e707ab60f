"""Which keyframes a query must not return, found by binary search over the keyframes' stamps and path.

So that a robot does not "close a loop" with what it has just seen, a query can exclude keyframes
(``Exclusion``): those whose stamp is within ``min_time_gap_s`` of ``query_stamp_ns`` (either side), and,
when the query position is known, those within ``min_distance_m`` *along the trajectory*: the path length
travelled between the keyframe and the query, not their straight-line distance (a real revisit is close
in space but far along the path). The path length is accumulated over the keyframes that have a pose, in
the order they were added (time order, as the bag reader and the node deliver them); the query is placed on
it after the latest posed keyframe not newer than ``query_stamp_ns`` (the last one when no stamp is given),
at the straight-line distance from it. Keyframes without a pose are only excluded by time.

Excluded keyframes are never returned, and the ``k`` candidates are the best valid ones: FAISS skips them
during the search itself (an ID selector in the search parameters), so neither ``k`` nor the work grows
with the number excluded (except in the ``pq`` index, whose fast scan takes no selector: it fetches that many
more and drops them). Finding them costs O(log n), not a pass over the map: path length only grows
with keyframe id, and stamps normally do too (the bag reader and the node add keyframes in time order), so
each rule excludes one contiguous range of ids found by binary search. A map whose stamps are not in id
order (bags given out of time order) sorts them once after each add and excludes the ids found there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import faiss
import numpy as np

from tscm_ros.map.growing_array import GrowingArray


@dataclass
class Exclusion:
    """Keyframes a query must not return: too recent in time, or too close along the trajectory."""

    min_time_gap_s: float = 0.0
    min_distance_m: float = 0.0
    query_stamp_ns: int | None = None
    query_position: np.ndarray | None = None


class ExcludedIds:
    """Keyframe ids a query must not return: id ranges [start, stop) plus explicit ids."""

    def __init__(self) -> None:
        self.ranges: list[tuple[int, int]] = []
        self.ids: list[np.ndarray] = []

    def add_ids(self, ids: np.ndarray) -> None:
        """Add ids (ascending); a gap-free run is kept as a range."""
        if len(ids) == 0:
            return
        if int(ids[-1]) - int(ids[0]) == len(ids) - 1:
            self.ranges.append((int(ids[0]), int(ids[-1]) + 1))
        else:
            self.ids.append(np.asarray(ids, dtype=np.int64))

    def __bool__(self) -> bool:
        return bool(self.ranges or self.ids)

    def count(self) -> int:
        """How many ids are excluded, at most (explicit ids may repeat a range's)."""
        return sum(stop - start for start, stop in self.ranges) + sum(len(ids) for ids in self.ids)

    def key(self) -> tuple:
        """Equal keys exclude the same ids (queries with equal keys are searched together)."""
        return (tuple(self.ranges), tuple(ids.tobytes() for ids in self.ids))

    def contains(self, ids: np.ndarray) -> np.ndarray:
        """Boolean mask: which of ``ids`` are excluded."""
        ids = np.asarray(ids, dtype=np.int64)
        mask = np.zeros(len(ids), dtype=bool)
        for start, stop in self.ranges:
            mask |= (ids >= start) & (ids < stop)
        for explicit in self.ids:
            mask |= np.isin(ids, explicit)
        return mask

    def selector(self) -> tuple[faiss.IDSelector, list]:
        """A FAISS selector accepting every id not excluded, and the objects it points to (keep them alive)."""
        parts: list = [faiss.IDSelectorRange(start, stop) for start, stop in self.ranges]
        for explicit in self.ids:
            parts.append(faiss.IDSelectorBatch(len(explicit), faiss.swig_ptr(explicit)))
        alive = list(parts)
        union = parts[0]
        for part in parts[1:]:
            union = faiss.IDSelectorOr(union, part)
            alive.append(union)
        keep = faiss.IDSelectorNot(union)
        alive.append(keep)
        return keep, alive


class KeyframeTrack:
    """The keyframes' stamps and positions by id (NaN rows: no pose), and the path length travelled up to
    each keyframe with a pose: what ``excluded`` needs to find the ids an ``Exclusion`` removes."""

    def __init__(self) -> None:
        self._stamps = GrowingArray((), np.int64)
        self._positions = GrowingArray((3,), np.float64)
        # Keyframes with a pose: their ids, stamps and path length travelled up to them (non-decreasing).
        self._posed_ids = GrowingArray((), np.int64)
        self._posed_stamps = GrowingArray((), np.int64)
        self._posed_path = GrowingArray((), np.float64)
        self._stamps_sorted = True  # stamps non-decreasing with id (time order): exclusion by binary search
        self._stamp_order: np.ndarray | None = None  # otherwise: ids by stamp, built on the first query after an add

    def __len__(self) -> int:
        return len(self._stamps)

    @property
    def stamps(self) -> np.ndarray:
        """(N,) int64 stamps in nanoseconds, by keyframe id."""
        return self._stamps.values

    @property
    def positions(self) -> np.ndarray:
        """(N, 3) float64 positions by keyframe id, NaN rows for keyframes without a pose."""
        return self._positions.values

    def extend(self, stamps: np.ndarray, positions: np.ndarray) -> None:
        """Append stamps and positions of new keyframes, and the path length travelled up to each posed one."""
        first_id = len(self._stamps)
        if len(stamps):
            previous = self._stamps.values[-1:] if first_id else stamps[:0]
            self._stamps_sorted = self._stamps_sorted and bool(np.all(np.diff(np.concatenate([previous, stamps])) >= 0))
            self._stamp_order = None
        self._stamps.extend(stamps)
        self._positions.extend(positions)
        posed = np.flatnonzero(~np.isnan(positions[:, 0]))
        if not len(posed):
            return
        if len(self._posed_ids):
            start = self._positions.values[self._posed_ids.values[-1]]
            start_length = float(self._posed_path.values[-1])
        else:
            start, start_length = positions[posed[0]], 0.0
        steps = np.linalg.norm(np.diff(np.vstack([start, positions[posed]]), axis=0), axis=1)
        self._posed_ids.extend(first_id + posed)
        self._posed_stamps.extend(stamps[posed])
        self._posed_path.extend(start_length + np.cumsum(steps))

    def path_lengths(self, keyframe_ids) -> np.ndarray:
        """Path length travelled up to each of ``keyframe_ids``, NaN for those without a pose."""
        ids = np.asarray(keyframe_ids, dtype=np.int64)
        posed = self._posed_ids.values
        lengths = np.full(len(ids), np.nan)
        if len(posed):
            where = np.minimum(np.searchsorted(posed, ids), len(posed) - 1)
            found = posed[where] == ids
            lengths[found] = self._posed_path.values[where[found]]
        return lengths

    def excluded(self, exclusion: Exclusion | None) -> ExcludedIds | None:
        """The keyframe ids that ``exclusion`` removes, or None if it removes nothing; O(log n) for keyframes
        in time order (see the module doc)."""
        if exclusion is None or len(self) == 0:
            return None
        excluded = ExcludedIds()
        stamps = self._stamps.values
        if exclusion.min_time_gap_s > 0 and exclusion.query_stamp_ns is not None:
            gap_ns = float(exclusion.min_time_gap_s) * 1e9
            query_ns = int(exclusion.query_stamp_ns)
            # |stamp - query| < gap for integer stamps: query + floor(-gap) + 1 <= stamp <= query + ceil(gap) - 1
            lowest, highest = query_ns + math.floor(-gap_ns) + 1, query_ns + math.ceil(gap_ns) - 1
            if self._stamps_sorted:
                start, stop = np.searchsorted(stamps, lowest, "left"), np.searchsorted(stamps, highest, "right")
                if stop > start:
                    excluded.ranges.append((int(start), int(stop)))
            else:
                if self._stamp_order is None:
                    self._stamp_order = np.argsort(stamps, kind="stable")
                by_stamp = stamps[self._stamp_order]
                start, stop = np.searchsorted(by_stamp, lowest, "left"), np.searchsorted(by_stamp, highest, "right")
                excluded.add_ids(np.sort(self._stamp_order[start:stop]))
        posed_ids = self._posed_ids.values
        if exclusion.min_distance_m > 0 and exclusion.query_position is not None and len(posed_ids):
            query_position = np.asarray(exclusion.query_position, dtype=np.float64).reshape(3)
            anchor, direction = self._path_anchor(exclusion.query_stamp_ns)
            offset = float(np.linalg.norm(query_position - self._positions.values[posed_ids[anchor]]))
            path = self._posed_path.values
            query_path = float(path[anchor]) + direction * offset
            distance = float(exclusion.min_distance_m)
            # |path - query_path| < distance; path is non-decreasing along posed keyframes
            start = np.searchsorted(path, query_path - distance, "right")
            stop = np.searchsorted(path, query_path + distance, "left")
            excluded.add_ids(posed_ids[start:stop])
        return excluded if excluded else None

    def _path_anchor(self, query_stamp_ns: int | None) -> tuple[int, float]:
        """Where the query sits on the path: (index among posed keyframes, +1 after it or -1 before it)."""
        posed_stamps = self._posed_stamps.values
        if query_stamp_ns is None:
            return len(posed_stamps) - 1, 1.0
        query_ns = int(query_stamp_ns)
        if self._stamps_sorted:
            after = int(np.searchsorted(posed_stamps, query_ns, "right"))
            if after == 0:
                return 0, -1.0
            # the first posed keyframe with the latest stamp not newer than the query
            return int(np.searchsorted(posed_stamps, posed_stamps[after - 1], "left")), 1.0
        before = np.flatnonzero(posed_stamps <= query_ns)  # a map out of time order: one pass
        if len(before):
            return int(before[np.argmax(posed_stamps[before])]), 1.0
        return int(np.argmin(posed_stamps)), -1.0
