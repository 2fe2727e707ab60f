"""Sequence evidence: a loop is the current image *and the images before it* matching the map in order.

SeqSLAM's idea, made online and odometry-aware, and used as a graded score. Similarities are first
normalised (``Normaliser``): centred against hubs, and taken relative to the query's mean similarity to
the map, so that a query under other light, which matches everything less, is judged by how much its
match stands out.

A candidate keyframe ``j`` of the current query is scored by the *sequence score*: the mean, over the last
``window`` queries, of each query's normalised similarity to the keyframe where it should have been if
``j`` is right, on a straight path back through the map (``SequenceMatcher``):

- with odometry (a query pose, and a map with poses), query ``t - L`` should be at the keyframe nearest to
  ``j``'s path length minus the distance travelled since, within ``tolerance_m``;
- without (no query pose, or a map without poses), at the keyframe ``v * L`` places before ``j`` in the
  map's order, for the best of the speeds ``v`` in ``ORDER_SLOPES`` keyframes per image. On a map with
  poses the places are counted along its path, in its median keyframe spacing: a stretch the map skips
  stays a gap the images have to cross (a detour past the end of a mapped street otherwise continued
  straight into the keyframe after the gap).

The current query counts with its similarity to ``j`` itself. A query with no keyframe where it should be
(past the map's start, or in a stretch the null estimate removed) counts with the lowest normalised
similarity it has. A candidate's *sequence margin* is its sequence score minus the best sequence score of
a candidate of another place: a look-alike seen once gets no support from the images before it, and a
place that twins another keeps a small margin unless the sequence tells them apart.
tscm_ros/detect/sequence_null.py turns the margin into a score without labels. The detector scores two
lengths of sequence (``TemporalConfig.windows``: 5 and 20 images), each with its own history and null.

The history restarts after a gap longer than ``max_gap_s``; a candidate is ``consistent`` only once the
history holds ``window`` queries and it is of the best sequence's place. Keyframes are assumed to be in
driving order along the map (as build_map and online mapping add them) and revisits to be driven in the
mapped direction. Without odometry the node should see about one image per keyframe spacing or fewer
(``max_rate_hz``); with odometry any rate works.
"""

from __future__ import annotations

import functools
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from threadpoolctl import ThreadpoolController

from tscm_ros.errors import ConfigError

ORDER_SLOPES = (0.5, 1.0, 1.5, 2.0)  # keyframes per image, without odometry
ORDER_TOLERANCE = 0.5  # keyframes: the nearest one to the straight path
GAP_TOLERANCE = 1.0  # keyframe spacings, along a map's path without odometry (sparser keyframes at turns)
NORMALISATION_SAMPLE = 1024  # keyframes a query's mean and spread of similarity are taken over
SPREAD_ROWS = 256  # of them, whose spreads give the map's own


@dataclass(frozen=True)
class TemporalConfig:
    """Settings of the sequence evidence; see the module doc."""

    window: int = 5
    long_window: int = 20
    tolerance_m: float = 3.0
    max_gap_s: float = 5.0

    def __post_init__(self) -> None:
        if not (isinstance(self.window, (int, np.integer)) and self.window >= 2):
            raise ConfigError(f"temporal consistency window must be an integer >= 2 images, got {self.window}")
        if not (isinstance(self.long_window, (int, np.integer))
                and (self.long_window == 0 or self.long_window > self.window)):
            raise ConfigError("temporal consistency: long_window must be 0 (off) or an integer above window "
                              f"({self.window}), got {self.long_window}")
        if not (np.isfinite(self.tolerance_m) and self.tolerance_m >= 0):
            raise ConfigError(f"temporal consistency: tolerance_m must be finite and >= 0, got {self.tolerance_m}")
        if not (np.isfinite(self.max_gap_s) and self.max_gap_s > 0):
            raise ConfigError(f"temporal consistency: max_gap_s must be finite and > 0, got {self.max_gap_s}")

    @property
    def windows(self) -> tuple[int, ...]:
        """The sequence lengths scored: ``window``, and ``long_window`` unless it is 0."""
        return (self.window,) if self.long_window == 0 else (self.window, self.long_window)


@functools.cache
def _blas() -> ThreadpoolController:
    return ThreadpoolController()


def single_threaded_blas():
    """A context in which BLAS uses one thread. An image's products are small, and the second BLAS thread
    waits for a core that another thread of the node (the network's) holds: the same product then takes
    tens of milliseconds instead of five."""
    return _blas().limit(limits=1, user_api="blas")


class Normaliser:
    """Similarities made comparable across queries and keyframes, as differences from what is typical.

    Against hubs: a keyframe close to the map's mean descriptor is similar to every image that does not
    look like the map (a sequence of an unmapped place then matches the same few keyframes in a row), so
    each keyframe's similarity to the mean is subtracted first (centring, as in hubness reduction). Then
    per query: minus its mean (centred) similarity to a fixed sample of the map's keyframes, so that a query
    under other light, which matches everything less, is judged by how far its match stands out. Not
    divided by the query's spread: an image of a place unlike the whole map has a small spread, and
    dividing by it would blow its noise up into matches."""

    def __init__(self, sample: np.ndarray) -> None:
        self._sample = np.asarray(sample, dtype=np.float32)
        self.mean_descriptor = self._sample.mean(axis=0)
        self._sample_bias = self._sample @ self.mean_descriptor
        self._last: tuple[bytes, np.ndarray] | None = None  # one query's similarities, asked for several times

    def similarity(self, descriptor: np.ndarray, keyframe_descriptors: np.ndarray) -> np.ndarray:
        """The centred similarity of one query descriptor to keyframes."""
        return self.similarities(np.asarray(descriptor)[None, :], keyframe_descriptors)[0]

    def similarities(self, descriptors: np.ndarray, keyframe_descriptors: np.ndarray) -> np.ndarray:
        """(queries, keyframes): the centred similarity of each query descriptor to each keyframe."""
        keyframe_descriptors = np.asarray(keyframe_descriptors, dtype=np.float32)
        return ((np.asarray(descriptors, dtype=np.float32) - self.mean_descriptor) @ keyframe_descriptors.T
                ).astype(np.float64)

    def _to_sample(self, descriptor: np.ndarray) -> np.ndarray:
        """One descriptor's centred similarities to the sample (the last one's kept: the detector asks for
        its mean and spread several times per image)."""
        vector = np.asarray(descriptor, dtype=np.float32)
        key, last = vector.tobytes(), self._last
        if last is None or last[0] != key:
            last = (key, self._sample @ vector - self._sample_bias)
            self._last = last
        return last[1]

    def spread(self, descriptor: np.ndarray) -> float:
        """The standard deviation of one descriptor's centred similarity to the sample: how distinctly it
        matches anything of the map."""
        return float(self._to_sample(descriptor).std())

    @functools.cached_property
    def map_spread(self) -> float:
        """The median ``spread`` of the sample's own keyframes (at most ``SPREAD_ROWS`` of them, each against
        the others): how distinctly the map's images match each other, under the light of the recording."""
        if len(self._sample) < 2:
            return 0.0
        rows = np.unique(np.linspace(0, len(self._sample) - 1, min(len(self._sample), SPREAD_ROWS)).astype(np.int64))
        similarities = self._sample[rows] @ self._sample.T - self._sample_bias[None, :]
        similarities[np.arange(len(rows)), rows] = np.nan
        return float(np.median(np.nanstd(similarities, axis=1)))

    def stats(self, descriptors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per query (rows of ``descriptors``): mean and lowest centred similarity to the sample."""
        descriptors = np.asarray(descriptors, dtype=np.float32)
        similarities = (self._to_sample(descriptors[0])[None, :] if len(descriptors) == 1
                        else descriptors @ self._sample.T - self._sample_bias[None, :])
        return similarities.mean(axis=1).astype(np.float64), similarities.min(axis=1).astype(np.float64)


def _in_spacings(path_lengths: np.ndarray) -> np.ndarray:
    """Path lengths divided by the median distance between consecutive keyframes (1 where it is 0)."""
    steps = np.diff(path_lengths)
    steps = steps[steps > 0]
    return path_lengths / (float(np.median(steps)) if len(steps) else 1.0)


def normalisation_sample(keyframe_map) -> np.ndarray:
    """The descriptors of at most ``NORMALISATION_SAMPLE`` keyframes spread over the map."""
    count = len(keyframe_map)
    ids = np.unique(np.linspace(0, count - 1, min(count, NORMALISATION_SAMPLE)).round().astype(np.int64))
    return keyframe_map.descriptors(ids)


class SequenceMatcher:
    """Where each earlier query should have been along the map if a candidate is right, and the resulting
    sequence scores. ``path_lengths``: every keyframe's path length, or None (a map without poses: along its
    order, one keyframe apart). ``odometry`` False with path lengths: queries without odometry on a map with
    poses, placed along the map's path in units of its median keyframe spacing, so that a stretch the map
    skips is a gap a sequence has to cross, not one keyframe further on."""

    def __init__(self, count: int, path_lengths: np.ndarray | None, tolerance_m: float, odometry: bool = True) -> None:
        self.count = count
        self.by_path = path_lengths is not None and odometry
        if self.by_path:
            self.tolerance, coordinates = tolerance_m, np.asarray(path_lengths, dtype=np.float64)
        elif path_lengths is None:
            self.tolerance, coordinates = ORDER_TOLERANCE, np.arange(count, dtype=np.float64)
        else:
            self.tolerance, coordinates = GAP_TOLERANCE, _in_spacings(np.asarray(path_lengths, dtype=np.float64))
        self._order = np.argsort(coordinates, kind="stable")
        self._sorted = coordinates[self._order]
        self.coordinates = coordinates

    def _nearest(self, targets: np.ndarray) -> np.ndarray:
        """The keyframe nearest to each target coordinate, -1 where none is within the tolerance."""
        right = np.clip(np.searchsorted(self._sorted, targets), 1, len(self._sorted) - 1)
        left = right - 1
        use_left = np.abs(targets - self._sorted[left]) <= np.abs(self._sorted[right] - targets)
        position = np.where(use_left, left, right)
        found = self._order[position]
        return np.where(np.abs(self._sorted[position] - targets) <= self.tolerance, found, -1)

    def scores(self, candidates: np.ndarray, current: np.ndarray, offsets: list[float] | None,
               similarities: Callable[[np.ndarray], np.ndarray], lowest: np.ndarray,
               directions: tuple[float, ...] = (1.0,)) -> np.ndarray:
        """Sequence scores of ``candidates`` (keyframe ids) for a history of ``len(lowest)`` queries, newest
        first. ``current``: the newest query's normalised similarity to each candidate. ``offsets[L]``: the
        travel between query ``L`` and the newest (with odometry), None for map order. ``similarities(ids)``:
        (queries, len(ids)), every query's normalised similarity to keyframes ``ids`` (NaN for keyframes it may
        not use), asked once for all the keyframes the paths reach; ``lowest[L]``: what query ``L`` counts where
        it has no keyframe to match. One row of scores per entry of ``directions``: 1 the mapped direction, -1
        the path driven the other way (the earlier images ahead of the candidate along the map), 0 standing at
        the candidate."""
        candidates = np.asarray(candidates, dtype=np.int64)
        lags = len(lowest)
        speeds = (1.0,) if offsets is not None else ORDER_SLOPES
        slopes = np.array([direction * v for direction in directions for v in (speeds if direction else (1.0,))])
        group = np.repeat(np.arange(len(directions)), [len(speeds) if d else 1 for d in directions])
        travel = np.array([offsets[lag] if offsets is not None else lag for lag in range(1, lags)], dtype=np.float64)
        targets = self.coordinates[candidates][None, None, :] - slopes[:, None, None] * travel[None, :, None]
        nearest = self._nearest(targets.ravel()).reshape(targets.shape)  # (slopes, lags - 1, candidates)
        values = np.broadcast_to(np.asarray(lowest, dtype=np.float64)[1:, None], nearest.shape).copy()
        found = nearest >= 0
        if found.any():
            unique, inverse = np.unique(nearest[found], return_inverse=True)
            lag = np.broadcast_to(np.arange(1, lags)[None, :, None], nearest.shape)[found]
            looked_up = np.asarray(similarities(unique), dtype=np.float64)[lag, inverse]
            values[found] = np.where(np.isnan(looked_up), values[found], looked_up)
        totals = np.asarray(current, dtype=np.float64)[None, :] + values.sum(axis=1)
        best = np.full((len(directions), len(candidates)), -np.inf)
        np.maximum.at(best, group, totals / lags)
        return best


def sequence_margins(scores: np.ndarray, same_place: np.ndarray) -> np.ndarray:
    """Each candidate's sequence score minus the best of a candidate of another place (``same_place``: (n, n)
    bool); minus the lowest when every candidate is of its place."""
    scores = np.asarray(scores, dtype=np.float64)
    if len(scores) == 0:
        return scores
    others = np.where(same_place, -np.inf, scores[None, :]).max(axis=1)
    return scores - np.where(np.isfinite(others), others, scores.min())


def sequence_evidence(forward: np.ndarray, unordered: np.ndarray, same_place: np.ndarray) -> np.ndarray:
    """The gate statistic of each candidate: the smaller of its sequence margin over other places and of
    its sequence score over ``unordered``, the best score of the same images placed without the mapped
    order (driven the other way, or standing at the candidate). The second is what a sequence of an
    unmapped place lacks: its images all match the same few look-alike keyframes, in any order."""
    forward = np.asarray(forward, dtype=np.float64)
    return np.minimum(sequence_margins(forward, same_place), forward - np.asarray(unordered, dtype=np.float64))


def ordered_and_unordered(matcher: SequenceMatcher, candidates, current, offsets, similarities,
                          lowest) -> tuple[np.ndarray, np.ndarray]:
    """``matcher.scores`` in the mapped direction, and the better of backwards and standing still."""
    forward, backward, still = matcher.scores(candidates, current, offsets, similarities, lowest,
                                              (1.0, -1.0, 0.0))
    return forward, np.maximum(backward, still)


@dataclass
class _Query:
    stamp_ns: int
    travel_m: float | None  # path length of the query trajectory, None without a pose
    descriptor: np.ndarray
    mean: float
    lowest: float  # lowest normalised similarity to the sample


class TemporalConsistency:
    """The query history and the sequence scores of each new query's candidates."""

    def __init__(self, config: TemporalConfig) -> None:
        self.config = config
        self._history: deque[_Query] = deque(maxlen=config.window)
        self._last_position: np.ndarray | None = None
        self._scored: tuple[SequenceMatcher | None, dict[int, tuple[float, float]]] = (None, {})

    def reset(self) -> None:
        self._history.clear()
        self._last_position = None
        self._scored = (None, {})

    @property
    def full(self) -> bool:
        return len(self._history) == self.config.window

    def _travel(self, position: np.ndarray | None) -> float | None:
        if position is None:
            self._last_position = None
            return None
        previous = self._history[-1].travel_m if self._history else None
        step = 0.0 if self._last_position is None else float(np.linalg.norm(position - self._last_position))
        self._last_position = np.asarray(position, dtype=np.float64)
        return step if previous is None else previous + step

    def update(self, stamp_ns: int, position: np.ndarray | None, descriptor: np.ndarray, normaliser: Normaliser,
               matcher: SequenceMatcher, descriptors_of: Callable[[np.ndarray], np.ndarray],
               candidates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Record a query and return its candidates' sequence scores, in the mapped direction and without
        the order (the better of driven backwards and standing still; see ``sequence_evidence``).
        ``matcher`` is along the path when the query has a pose and the map has poses, else along the map's
        order; ``descriptors_of(ids)`` gives keyframe descriptors."""
        if self._history and abs(stamp_ns - self._history[-1].stamp_ns) > self.config.max_gap_s * 1e9:
            self.reset()
        mean, lowest = (float(x[0]) for x in normaliser.stats(descriptor[None, :]))
        travel = self._travel(position) if matcher.by_path else None
        if not matcher.by_path:
            self._last_position = None
        self._history.append(_Query(stamp_ns, travel, np.asarray(descriptor, dtype=np.float32), mean,
                                    lowest - mean))
        self._scored = (matcher, {})
        return self.scores(normaliser, matcher, descriptors_of, candidates)

    def scores(self, normaliser: Normaliser, matcher: SequenceMatcher,
               descriptors_of: Callable[[np.ndarray], np.ndarray],
               candidates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The sequence scores of more candidates for the query ``update`` recorded last (as ``update``);
        candidates already scored for it are not scored again."""
        candidates = np.asarray(candidates, dtype=np.int64).tolist()
        if self._scored[0] is not matcher:
            self._scored = (matcher, {})
        scored = self._scored[1]
        missing = list(dict.fromkeys(c for c in candidates if c not in scored))
        if missing:
            scored.update(zip(missing, zip(*self._score(normaliser, matcher, descriptors_of, np.array(missing)))))
        pairs = np.array([scored[c] for c in candidates], dtype=np.float64).reshape(-1, 2)
        return pairs[:, 0], pairs[:, 1]

    def _score(self, normaliser: Normaliser, matcher: SequenceMatcher,
               descriptors_of: Callable[[np.ndarray], np.ndarray],
               candidates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        history = list(reversed(self._history))
        offsets = None
        if matcher.by_path:
            if any(q.travel_m is None for q in history):
                return np.full(len(candidates), np.nan), np.full(len(candidates), np.nan)
            offsets = [history[0].travel_m - q.travel_m for q in history]

        queries = np.stack([q.descriptor for q in history])
        means = np.array([q.mean for q in history])

        def similarities(ids: np.ndarray) -> np.ndarray:
            return normaliser.similarities(queries, descriptors_of(ids)) - means[:, None]

        lowest = np.array([q.lowest for q in history])
        with single_threaded_blas():
            current = normaliser.similarity(queries[0], descriptors_of(candidates)) - means[0]
            return ordered_and_unordered(matcher, candidates, current, offsets, similarities, lowest)
