"""Recall@N for place recognition: the share of queries whose top-N retrieved database items
contain at least one true match.

Queries without any true match in the database cannot be answered and are left out of the
denominator (the Pittsburgh / NetVLAD convention); :class:`RecallResult` reports how many. With no
answerable query at all, recall is undefined (NaN).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import faiss
import numpy as np

DEFAULT_NS = (1, 5, 10, 20)
EVALUATION_CHUNK = 256  # images decoded at a time by evaluate_split


@dataclass(frozen=True)
class RecallResult:
    """Recall@N per N (fractions in [0, 1]) and the number of queries it was measured on."""

    recall: dict[int, float]
    num_queries: int
    num_skipped: int

    def percent(self, n: int) -> float:
        """Recall@n as a percentage."""
        return 100.0 * self.recall[n]


def ground_truth_within(
    query_positions: np.ndarray, database_positions: np.ndarray, radius_m: float
) -> list[np.ndarray]:
    """For each query, the sorted indices of database items within ``radius_m`` metres of it (a k-d tree:
    memory grows with the matches, not with queries x database). NaN positions match nothing."""
    from scipy.spatial import cKDTree

    queries = np.asarray(query_positions, dtype=np.float64)
    database = np.asarray(database_positions, dtype=np.float64)
    dim = database.shape[1] if database.ndim == 2 else queries.shape[-1]
    queries, database = queries.reshape(-1, dim), database.reshape(-1, dim)
    known = np.flatnonzero(np.isfinite(database).all(axis=1))
    matches = [np.zeros(0, dtype=np.int64) for _ in range(len(queries))]
    answerable = np.flatnonzero(np.isfinite(queries).all(axis=1))
    if len(known) and len(answerable):
        tree = cKDTree(database[known])
        for row, found in zip(answerable, tree.query_ball_point(queries[answerable], r=radius_m)):
            matches[row] = np.sort(known[np.asarray(found, dtype=np.int64)])
    return matches


def retrieve(query_descriptors: np.ndarray, database_descriptors: np.ndarray, k: int) -> np.ndarray:
    """Indices (num_queries, k) of the k nearest database descriptors (L2, exact FAISS search)."""
    database = np.ascontiguousarray(database_descriptors, dtype=np.float32)
    queries = np.ascontiguousarray(query_descriptors, dtype=np.float32)
    if database.ndim != 2 or queries.ndim != 2 or database.shape[1] != queries.shape[1]:
        raise ValueError(f"descriptor shapes do not match: queries {queries.shape}, database {database.shape}")
    index = faiss.IndexFlatL2(database.shape[1])
    index.add(database)
    _, neighbours = index.search(queries, min(k, len(database)))
    return neighbours


def recall_at_n(
    retrieved: np.ndarray, ground_truth: Sequence[np.ndarray], ns: Sequence[int] = DEFAULT_NS
) -> RecallResult:
    """Recall@N from ranked retrievals (num_queries, k) and each query's set of true matches."""
    if len(retrieved) != len(ground_truth):
        raise ValueError(f"{len(retrieved)} retrieval rows for {len(ground_truth)} queries")
    hits = np.zeros(len(ns), dtype=np.int64)
    answerable = 0
    for ranked, matches in zip(retrieved, ground_truth):
        if len(matches) == 0:
            continue
        answerable += 1
        is_match = np.isin(ranked, matches)
        for slot, n in enumerate(ns):
            hits[slot] += bool(is_match[:n].any())
    recall = {n: (float(hits[slot]) / answerable if answerable else math.nan) for slot, n in enumerate(ns)}
    return RecallResult(recall=recall, num_queries=answerable, num_skipped=len(retrieved) - answerable)


def evaluate_descriptors(
    query_descriptors: np.ndarray,
    database_descriptors: np.ndarray,
    query_positions: np.ndarray,
    database_positions: np.ndarray,
    radius_m: float,
    ns: Sequence[int] = DEFAULT_NS,
) -> RecallResult:
    """Recall@N of a query set against a database, a retrieval counting as correct within ``radius_m``."""
    ground_truth = ground_truth_within(query_positions, database_positions, radius_m)
    retrieved = retrieve(query_descriptors, database_descriptors, max(ns))
    return recall_at_n(retrieved, ground_truth, ns)


def describe_streamed(frames, describer, chunk: int = EVALUATION_CHUNK) -> np.ndarray:
    """Descriptors of every image of ``frames`` (anything with ``len`` and ``load_images(indices)``), decoding
    ``chunk`` images at a time: memory holds one chunk of images plus the descriptors, not every image."""
    parts = [np.asarray(describer.describe(frames.load_images(range(start, min(start + chunk, len(frames))))),
                        dtype=np.float32)
             for start in range(0, len(frames), chunk)]
    return np.concatenate(parts) if parts else np.zeros((0, int(getattr(describer, "dim", 0))), dtype=np.float32)


def evaluate_split(dataset, split: str, describer, radius_m: float, ns: Sequence[int] = DEFAULT_NS) -> RecallResult:
    """Recall@N of a ``tscm_ros.io.dataset.Dataset`` split (its queries against its database) with
    ``describer`` (anything with ``describe(images) -> (N, D) float32``, e.g. a Describer)."""
    from tscm_ros.io.dataset import require_split

    database, queries = require_split(dataset, split)
    database_descriptors = describe_streamed(database, describer)
    query_descriptors = describe_streamed(queries, describer)
    return evaluate_descriptors(
        query_descriptors, database_descriptors, queries.positions, database.positions, radius_m, ns
    )


