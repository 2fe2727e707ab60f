"""Validation while training: recall on the val split from the cached trunk outputs, and the score
calibration fitted on the val queries' top-1 matches and stored in a checkpoint."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tscm_ros.describe.calibration import ScoreCalibration
from tscm_ros.describe.checkpoint import load_checkpoint, save_checkpoint
from tscm_ros.evaluate.loop_metrics import max_recall_at_full_precision, precision_recall_curve
from tscm_ros.evaluate.recall import evaluate_descriptors, retrieve
from tscm_ros.io.dataset import load_datasets, require_split
from tscm_ros.train.feature_cache import FeatureCache, TrainableHeads, describe_cached, describe_frames

LOG = logging.getLogger(__name__)

VAL_NS = (1, 5, 10)
MAX_RECALL_KEY = "max_recall_p100"


def top1_matches(database: np.ndarray, queries: np.ndarray, database_positions: np.ndarray,
                 query_positions: np.ndarray, radius_m: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each query's nearest database descriptor: its similarity (1 - d / 2, the raw score), whether it lies
    within ``radius_m`` of the query, and whether any database frame does."""
    nearest = retrieve(queries, database, 1)[:, 0]
    similarity = 1.0 - ((queries - database[nearest]) ** 2).sum(axis=1) / 2.0
    distance = np.linalg.norm(query_positions[:, None, :2] - database_positions[None, :, :2], axis=2)
    return similarity, distance[np.arange(len(queries)), nearest] <= radius_m, (distance <= radius_m).any(axis=1)


def fit_calibration(database: np.ndarray, queries: np.ndarray, database_positions: np.ndarray,
                    query_positions: np.ndarray, radius_m: float, fitted_on: str) -> ScoreCalibration:
    """Score calibration from validation descriptors: each query's top-1 match, correct within ``radius_m``."""
    similarity, correct, _ = top1_matches(database, queries, database_positions, query_positions, radius_m)
    return ScoreCalibration.fit(similarity, correct, fitted_on)


@dataclass
class ValSplit:
    """The val split as the training loop sees it: cached trunk outputs of its database and queries,
    described by the current heads, a retrieval correct within ``radius_m``."""

    heads: TrainableHeads
    database: FeatureCache
    queries: FeatureCache
    database_positions: np.ndarray
    query_positions: np.ndarray
    radius_m: float
    device: torch.device
    batch_size: int
    amp: bool

    def descriptors(self) -> tuple[np.ndarray, np.ndarray]:
        """Descriptors of the database and of the queries (view 0)."""
        return tuple(describe_cached(self.heads, cache, self.device, self.batch_size, self.amp)
                     for cache in (self.database, self.queries))

    def recall(self) -> dict:
        """Val recall@N (keys 1, 5, 10) and MAX_RECALL_KEY: the top-1 match's maximum recall at 100 % precision,
        which still tells epochs apart once recall@1 saturates on an easy validation traversal."""
        db, q = self.descriptors()
        recall = dict(evaluate_descriptors(q, db, self.query_positions, self.database_positions, self.radius_m,
                                           VAL_NS).recall)
        similarity, correct, has_loop = top1_matches(db, q, self.database_positions, self.query_positions,
                                                     self.radius_m)
        recall[MAX_RECALL_KEY] = max_recall_at_full_precision(precision_recall_curve(similarity, correct, has_loop))[0]
        return recall

    def calibrate_best(self, path: Path, model: nn.Module, label: str) -> None:
        """Fit the score calibration of checkpoint ``path`` (``model`` takes its weights) on the val queries'
        top-1 matches and store it in the checkpoint."""
        best = load_checkpoint(path)
        model.load_state_dict(best.model.state_dict())
        db, q = self.descriptors()
        calibration = fit_calibration(db, q, self.database_positions, self.query_positions, self.radius_m,
                                      f"val split of {label}, correct within {self.radius_m:g} m")
        save_checkpoint(path, best.model, best.model_config, best.preprocess,
                        {**best.extra, "score_calibration": calibration.to_dict()})
        LOG.info("score calibration fitted on %d val queries: a published score of 0.95 means raw similarity >= %.3f",
                 len(q), calibration.min_similarity(0.95))


def calibrate_checkpoint(path: Path, data: Sequence[str | Path], radius_m: float, half: bool = False,
                         batch_size: int = 32) -> ScoreCalibration:
    """Fit a checkpoint's score calibration on the val split of ``data`` and store it in the checkpoint
    (its weights saved back in half precision with ``half``, as they were)."""
    loaded = load_checkpoint(path)
    database, queries = require_split(load_datasets(list(data)), "val")
    device = torch.device("cpu")
    calibration = fit_calibration(
        describe_frames(loaded.model, database, loaded.preprocess, device, batch_size),
        describe_frames(loaded.model, queries, loaded.preprocess, device, batch_size),
        database.positions, queries.positions, radius_m,
        f"val split of {', '.join(Path(d).name for d in data)}, correct within {radius_m:g} m",
    )
    save_checkpoint(path, loaded.model.half() if half else loaded.model, loaded.model_config, loaded.preprocess,
                    {**loaded.extra, "score_calibration": calibration.to_dict()})
    return calibration
