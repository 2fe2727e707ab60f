"""Training: the teacher with a triplet loss over hard negatives, the student with TSCM's
cross-metric distillation (L_hard + L_soft + L_cm) from a frozen teacher.

One loop serves both. The pretrained backbones stay frozen: their outputs for every training frame
are computed once, for ``augment_views`` views of it (view 0 as recorded, the others augmented,
:mod:`tscm_ros.train.augment`), and kept in memory (:mod:`tscm_ros.train.feature_cache`); only the aggregation
heads train, starting from a data-driven initialisation (PCA token projections, k-means NetVLAD
centres). Each epoch: refresh the embedding cache of the training frames with the current heads, mine
triplets from it (:mod:`tscm_ros.train.mining`), train on randomly chosen views, measure recall@1/5/10 on the
val split (:mod:`tscm_ros.train.validation`), keep the best checkpoint, save ``last.pt`` for ``--resume``,
and stop early when val recall stops improving. Mining radii left at ``auto`` are derived from the
frames' spacing (printed with the reason; :mod:`tscm_ros.train.config`). Under ``torchrun`` the model
is wrapped in DistributedDataParallel and every process trains on its share of the triplets; all
processes compute the same cache and validation, so they take the same decisions without talking,
and only rank 0 writes.

The run directory (:mod:`tscm_ros.train.run`) holds config.yaml (as used, model config inline),
metrics.csv, learning_curves.png, best.pt (model checkpoint format of tscm_ros.describe.checkpoint) and last.pt.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from tscm_ros.describe.checkpoint import load_checkpoint
from tscm_ros.describe.describer import resolve_device
from tscm_ros.describe.models import build_model
from tscm_ros.describe.preprocess import PreprocessConfig, preprocess
from tscm_ros.errors import ConfigError, DatasetError
from tscm_ros.evaluate.reporting import plot_learning_curves, write_metrics_csv
from tscm_ros.io.dataset import Dataset, load_datasets, require_split
from tscm_ros.progress import progress as progress_bar
from tscm_ros.train.config import KINDS, TrainConfig, resolve_model_config, resolve_radii
from tscm_ros.train.feature_cache import FeatureCache, TrainableHeads, describe_cached, describe_frames
from tscm_ros.train.losses import TripletDescriptors, tscm_loss
from tscm_ros.train.mining import PlaceGraph, Triplets, mine_triplets
from tscm_ros.train.run import (
    Distributed,
    Progress,
    abandon_new_run,
    init_distributed,
    restore_state,
    save_best,
    save_state,
    start_run,
)
from tscm_ros.train.validation import MAX_RECALL_KEY, VAL_NS, ValSplit

LOG = logging.getLogger(__name__)

LOSS_NAMES = ("loss", "loss_hard", "loss_soft", "loss_cm")


@dataclass
class TrainResult:
    """What a training run produced."""

    run_dir: Path
    epochs_done: int
    best_epoch: int
    best_val_recall: dict[int, float]
    stopped_early: bool
    stop_reason: str = ""


def training_device(name: str, local_rank: int = 0) -> torch.device:
    """The device as ``describe.resolve_device`` picks it; a bare 'cuda' means this process's GPU under torchrun."""
    device = resolve_device(name)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", local_rank)
    return device


@dataclass
class _TrainingData:
    """The checked training and val frames, the place graph to mine triplets from, and the config with its
    radii resolved."""

    train_set: Dataset
    val_database: Dataset
    val_queries: Dataset
    graph: PlaceGraph
    config: TrainConfig
    radii_reason: str
    label: str


def _load_training_data(roots: list[str | Path], config: TrainConfig) -> _TrainingData:
    data = ", ".join(str(root) for root in roots)
    dataset = load_datasets(roots)
    train_set = dataset.subset("train")
    traversals = len(np.unique(train_set.sequences))
    if traversals < 2:
        raise DatasetError(
            f"dataset {data}: its training frames come from {traversals} traversal; training needs the same places "
            "seen in at least two traversals (record the route again, ideally under other light or weather, and "
            "extract the dataset from all the recordings; three or more let the last one validate)"
        )
    val_database, val_queries = require_split(dataset, "val")
    config, radii_reason = resolve_radii(config, train_set)
    graph = PlaceGraph(train_set.positions, train_set.sequences, train_set.headings, config.mining)
    if len(graph.usable_anchors()) == 0:
        raise DatasetError(
            f"dataset {data}: no training triplet possible (needs train frames with a positive within "
            f"{config.mining.positive_radius_m} m in another sequence and negatives beyond "
            f"{config.mining.negative_radius_m} m); "
            "record traversals that revisit the same places, or set positive_radius_m / negative_radius_m"
        )
    label = ", ".join(Path(root).name for root in roots)
    return _TrainingData(train_set, val_database, val_queries, graph, config, radii_reason, label)


def _load_teacher(teacher_path: str | Path, device: torch.device):
    teacher = load_checkpoint(str(teacher_path), expected_kind="teacher")
    teacher.model.to(device).requires_grad_(False).eval()
    return teacher


def _check_same_dim(model, preprocess_config: PreprocessConfig, teacher, probe: list, device: torch.device) -> None:
    with torch.no_grad():
        student_dim = model(preprocess(probe, preprocess_config, device)).shape[1]
        teacher_dim = teacher.model(preprocess(probe, teacher.preprocess, device)).shape[1]
    if student_dim != teacher_dim:
        raise ConfigError(
            f"the student gives {student_dim}-d descriptors but teacher {teacher.path} gives {teacher_dim}-d; "
            "distillation needs the same dimension"
        )


def train(
    kind: str,
    data: str | Path | Sequence[str | Path],
    out: str | Path,
    config: TrainConfig,
    teacher_path: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
) -> TrainResult:
    """Train a ``kind`` ('teacher' or 'student') model on the dataset at ``data`` (or the datasets of several
    sites, merged by :func:`tscm_ros.io.dataset.load_datasets`) into the run dir ``out``.

    Everything is checked (config, dataset, teacher) before the run directory is touched.
    With ``resume`` the run continues after the last completed epoch of ``out/last.pt``.
    """
    setup = _set_up(kind, data, Path(out), config, teacher_path)
    existed = setup.run_dir.exists()
    saved, lock = start_run(setup.run_dir, resume, setup.used_config, kind, setup.teacher_fingerprint,
                            setup.distributed)
    try:
        loop = _start_epochs(setup, saved, progress)
        while loop.run.epoch < setup.config.epochs and not loop.run.stopped_early:
            epoch = loop.run.epoch + 1
            row, recall = _train_and_validate(loop, epoch)
            # A teacher learns from the triplet term alone: when no triplet came inside the margin in a whole
            # epoch, over every augmented view drawn (the mean over processes: every process sees the same),
            # the loss gave no gradient and there is nothing left to learn.
            idle = loop.teacher_descriptors is None and row["loss_hard"] == 0.0
            improved = loop.run.record(row, recall, setup.config.patience, learned=not idle)
            if setup.distributed.is_main:
                _save_epoch(loop, row, recall, improved)
        return _finish(loop)
    except (Exception, KeyboardInterrupt):
        if lock is not None:
            lock.release()
            lock = None
            if not resume and abandon_new_run(setup.run_dir, existed):  # failed before any checkpoint
                LOG.info("removed what this run had written to %s (no checkpoint yet)", setup.run_dir)
        raise
    finally:
        if lock is not None:
            lock.release()


@dataclass
class _Setup:
    """Everything checked and built before the run directory is touched: the data, the model and its
    optimiser, the teacher of a student, where it runs."""

    kind: str
    run_dir: Path
    config: TrainConfig  # radii resolved
    checked: _TrainingData
    model_config: dict
    preprocess_config: PreprocessConfig
    used_config: TrainConfig  # as written to config.yaml: the model config inline
    distributed: Distributed
    device: torch.device
    use_amp: bool
    model: nn.Module
    heads: TrainableHeads
    teacher: object | None
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler

    @property
    def teacher_fingerprint(self) -> str | None:
        return self.teacher.fingerprint if self.teacher is not None else None


def _set_up(kind: str, data: str | Path | Sequence[str | Path], run_dir: Path, config: TrainConfig,
            teacher_path: str | Path | None) -> _Setup:
    if kind not in KINDS:
        raise ConfigError(f"kind must be one of {KINDS}, got {kind!r}")
    if (kind == "student") != (teacher_path is not None):
        raise ConfigError("train student needs --teacher CKPT; train teacher takes none")
    model_config, preprocess_config = resolve_model_config(config, kind)
    checked = _load_training_data([data] if isinstance(data, (str, Path)) else list(data), config)
    config = checked.config
    used_config = dataclasses.replace(config, model={**model_config, "preprocess": preprocess_config.to_dict()})

    distributed = init_distributed()
    device = training_device(config.device, distributed.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    use_amp = config.amp and device.type == "cuda"
    torch.manual_seed(config.seed)
    model = build_model(model_config).to(device)
    heads = TrainableHeads(model)
    teacher = _load_teacher(teacher_path, device) if kind == "student" else None
    if teacher is not None:
        _check_same_dim(model, preprocess_config, teacher, checked.train_set.load_images([0]), device)
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=config.lr, weight_decay=config.weight_decay)
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    return _Setup(kind, run_dir, config, checked, model_config, preprocess_config, used_config, distributed, device,
                  use_amp, model, heads, teacher, optimizer, scaler)


@dataclass
class _EpochLoop:
    """What every epoch uses: the cached training frames, the val split, the progress so far, the teacher's
    descriptors of a student's frames, and the optimisation step."""

    setup: _Setup
    teacher_fingerprint: str | None
    show: bool
    train_cache: FeatureCache
    val: ValSplit
    run: Progress
    teacher_descriptors: torch.Tensor | None
    optimisation: _Optimisation


def _start_epochs(setup: _Setup, saved: dict | None, progress: bool) -> _EpochLoop:
    """Cache the frozen backbones' outputs, restore a resumed run (or initialise the heads from the data) and
    describe a student's frames with its teacher once."""
    config, checked, device, use_amp = setup.config, setup.checked, setup.device, setup.use_amp
    kind, train_set, heads = setup.kind, checked.train_set, setup.heads
    teacher_fingerprint = setup.teacher_fingerprint
    show = progress and setup.distributed.is_main
    if setup.distributed.is_main:
        LOG.info("train %s: %d training frames in %d traversals, %d usable anchors; %s; %d val queries against "
                 "%d val database frames", kind, len(train_set), len(np.unique(train_set.sequences)),
                 len(checked.graph.usable_anchors()), checked.radii_reason, len(checked.val_queries),
                 len(checked.val_database))
    started = time.monotonic()
    augment = config.augmentation()
    views = config.augment_views if augment.enabled else 1
    train_cache = FeatureCache(heads.trunk, train_set, setup.preprocess_config, device, config.cache_batch_size,
                               views, augment, config.seed, show, f"{kind}: backbone features, {views} view(s)",
                               use_amp)
    val_caches = [FeatureCache(heads.trunk, part, setup.preprocess_config, device, config.cache_batch_size,
                               amp=use_amp)
                  for part in (checked.val_database, checked.val_queries)]
    val = ValSplit(heads, *val_caches, checked.val_database.positions, checked.val_queries.positions,
                   config.eval_radius_m, device, config.cache_batch_size, use_amp)
    run = Progress()
    if saved is not None:
        run = restore_state(saved, setup.model, setup.optimizer, setup.scaler, setup.run_dir / "last.pt")
    elif config.init_heads:
        sample = np.random.default_rng(config.seed).permutation(len(train_set))[:256]
        heads.init_aggregation(train_cache.get(sample, None, device))
    teacher_descriptors = None
    if setup.teacher is not None:
        # The teacher is frozen and sees the frames as recorded: its descriptors are computed once.
        teacher_descriptors = torch.from_numpy(describe_frames(
            setup.teacher.model, train_set, setup.teacher.preprocess, device, config.cache_batch_size, use_amp
        )).to(device)
        setup.teacher = None  # frees the teacher network
    if setup.distributed.is_main:
        LOG.info("cached %d x %d backbone outputs (%.0f MB) in %.0f s", views, len(train_set),
                 train_cache.nbytes / 1e6, time.monotonic() - started)
    trained: nn.Module = heads
    if setup.distributed.world_size > 1:
        device_ids = [device.index] if device.type == "cuda" else None
        trained = torch.nn.parallel.DistributedDataParallel(heads, device_ids=device_ids)
    optimisation = _Optimisation(trained, setup.optimizer, setup.scaler, device, use_amp, config)
    return _EpochLoop(setup, teacher_fingerprint, show, train_cache, val, run, teacher_descriptors, optimisation)


def _train_and_validate(loop: _EpochLoop, epoch: int) -> tuple[dict, dict]:
    """One epoch: mine triplets with the current heads, train on them, measure val recall. The epoch's row of
    metrics.csv, and the val recall."""
    setup, config = loop.setup, loop.setup.config
    distributed, kind = setup.distributed, setup.kind
    started = time.monotonic()
    rng = np.random.default_rng([config.seed, epoch])
    embeddings = describe_cached(setup.heads, loop.train_cache, setup.device, config.cache_batch_size, setup.use_amp)
    mined = mine_triplets(embeddings, setup.checked.graph, rng)
    triplets = _epoch_triplets(mined, rng, config, distributed)
    losses = _train_epoch(loop.optimisation, _EpochData(loop.train_cache, triplets, loop.teacher_descriptors, rng),
                          f"{kind} epoch {epoch}/{config.epochs}" if loop.show else None)
    if distributed.world_size > 1:
        losses = _average_over_processes(losses)
    recall = loop.val.recall()
    row = {"epoch": epoch, "triplets": len(triplets) * distributed.world_size, "loss": losses["loss"],
           "loss_hard": losses["loss_hard"]}
    if kind == "student":
        row.update(loss_soft=losses["loss_soft"], loss_cm=losses["loss_cm"])
    row.update({f"val_recall@{n}": recall[n] for n in VAL_NS})
    row[f"val_{MAX_RECALL_KEY}"] = recall[MAX_RECALL_KEY]
    row.update(lr=config.lr, seconds=round(time.monotonic() - started, 3))
    return row, recall


def _save_epoch(loop: _EpochLoop, row: dict, recall: dict, improved: bool) -> None:
    """The main process's files after an epoch: best.pt when it improved, last.pt, metrics.csv, the curves."""
    setup, run, epoch = loop.setup, loop.run, int(row["epoch"])
    run_dir, kind, label = setup.run_dir, setup.kind, setup.checked.label
    if improved:
        save_best(run_dir / "best.pt", setup.model, setup.model_config, setup.preprocess_config, epoch, recall, label,
                  kind, loop.teacher_fingerprint)
    save_state(run_dir / "last.pt", run, setup.model, setup.optimizer, setup.scaler, kind, loop.teacher_fingerprint)
    write_metrics_csv(run.history, run_dir / "metrics.csv")
    plot_learning_curves(run.history, run_dir / "learning_curves.png", f"train {kind}: {label}")
    LOG.info(
        "epoch %d: loss %.4f, val recall@1/5/10 %.1f/%.1f/%.1f %%, "
        "max recall at 100 %% precision %.1f %%%s",
        epoch, row["loss"], *(100 * recall[n] for n in VAL_NS), 100 * recall[MAX_RECALL_KEY],
        " (best)" if improved else "",
    )
    if run.stopped_early:
        LOG.info("stopping: %s", run.stop_reason)


def _finish(loop: _EpochLoop) -> TrainResult:
    """Calibrate the best checkpoint's scores on the val split, end the torchrun group, name the result."""
    setup, run = loop.setup, loop.run
    if setup.distributed.is_main and (setup.run_dir / "best.pt").is_file():
        loop.val.calibrate_best(setup.run_dir / "best.pt", setup.model, setup.checked.label)
    if setup.distributed.world_size > 1:
        dist.barrier()
        dist.destroy_process_group()
    return TrainResult(setup.run_dir, run.epoch, run.best_epoch, run.best_recall, run.stopped_early, run.stop_reason)


def _average_over_processes(losses: dict[str, float]) -> dict[str, float]:
    """Step-weighted mean of each process's mean losses."""
    totals = torch.tensor([losses[name] * losses["steps"] for name in LOSS_NAMES] + [losses["steps"]],
                          dtype=torch.float64)
    dist.all_reduce(totals)
    steps = max(totals[-1].item(), 1.0)
    return {**{name: totals[i].item() / steps for i, name in enumerate(LOSS_NAMES)}, "steps": steps}


def _epoch_triplets(triplets: Triplets, rng: np.random.Generator, config: TrainConfig,
                    distributed: Distributed) -> Triplets:
    """Shuffled, capped at ``triplets_per_epoch``, cut to a multiple of the world size, this rank's share."""
    order = rng.permutation(len(triplets))
    if config.triplets_per_epoch is not None:
        order = order[: config.triplets_per_epoch]
    order = order[: len(order) - len(order) % distributed.world_size][distributed.rank :: distributed.world_size]
    return Triplets(triplets.anchors[order], triplets.positives[order], triplets.negatives[order])


@dataclass
class _Optimisation:
    """What every training step uses: the heads (wrapped for DDP under torchrun), the optimiser, the
    gradient scaler, the device, whether to use mixed precision, and the batch and loss settings."""

    heads: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    device: torch.device
    amp: bool
    config: TrainConfig


@dataclass
class _EpochData:
    """What one epoch trains on: cached trunk outputs, this epoch's triplets, the teacher's descriptors."""

    cache: FeatureCache
    triplets: Triplets
    teacher_descriptors: torch.Tensor | None
    rng: np.random.Generator


def _train_epoch(optimisation: _Optimisation, data: _EpochData, description: str | None) -> dict[str, float]:
    """One pass over the epoch's triplets, each image in a randomly chosen cached view; mean losses."""
    heads, device, config = optimisation.heads, optimisation.device, optimisation.config
    heads.train()
    (heads.module if isinstance(heads, torch.nn.parallel.DistributedDataParallel) else heads).freeze()
    triplets = data.triplets
    sums = dict.fromkeys(LOSS_NAMES, 0.0)
    steps = math.ceil(len(triplets) / config.batch_size)
    bar = progress_bar(range(steps), desc=description or "", unit="step", enabled=description is not None,
                       leave=False)
    for step in bar:
        batch = slice(step * config.batch_size, (step + 1) * config.batch_size)
        anchors, positives, negatives = triplets.anchors[batch], triplets.positives[batch], triplets.negatives[batch]
        count, k = len(anchors), negatives.shape[1]
        indices = np.concatenate([anchors, positives, negatives.reshape(-1)])
        features = data.cache.get(indices, data.rng.integers(0, data.cache.views, len(indices)), device)
        with torch.autocast(device.type, dtype=torch.float16, enabled=optimisation.amp):
            descriptors = heads(*features).float()
        student = TripletDescriptors(
            descriptors[:count], descriptors[count : 2 * count], descriptors[2 * count :].reshape(count, k, -1)
        )
        teacher = None
        if data.teacher_descriptors is not None:
            lookup = data.teacher_descriptors[torch.as_tensor(indices, device=device)]
            teacher = TripletDescriptors(lookup[:count], lookup[count : 2 * count],
                                         lookup[2 * count :].reshape(count, k, -1))
        terms = tscm_loss(student, teacher, config.margin, config.hard_weight, config.soft_weight,
                          config.cross_metric_weight)
        loss = terms.total
        optimisation.optimizer.zero_grad(set_to_none=True)
        optimisation.scaler.scale(loss).backward()
        optimisation.scaler.step(optimisation.optimizer)
        optimisation.scaler.update()
        for name, value in zip(LOSS_NAMES, (terms.total, terms.hard, terms.soft, terms.cross_metric)):
            sums[name] += float(value.detach())
        bar.set_postfix(loss=f"{loss.item():.4f}")
    return {**{name: total / max(steps, 1) for name, total in sums.items()}, "steps": steps}
