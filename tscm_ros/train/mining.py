"""Pittsburgh-style triplet mining: which frames are positives and negatives of each other by place,
and the hardest triplets by the current embeddings. Distances are horizontal (x, y) in metres."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.spatial import cKDTree

from tscm_ros.errors import ConfigError

AUTO = "auto"
RADII = ("positive_radius_m", "negative_radius_m")


@dataclass(frozen=True)
class MiningConfig:
    """Triplet mining settings. A radius may be 'auto' until it is chosen from the data
    (``tscm_ros.train.config.resolve_radii``); a :class:`PlaceGraph` needs both in metres."""

    positive_radius_m: float | str = 10.0
    negative_radius_m: float | str = 25.0
    heading_deg: float | None = None
    negatives_per_triplet: int = 10
    negative_candidates: int = 1000

    def __post_init__(self) -> None:
        for name in RADII:
            value = getattr(self, name)
            if value != AUTO and (isinstance(value, (str, bool)) or not value > 0):
                raise ConfigError(f"training setting {name} must be > 0 (metres) or 'auto', got {value!r}")
        if not self.has_auto_radii() and not self.positive_radius_m <= self.negative_radius_m:
            raise ConfigError(
                f"need 0 < positive_radius_m <= negative_radius_m, got {self.positive_radius_m} "
                f"and {self.negative_radius_m}"
            )
        if self.negatives_per_triplet < 1 or self.negative_candidates < self.negatives_per_triplet:
            raise ConfigError(
                f"need 1 <= negatives_per_triplet <= negative_candidates, got {self.negatives_per_triplet} "
                f"and {self.negative_candidates}"
            )
        if self.heading_deg is not None and not 0 < self.heading_deg <= 180:
            raise ConfigError(f"heading_deg must be in (0, 180] or null, got {self.heading_deg}")

    def has_auto_radii(self) -> bool:
        return any(getattr(self, name) == AUTO for name in RADII)


@dataclass
class Triplets:
    """Frame indices: anchors (M,), positives (M,), negatives (M, K)."""

    anchors: np.ndarray
    positives: np.ndarray
    negatives: np.ndarray

    def __len__(self) -> int:
        return len(self.anchors)


class PlaceGraph:
    """Which frames of a set are positives / negatives of each other, by position (and heading)."""

    def __init__(self, positions: np.ndarray, sequences: np.ndarray, headings: np.ndarray, cfg: MiningConfig):
        if cfg.has_auto_radii():
            raise ConfigError("mining radii are still 'auto'; resolve them from the dataset first")
        self.cfg = cfg
        xy = np.asarray(positions, dtype=np.float64)[:, :2]
        tree = cKDTree(xy)
        self.positives: list[np.ndarray] = []
        self.non_negatives: list[np.ndarray] = []
        near = tree.query_ball_point(xy, cfg.positive_radius_m)
        not_far = tree.query_ball_point(xy, cfg.negative_radius_m)
        for anchor in range(len(xy)):
            candidates = np.array(sorted(near[anchor]), dtype=np.int64)
            candidates = candidates[sequences[candidates] != sequences[anchor]]
            if cfg.heading_deg is not None and len(candidates):
                turn = np.abs(np.angle(np.exp(1j * (headings[candidates] - headings[anchor]))))
                candidates = candidates[turn <= math.radians(cfg.heading_deg)]
            self.positives.append(candidates)
            self.non_negatives.append(np.array(sorted(not_far[anchor]), dtype=np.int64))
        self.size = len(xy)

    def usable_anchors(self) -> np.ndarray:
        """Frames with at least one positive (in another sequence) and one negative."""
        return np.array(
            [a for a in range(self.size) if len(self.positives[a]) and len(self.non_negatives[a]) < self.size],
            dtype=np.int64,
        )


def mine_triplets(embeddings: np.ndarray, graph: PlaceGraph, rng: np.random.Generator) -> Triplets:
    """One triplet per usable anchor from the embedding cache: the positive nearest in embedding space,
    and the ``negatives_per_triplet`` hardest negatives among ``negative_candidates`` random far frames."""
    cfg = graph.cfg
    embeddings = np.asarray(embeddings, dtype=np.float32)
    anchors, positives, negatives = [], [], []
    for anchor in graph.usable_anchors():
        pos = graph.positives[anchor]
        positive = pos[np.argmin(((embeddings[pos] - embeddings[anchor]) ** 2).sum(axis=1))]
        far = np.ones(graph.size, dtype=bool)
        far[graph.non_negatives[anchor]] = False
        far_indices = np.flatnonzero(far)
        candidates = rng.choice(far_indices, size=min(cfg.negative_candidates, len(far_indices)), replace=False)
        distance = ((embeddings[candidates] - embeddings[anchor]) ** 2).sum(axis=1)
        order = np.argsort(distance, kind="stable")[: cfg.negatives_per_triplet]
        hardest = candidates[order]
        if len(hardest) < cfg.negatives_per_triplet:
            hardest = np.resize(hardest, cfg.negatives_per_triplet)
        anchors.append(anchor)
        positives.append(positive)
        negatives.append(hardest)
    if not anchors:
        empty = np.zeros(0, np.int64)
        return Triplets(empty, empty, np.zeros((0, cfg.negatives_per_triplet), np.int64))
    return Triplets(np.array(anchors), np.array(positives), np.stack(negatives))
