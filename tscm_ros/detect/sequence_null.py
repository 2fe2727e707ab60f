"""The score of a sequence, calibrated per map without labels: how rarely a sequence of queries from a place
the map does not hold would stand out as much as a candidate's does (its evidence,
tscm_ros/detect/temporal.py).

The map gives such sequences itself. Each pseudo-query is a run of ``window`` consecutive keyframes of the
map, newest last, matched against the map *without the stretch they show*: for every keyframe of the run,
the contiguous keyframes around it along the map that still look like it (centred similarity above its
mean over the map) and the keyframes of its place (``KeyframeMap.same_place``). The rest of the map is
then, for that run, a map that does not hold its place, and the evidence of its best candidate
(``sequence_evidence``, the very code the online detector runs) is one sample of the null distribution.
Removing the whole look-alike stretch matters: a fixed radius leaves the keyframes just outside it, which
show the same place from a little further on, and made the null margins as large as a true revisit's.

The samples make a ``MapCalibration`` (tscm_ros/map/calibration.py: false-alarm rate with an exponential
tail, score = one minus it). Where the map holds twins (copied street blocks, identical corridors), a run
in one twin matches the other as distinctly as a revisit matches its own place, and the scores are
accordingly cautious: appearance alone cannot tell a twin from a revisit.
"""

from __future__ import annotations

import numpy as np

from tscm_ros.detect.temporal import (
    Normaliser,
    SequenceMatcher,
    TemporalConfig,
    ordered_and_unordered,
    sequence_evidence,
)
from tscm_ros.map.calibration import MIN_KEYFRAMES, NEIGHBOURS_SEARCHED, POOL, MapCalibration

STRETCH_BLOCK = 64  # keyframes compared at a time while walking along a look-alike stretch
MAX_RUNS = 1000  # pseudo-queries, spread over the map: the 99th percentile from 1000 samples, a start-up of seconds
HELD_DESCRIPTORS = 8192  # maps up to this size are read into memory once for the estimate (126 MB at 3840-d)


def look_alike_stretch(descriptors_of, count: int, normaliser: Normaliser, member: int, descriptor: np.ndarray,
                        level: float) -> tuple[int, int]:
    """The ids [lo, hi] around ``member`` along the map whose (centred) similarity to it stays at least
    ``level``."""
    bounds = []
    for step in (-1, 1):
        edge = member
        while True:
            block = np.arange(edge + step, edge + step * (STRETCH_BLOCK + 1), step)
            block = block[(block >= 0) & (block < count)]
            if not len(block):
                break
            below = np.flatnonzero(normaliser.similarity(descriptor, descriptors_of(block)) < level)
            if len(below):
                edge = int(block[below[0]]) - step
                break
            edge = int(block[-1])
        bounds.append(edge)
    return bounds[0], bounds[1]


def estimate_sequence_null(keyframe_map, config: TemporalConfig, matcher: SequenceMatcher,
                           normaliser: Normaliser) -> MapCalibration | None:
    """The map's calibration of sequence margins for ``matcher``'s way of placing queries (along the path
    with odometry, along the map's order without); None below ``MIN_KEYFRAMES`` usable runs."""
    count = len(keyframe_map)
    window = config.window
    if count < max(MIN_KEYFRAMES, window + 1):
        return None
    ends = np.unique(np.linspace(window - 1, count - 1, min(count - window + 1, MAX_RUNS))
                     .round().astype(np.int64))
    held = keyframe_map.descriptors(np.arange(count)) if count <= HELD_DESCRIPTORS else None
    held_stats = normaliser.stats(held) if held is not None else None
    null = []
    for end in ends:
        members = np.arange(end, end - window, -1)  # newest first
        offsets = None
        if matcher.by_path:
            lengths = matcher.coordinates[members]
            if np.isnan(lengths).any():
                continue
            offsets = list(lengths[0] - lengths)
        sample = _run_null_sample(keyframe_map, held, held_stats, normaliser, matcher, members, offsets)
        if sample is not None:
            null.append(sample)
    if len(null) < MIN_KEYFRAMES:
        return None
    return MapCalibration(np.array(null), count)


def _run_null_sample(keyframe_map, held: np.ndarray | None, held_stats, normaliser: Normaliser,
                     matcher: SequenceMatcher, members: np.ndarray, offsets: list[float] | None) -> float | None:
    """The evidence of the best candidate of one run of keyframes (``members``, newest first) matched against
    the map without its look-alike stretch; None when fewer than 2 candidates are left."""
    count = len(keyframe_map)
    descriptors_of = keyframe_map.descriptors if held is None else held.__getitem__
    descriptors = descriptors_of(members)
    means, lowest = (normaliser.stats(descriptors) if held_stats is None
                     else (held_stats[0][members], held_stats[1][members]))
    excluded = keyframe_map.same_place(members, np.arange(count)).any(axis=0)
    for member, descriptor, mean in zip(members, descriptors, means):
        lo, hi = look_alike_stretch(descriptors_of, count, normaliser, int(member), descriptor, mean)
        excluded[lo:hi + 1] = True
    if held is None:
        found = keyframe_map.search_batch(descriptors[:1], min(count, NEIGHBOURS_SEARCHED + POOL))[0][0]
    else:
        found = np.argsort(-(held @ descriptors[0]), kind="stable")
    pool = found[~excluded[found]][:POOL]
    if len(pool) < 2:
        return None

    def similarities(ids: np.ndarray) -> np.ndarray:
        values = normaliser.similarities(descriptors, descriptors_of(ids)) - means[:, None]
        return np.where(excluded[ids][None, :], np.nan, values)

    current = normaliser.similarity(descriptors[0], descriptors_of(pool)) - means[0]
    forward, unordered = ordered_and_unordered(matcher, pool, current, offsets, similarities, lowest - means)
    evidence = sequence_evidence(forward, unordered, keyframe_map.same_place(pool, pool))
    return float(evidence[int(np.argmax(forward))])
