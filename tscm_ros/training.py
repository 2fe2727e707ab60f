"""Training: the teacher with a triplet loss over hard negatives, the student with TSCM's
cross-metric distillation (L_hard + L_soft + L_cm) from a frozen teacher.

One loop serves both. The pretrained backbones stay frozen: their outputs for every training frame
are computed once, for ``augment_views`` views of it (view 0 as recorded, the others augmented,
:mod:`tscm_ros.augment`), and kept in memory; only the aggregation heads train, starting from a
data-driven initialisation (PCA token projections, k-means NetVLAD centres). Each epoch: refresh the
embedding cache of the training frames with the current heads, mine triplets from it, train on
randomly chosen views, measure recall@1/5/10 on the val split, keep the best checkpoint, save
``last.pt`` for ``--resume``, and stop early when val recall stops improving. Mining radii left at
``auto`` are derived from the frames' spacing (printed with the reason). Under ``torchrun`` the model is wrapped in DistributedDataParallel and every process
trains on its share of the triplets; all processes compute the same cache and validation, so
they take the same decisions without talking, and only rank 0 writes.

The run directory holds config.yaml (as used, model config inline), metrics.csv,
learning_curves.png, best.pt (model checkpoint format of tscm_ros.checkpoint) and last.pt.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import yaml
from torch import nn

from tscm_ros.atomic import atomic_file
from tscm_ros.augment import AugmentConfig, augment_image
from tscm_ros.calibration import ScoreCalibration
from tscm_ros.checkpoint import load_checkpoint, load_model_config, save_checkpoint
from tscm_ros.dataset import Dataset, load_datasets, require_split
from tscm_ros.describe import resolve_device
from tscm_ros.errors import CheckpointError, ConfigError, DatasetError
from tscm_ros.losses import TripletDescriptors, tscm_loss
from tscm_ros.mining import MiningConfig, PlaceGraph, Triplets, mine_triplets
from tscm_ros.models import build_model
from tscm_ros.models.backbones import Backbone
from tscm_ros.preprocess import PreprocessConfig, preprocess
from tscm_ros.recall import evaluate_descriptors, retrieve
from tscm_ros.reporting import plot_learning_curves, write_metrics_csv

LOG = logging.getLogger(__name__)

KINDS = ("teacher", "student")
AUTO = "auto"
RADII = ("positive_radius_m", "negative_radius_m", "eval_radius_m")
STATE_FORMAT = "tscm_ros.train_state"
STATE_VERSION = 1
VAL_NS = (1, 5, 10)
MAX_RECALL_KEY = "max_recall_p100"
LOSS_NAMES = ("loss", "loss_hard", "loss_soft", "loss_cm")


# --------------------------------------------------------------------------------------------
# Configuration


@dataclass
class TrainConfig:
    """Training settings (config/train_*.yaml).

    ``model`` names the network: a model config preset ('tiny', 'student_offline', ...) or file, or, as
    written to a run's config.yaml, the model config itself (a mapping with ``kind`` and ``preprocess``).
    """

    model: Any
    epochs: int = 30
    batch_size: int = 4
    lr: float = 1e-4
    weight_decay: float = 0.0
    margin: float = 0.1
    hard_weight: float = 1.0
    soft_weight: float = 1.0
    cross_metric_weight: float = 1.0
    init_heads: bool = True
    patience: int = 5
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    positive_radius_m: float | str = AUTO
    negative_radius_m: float | str = AUTO
    heading_deg: float | None = None
    negatives_per_triplet: int = 10
    negative_candidates: int = 1000
    triplets_per_epoch: int | None = None
    eval_radius_m: float | str = AUTO
    cache_batch_size: int = 32
    augment_views: int = 6
    augment: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        positive = ("epochs", "batch_size", "lr", "cache_batch_size", "augment_views")
        for name in positive:
            if not getattr(self, name) > 0:
                raise ConfigError(f"training setting {name} must be > 0, got {getattr(self, name)}")
        for name in RADII:
            value = getattr(self, name)
            if value != AUTO and (isinstance(value, (str, bool)) or not value > 0):
                raise ConfigError(f"training setting {name} must be > 0 (metres) or 'auto', got {value!r}")
        self.augmentation()  # validates the augment section
        if min(self.patience, self.weight_decay, self.margin, self.hard_weight, self.soft_weight,
               self.cross_metric_weight) < 0:
            raise ConfigError("training settings patience, weight_decay, margin and the loss weights must be >= 0")
        if self.triplets_per_epoch is not None and self.triplets_per_epoch < 1:
            raise ConfigError(f"triplets_per_epoch must be >= 1 or null, got {self.triplets_per_epoch}")
        if self.device != "auto" and not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ConfigError(f"device must be auto, cpu or cuda[:N], got {self.device!r}")
        if not self.has_auto_radii():
            self.mining()  # validates the mining settings

    def has_auto_radii(self) -> bool:
        return any(getattr(self, name) == AUTO for name in RADII)

    def augmentation(self) -> AugmentConfig:
        """The augmentation part of the settings."""
        return AugmentConfig.from_dict(self.augment, "training setting augment")

    def mining(self) -> MiningConfig:
        """The triplet-mining part of the settings (radii resolved, see :func:`resolve_radii`)."""
        if self.has_auto_radii():
            raise ConfigError("mining radii are still 'auto'; resolve them from the dataset first")
        return MiningConfig(
            positive_radius_m=self.positive_radius_m,
            negative_radius_m=self.negative_radius_m,
            heading_deg=self.heading_deg,
            negatives_per_triplet=self.negatives_per_triplet,
            negative_candidates=self.negative_candidates,
        )

    def to_dict(self) -> dict:
        """Plain dict, as written to the run's config.yaml."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict, source: str) -> TrainConfig:
        """Build from a dict, checking names and types; ``source`` names the file in errors."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise ConfigError(f"{source}: unknown training setting(s) {unknown}; known: {sorted(fields)}")
        values = {**values}
        if "model" not in values:
            raise ConfigError(f"{source}: the training setting 'model' (model config file) is missing")
        checked = {}
        for name, value in values.items():
            default = fields[name].default
            if isinstance(value, str) and type(default) is float:
                try:  # YAML reads 1e-4 (no dot) as text
                    value = float(value)
                except ValueError:
                    pass
            if name in RADII and value == AUTO:
                checked[name] = value
                continue
            expected = {bool: (bool,), int: (int,), float: (int, float), str: (str,)}.get(type(default))
            if name == "heading_deg" or name == "triplets_per_epoch":
                expected = (int, float, type(None)) if name == "heading_deg" else (int, type(None))
            if name in RADII:
                expected = (int, float)
            if name == "augment":
                expected = (dict, bool, type(None))
            if expected and (not isinstance(value, expected) or (isinstance(value, bool) and bool not in expected)):
                raise ConfigError(f"{source}: training setting {name}={value!r} has the wrong type")
            checked[name] = float(value) if expected == (int, float) else value
        if isinstance(checked.get("augment"), bool) or checked.get("augment", {}) is None:
            checked["augment"] = {"enabled": bool(checked["augment"])}
        try:
            return cls(**checked)
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from exc


def parse_overrides(overrides: Sequence[str]) -> dict:
    """``key=value`` strings (values parsed as YAML) to a dict."""
    parsed = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        try:
            parsed[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({exc})") from exc
    return parsed


def _read_yaml(path: Path, what: str) -> dict:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(f"{what} {path} does not exist") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what} {path} is not valid YAML ({exc})") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {path} must hold a mapping of settings")
    return data


def load_train_config(path: str | Path, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read a training config file and apply ``key=value`` overrides."""
    path = Path(path)
    values = _read_yaml(path, "training config")
    values.update(parse_overrides(overrides))
    model = values.get("model")
    if model is not None and not isinstance(model, (str, dict)):
        raise ConfigError(f"{path}: 'model' must be a model config preset, file or mapping, got {model!r}")
    return TrainConfig.from_dict(values, str(path))


def resolve_model_config(config: TrainConfig, kind: str) -> tuple[dict, PreprocessConfig]:
    """The model config (with ``kind``) and preprocessing that ``config.model`` names, checked against ``kind``."""
    if isinstance(config.model, dict):
        model_config = dict(config.model)
        preprocess_config = PreprocessConfig.from_dict(model_config.pop("preprocess", None))
    else:
        model_config, preprocess_config = load_model_config(config.model, kind=kind)
    if model_config.get("kind") != kind:
        raise ConfigError(f"train {kind}: the model config describes a {model_config.get('kind')!r} model, not a {kind}")
    if model_config.get("projection_dim"):
        raise ConfigError(
            f"train {kind}: set projection_dim to null for training; the deployment projection is fitted afterwards "
            "(tscm_ros.models.add_pca_projection)"
        )
    return model_config, preprocess_config


def default_config_path(kind: str) -> Path:
    """config/train_<kind>.yaml of a source checkout, else of the installed package share directory."""
    name = f"train_{kind}.yaml"
    candidates = [Path(__file__).resolve().parent.parent / "config" / name, Path(sys.prefix) / "share" / "tscm_ros" / "config" / name]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise ConfigError(f"default training config {name} not found (looked in {', '.join(map(str, candidates))}); pass --config")


# --------------------------------------------------------------------------------------------
# Small helpers


def training_device(name: str, local_rank: int = 0) -> torch.device:
    """The device as ``describe.resolve_device`` picks it; a bare 'cuda' means this process's GPU under torchrun."""
    device = resolve_device(name)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", local_rank)
    return device


@torch.no_grad()
def describe_frames(
    model: torch.nn.Module,
    dataset: Dataset,
    preprocess_config: PreprocessConfig,
    device: torch.device,
    batch_size: int,
    amp: bool = False,
) -> np.ndarray:
    """Descriptors (N, D) float32 of all frames of ``dataset``, the model in eval mode."""
    was_training = model.training
    model.eval()
    chunks = []
    for start in range(0, len(dataset), batch_size):
        images = dataset.load_images(range(start, min(start + batch_size, len(dataset))))
        with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
            chunks.append(model(preprocess(images, preprocess_config, device)).float().cpu())
    model.train(was_training)
    return torch.cat(chunks).numpy()


def frame_spacing_m(dataset: Dataset) -> float:
    """Median horizontal distance between consecutive frames of each sequence (stamp order)."""
    steps = []
    for sequence in np.unique(dataset.sequences):
        rows = np.flatnonzero(dataset.sequences == sequence)
        xy = dataset.positions[rows[np.argsort(dataset.stamps_ns[rows], kind="stable")], :2]
        steps.append(np.linalg.norm(np.diff(xy, axis=0), axis=1))
    steps = np.concatenate(steps) if steps else np.zeros(0)
    steps = steps[steps > 1e-3]
    return float(np.median(steps)) if len(steps) else math.nan


def resolve_radii(config: TrainConfig, train_set: Dataset) -> tuple[TrainConfig, str]:
    """``config`` with its 'auto' radii chosen from the training frames, and a sentence saying why.

    Positives within 2.5 frame spacings (3 to 10 m: a robot's odometry is metre-accurate, and the
    Pittsburgh 10 m fits street-view spacing), negatives beyond 2.5 positive radii (at most the
    Pittsburgh 25 m), a retrieval correct within the positive radius.
    """
    if not config.has_auto_radii():
        return config, "mining radii as configured"
    spacing = frame_spacing_m(train_set)
    if math.isnan(spacing):
        spacing = 2.0
    chosen = {}
    positive = config.positive_radius_m
    if positive == AUTO:
        positive = chosen["positive_radius_m"] = round(float(np.clip(2.5 * spacing, 3.0, 10.0)) * 2) / 2
    if config.negative_radius_m == AUTO:
        chosen["negative_radius_m"] = float(min(25.0, max(2.5 * positive, positive)))
    if config.eval_radius_m == AUTO:
        chosen["eval_radius_m"] = float(positive)
    resolved = dataclasses.replace(config, **chosen)
    resolved.mining()
    reason = (f"frames {spacing:.1f} m apart: " + ", ".join(f"{name} {value:g}" for name, value in chosen.items())
              + " (auto)")
    return resolved, reason


class FeatureCache:
    """The frozen trunk's outputs for every frame of a dataset: view 0 as recorded, views 1.. augmented.

    Stored as float16 on the CPU, one (views, frames, ...) tensor per trunk output; augmented views are
    seeded by (seed, view, frame), so a resumed run sees the same views.
    """

    def __init__(self, trunk, dataset: Dataset, preprocess_config: PreprocessConfig, device: torch.device,
                 batch_size: int, views: int = 1, augment: AugmentConfig | None = None, seed: int = 0,
                 progress: bool = False, description: str = "caching backbone features", amp: bool = False) -> None:
        from tqdm import tqdm

        self.views = views
        outputs: list[list[torch.Tensor]] | None = None
        batches = [(view, start) for view in range(views) for start in range(0, len(dataset), batch_size)]
        with torch.no_grad():
            for view, start in tqdm(batches, desc=description, unit="batch", disable=not progress, leave=False):
                indices = range(start, min(start + batch_size, len(dataset)))
                images = dataset.load_images(indices)
                if view > 0 and augment is not None:
                    images = [augment_image(image, np.random.default_rng([seed, view, i]), augment)
                              for image, i in zip(images, indices)]
                with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
                    result = trunk(preprocess(images, preprocess_config, device))
                if outputs is None:
                    outputs = [[] for _ in result]
                for chunks, tensor in zip(outputs, result):
                    chunks.append(tensor.to("cpu", torch.float16))
        self.features = [torch.cat(chunks).reshape(views, len(dataset), *chunks[0].shape[1:]) for chunks in outputs]
        self.nbytes = sum(t.numel() * t.element_size() for t in self.features)

    def get(self, indices: np.ndarray, views: np.ndarray | None, device: torch.device) -> tuple[torch.Tensor, ...]:
        """Trunk outputs of frames ``indices`` in views ``views`` (view 0 for all when None), float32 on ``device``."""
        index = torch.as_tensor(np.asarray(indices), dtype=torch.long)
        view = torch.zeros_like(index) if views is None else torch.as_tensor(np.asarray(views), dtype=torch.long)
        return tuple(t[view, index].to(device, torch.float32) for t in self.features)


def _images_as_trunk(images: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return (images,)


class _Heads(nn.Module):
    """The trainable part of a model, applied to what :class:`FeatureCache` holds, as a module DDP can wrap.

    With pretrained backbones only (the presets), they are frozen: the cache holds their outputs and the
    heads train. A randomly initialised backbone (the tiny test models, ``pretrained: false``) must train:
    then the cache holds the preprocessed images and the whole network trains.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        backbones = [module for module in model.modules() if isinstance(module, Backbone)]
        self.frozen_backbones = all(backbone.pretrained for backbone in backbones)
        self.trunk = model.trunk if self.frozen_backbones else _images_as_trunk
        self.freeze()

    def freeze(self) -> _Heads:
        """Stop gradients to frozen backbones and keep them in eval mode (batch-norm statistics fixed)."""
        if self.frozen_backbones:
            for module in self.model.modules():
                if isinstance(module, Backbone):
                    module.requires_grad_(False)
                    module.eval()
        return self

    def forward(self, *cached: torch.Tensor) -> torch.Tensor:
        return self.model.head(*cached) if self.frozen_backbones else self.model(*cached)

    @torch.no_grad()
    def init_aggregation(self, cached: tuple[torch.Tensor, ...]) -> None:
        """The model's data-driven initialisation from sample cache entries."""
        self.model.init_aggregation(*(cached if self.frozen_backbones else self.model.trunk(*cached)))


@torch.no_grad()
def describe_cached(heads: _Heads, cache: FeatureCache, device: torch.device, batch_size: int, amp: bool) -> np.ndarray:
    """Descriptors (N, D) float32 of view 0 of every cached frame, in eval mode."""
    was_training = heads.training
    heads.eval()
    frames = cache.features[0].shape[1]
    chunks = []
    for start in range(0, frames, batch_size):
        cached = cache.get(np.arange(start, min(start + batch_size, frames)), None, device)
        with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
            chunks.append(heads(*cached).float().cpu())
    heads.train(was_training)
    heads.freeze()
    return torch.cat(chunks).numpy()


def _val_recall(heads: _Heads, database: FeatureCache, queries: FeatureCache, val_database: Dataset,
                val_queries: Dataset, device: torch.device, cfg: TrainConfig, amp: bool) -> dict:
    """Val recall@N (keys 1, 5, 10) and MAX_RECALL_KEY: the top-1 match's maximum recall at 100 % precision,
    which still tells epochs apart once recall@1 saturates on an easy validation traversal."""
    from tscm_ros.loop_evaluation import max_recall_at_full_precision, precision_recall_curve

    db = describe_cached(heads, database, device, cfg.cache_batch_size, amp)
    q = describe_cached(heads, queries, device, cfg.cache_batch_size, amp)
    recall = dict(evaluate_descriptors(q, db, val_queries.positions, val_database.positions, cfg.eval_radius_m,
                                       VAL_NS).recall)
    similarity, correct, has_loop = top1_matches(db, q, val_database.positions, val_queries.positions, cfg.eval_radius_m)
    recall[MAX_RECALL_KEY] = max_recall_at_full_precision(precision_recall_curve(similarity, correct, has_loop))[0]
    return recall


def top1_matches(database: np.ndarray, queries: np.ndarray, database_positions: np.ndarray,
                 query_positions: np.ndarray, radius_m: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each query's nearest database descriptor: its similarity (1 - d / 2, the raw score), whether it lies
    within ``radius_m`` of the query, and whether any database frame does."""
    nearest = retrieve(queries, database, 1)[:, 0]
    similarity = 1.0 - ((queries - database[nearest]) ** 2).sum(axis=1) / 2.0
    distance = np.linalg.norm(query_positions[:, None, :2] - database_positions[None, :, :2], axis=2)
    return similarity, distance[np.arange(len(queries)), nearest] <= radius_m, (distance <= radius_m).any(axis=1)


# --------------------------------------------------------------------------------------------
# Distributed set-up (torchrun)


@dataclass(frozen=True)
class _Distributed:
    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _init_distributed() -> _Distributed:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return _Distributed(0, 1, 0)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return _Distributed(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


# --------------------------------------------------------------------------------------------
# The loop


@dataclass
class TrainResult:
    """What a training run produced."""

    run_dir: Path
    epochs_done: int
    best_epoch: int
    best_val_recall: dict[int, float]
    stopped_early: bool


@dataclass
class _Progress:
    """What the loop carries from epoch to epoch; stored in last.pt as plain values."""

    epoch: int = 0
    history: list[dict] = field(default_factory=list)
    best_key: list[float] | None = None  # val recall@1, max recall at 100 % precision, recall@5, @10 of the best epoch
    best_epoch: int = 0
    stale_epochs: int = 0
    stopped_early: bool = False

    def record(self, row: dict, recall: dict[int, float], patience: int) -> bool:
        """Add an epoch's metrics; returns whether it is the best so far."""
        self.epoch = int(row["epoch"])
        self.history.append(row)
        key = [recall[1], recall[MAX_RECALL_KEY], recall[5], recall[10]]
        key = [-1.0 if math.isnan(value) else float(value) for value in key]
        improved = self.best_key is None or key > self.best_key
        if improved:
            self.best_key, self.best_epoch, self.stale_epochs = key, self.epoch, 0
        else:
            self.stale_epochs += 1
        self.stopped_early = patience > 0 and self.stale_epochs >= patience
        return improved


def _load_teacher(teacher_path: str | Path, device: torch.device):
    teacher = load_checkpoint(str(teacher_path), expected_kind="teacher")
    teacher.model.to(device).requires_grad_(False).eval()
    return teacher


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
    sites, merged by :func:`tscm_ros.dataset.load_datasets`) into the run dir ``out``.

    Everything is checked (config, dataset, teacher) before the run directory is touched.
    With ``resume`` the run continues after the last completed epoch of ``out/last.pt``.
    """
    if kind not in KINDS:
        raise ConfigError(f"kind must be one of {KINDS}, got {kind!r}")
    if (kind == "student") != (teacher_path is not None):
        raise ConfigError("train student needs --teacher CKPT; train teacher takes none")
    run_dir = Path(out)
    model_config, preprocess_config = resolve_model_config(config, kind)

    roots = [data] if isinstance(data, (str, Path)) else list(data)
    data = ", ".join(str(root) for root in roots)
    label = ", ".join(Path(root).name for root in roots)
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
    graph = PlaceGraph(train_set.positions, train_set.sequences, train_set.headings, config.mining())
    if len(graph.usable_anchors()) == 0:
        raise DatasetError(
            f"dataset {data}: no training triplet possible (needs train frames with a positive within "
            f"{config.positive_radius_m} m in another sequence and negatives beyond {config.negative_radius_m} m); "
            "record traversals that revisit the same places, or set positive_radius_m / negative_radius_m"
        )
    used_config = dataclasses.replace(config, model={**model_config, "preprocess": preprocess_config.to_dict()})

    distributed = _init_distributed()
    device = training_device(config.device, distributed.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    use_amp = config.amp and device.type == "cuda"
    torch.manual_seed(config.seed)
    model = build_model(model_config).to(device)
    heads = _Heads(model)
    teacher = _load_teacher(teacher_path, device) if kind == "student" else None
    if teacher is not None:
        _check_same_dim(model, preprocess_config, teacher, train_set.load_images([0]), device)
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=config.lr, weight_decay=config.weight_decay)
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    teacher_fingerprint = teacher.fingerprint if teacher is not None else None

    saved = _start_run(run_dir, resume, used_config, kind, teacher_fingerprint, distributed)
    show = progress and distributed.is_main
    if distributed.is_main:
        LOG.info("train %s: %d training frames in %d traversals, %d usable anchors; %s; %d val queries against "
                 "%d val database frames", kind, len(train_set), len(np.unique(train_set.sequences)),
                 len(graph.usable_anchors()), radii_reason, len(val_queries), len(val_database))
    started = time.monotonic()
    augment = config.augmentation()
    views = config.augment_views if augment.enabled else 1
    train_cache = FeatureCache(heads.trunk, train_set, preprocess_config, device, config.cache_batch_size, views,
                               augment, config.seed, show, f"{kind}: backbone features, {views} view(s)", use_amp)
    val_caches = [FeatureCache(heads.trunk, part, preprocess_config, device, config.cache_batch_size, amp=use_amp)
                  for part in (val_database, val_queries)]
    run = _Progress()
    if saved is not None:
        run = _restore(saved, model, optimizer, scaler, run_dir / "last.pt")
    elif config.init_heads:
        sample = np.random.default_rng(config.seed).permutation(len(train_set))[:256]
        heads.init_aggregation(train_cache.get(sample, None, device))
    teacher_descriptors = None
    if teacher is not None:
        # The teacher is frozen and sees the frames as recorded: its descriptors are computed once.
        teacher_descriptors = torch.from_numpy(
            describe_frames(teacher.model, train_set, teacher.preprocess, device, config.cache_batch_size, use_amp)
        ).to(device)
        teacher = None  # frees the teacher network
    if distributed.is_main:
        LOG.info("cached %d x %d backbone outputs (%.0f MB) in %.0f s", views, len(train_set),
                 train_cache.nbytes / 1e6, time.monotonic() - started)
    trained: nn.Module = heads
    if distributed.world_size > 1:
        trained = torch.nn.parallel.DistributedDataParallel(heads, device_ids=[device.index] if device.type == "cuda" else None)

    while run.epoch < config.epochs and not run.stopped_early:
        epoch = run.epoch + 1
        started = time.monotonic()
        rng = np.random.default_rng([config.seed, epoch])
        embeddings = describe_cached(heads, train_cache, device, config.cache_batch_size, use_amp)
        triplets = _epoch_triplets(mine_triplets(embeddings, graph, rng), rng, config, distributed)
        losses = _train_epoch(
            trained, optimizer, scaler, _EpochData(train_cache, triplets, teacher_descriptors, rng), device, config,
            use_amp, f"{kind} epoch {epoch}/{config.epochs}" if show else None,
        )
        if distributed.world_size > 1:
            losses = _average_over_processes(losses)
        recall = _val_recall(heads, *val_caches, val_database, val_queries, device, config, use_amp)
        row = {"epoch": epoch, "triplets": len(triplets) * distributed.world_size, "loss": losses["loss"], "loss_hard": losses["loss_hard"]}
        if kind == "student":
            row.update(loss_soft=losses["loss_soft"], loss_cm=losses["loss_cm"])
        row.update({f"val_recall@{n}": recall[n] for n in VAL_NS})
        row[f"val_{MAX_RECALL_KEY}"] = recall[MAX_RECALL_KEY]
        row.update(lr=config.lr, seconds=round(time.monotonic() - started, 3))
        improved = run.record(row, recall, config.patience)
        if distributed.is_main:
            if improved:
                _save_best(run_dir, model, model_config, preprocess_config, epoch, recall, label, kind, teacher_fingerprint)
            with atomic_file(run_dir / "last.pt") as tmp:
                torch.save(_train_state(run, model, optimizer, scaler, kind, teacher_fingerprint), tmp)
            write_metrics_csv(run.history, run_dir / "metrics.csv")
            plot_learning_curves(run.history, run_dir / "learning_curves.png", f"train {kind}: {label}")
            LOG.info(
                "epoch %d: loss %.4f, val recall@1/5/10 %.1f/%.1f/%.1f %%, max recall at 100 %% precision %.1f %%%s",
                epoch, row["loss"], *(100 * recall[n] for n in VAL_NS), 100 * recall[MAX_RECALL_KEY],
                " (best)" if improved else "",
            )
    if distributed.is_main and (run_dir / "best.pt").is_file():
        _calibrate_best(run_dir / "best.pt", model, heads, val_caches, val_database, val_queries, device, config,
                        use_amp, label)
    if distributed.world_size > 1:
        dist.barrier()
        dist.destroy_process_group()
    best_recall = dict(zip((1, MAX_RECALL_KEY, 5, 10), run.best_key)) if run.best_key is not None else {}
    return TrainResult(run_dir, run.epoch, run.best_epoch, best_recall, run.stopped_early)


def _check_same_dim(model, preprocess_config: PreprocessConfig, teacher, probe: list, device: torch.device) -> None:
    with torch.no_grad():
        student_dim = model(preprocess(probe, preprocess_config, device)).shape[1]
        teacher_dim = teacher.model(preprocess(probe, teacher.preprocess, device)).shape[1]
    if student_dim != teacher_dim:
        raise ConfigError(
            f"the student gives {student_dim}-d descriptors but teacher {teacher.path} gives {teacher_dim}-d; "
            "distillation needs the same dimension"
        )


def _average_over_processes(losses: dict[str, float]) -> dict[str, float]:
    """Step-weighted mean of each process's mean losses."""
    totals = torch.tensor([losses[name] * losses["steps"] for name in LOSS_NAMES] + [losses["steps"]], dtype=torch.float64)
    dist.all_reduce(totals)
    steps = max(totals[-1].item(), 1.0)
    return {**{name: totals[i].item() / steps for i, name in enumerate(LOSS_NAMES)}, "steps": steps}


def _epoch_triplets(triplets: Triplets, rng: np.random.Generator, config: TrainConfig, distributed: _Distributed) -> Triplets:
    """Shuffled, capped at ``triplets_per_epoch``, cut to a multiple of the world size, this rank's share."""
    order = rng.permutation(len(triplets))
    if config.triplets_per_epoch is not None:
        order = order[: config.triplets_per_epoch]
    order = order[: len(order) - len(order) % distributed.world_size][distributed.rank :: distributed.world_size]
    return Triplets(triplets.anchors[order], triplets.positives[order], triplets.negatives[order])


@dataclass
class _EpochData:
    """What one epoch trains on: cached trunk outputs, this epoch's triplets, the teacher's descriptors."""

    cache: FeatureCache
    triplets: Triplets
    teacher_descriptors: torch.Tensor | None
    rng: np.random.Generator


def _train_epoch(
    heads: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, data: _EpochData,
    device: torch.device, config: TrainConfig, use_amp: bool, description: str | None,
) -> dict[str, float]:
    """One pass over the epoch's triplets, each image in a randomly chosen cached view; mean losses."""
    from tqdm import tqdm

    heads.train()
    (heads.module if isinstance(heads, torch.nn.parallel.DistributedDataParallel) else heads).freeze()
    triplets = data.triplets
    sums = dict.fromkeys(LOSS_NAMES, 0.0)
    steps = math.ceil(len(triplets) / config.batch_size)
    bar = tqdm(range(steps), desc=description, unit="step", disable=description is None, leave=False)
    for step in bar:
        batch = slice(step * config.batch_size, (step + 1) * config.batch_size)
        anchors, positives, negatives = triplets.anchors[batch], triplets.positives[batch], triplets.negatives[batch]
        count, k = len(anchors), negatives.shape[1]
        indices = np.concatenate([anchors, positives, negatives.reshape(-1)])
        features = data.cache.get(indices, data.rng.integers(0, data.cache.views, len(indices)), device)
        with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
            descriptors = heads(*features).float()
        student = TripletDescriptors(
            descriptors[:count], descriptors[count : 2 * count], descriptors[2 * count :].reshape(count, k, -1)
        )
        teacher = None
        if data.teacher_descriptors is not None:
            lookup = data.teacher_descriptors[torch.as_tensor(indices, device=device)]
            teacher = TripletDescriptors(lookup[:count], lookup[count : 2 * count], lookup[2 * count :].reshape(count, k, -1))
        terms = tscm_loss(student, teacher, config.margin, config.hard_weight, config.soft_weight, config.cross_metric_weight)
        loss = terms.total
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        for name, value in zip(LOSS_NAMES, (terms.total, terms.hard, terms.soft, terms.cross_metric)):
            sums[name] += float(value.detach())
        bar.set_postfix(loss=f"{loss.item():.4f}")
    return {**{name: total / max(steps, 1) for name, total in sums.items()}, "steps": steps}


# --------------------------------------------------------------------------------------------
# Run directory and checkpoints


def _start_run(run_dir: Path, resume: bool, config: TrainConfig, kind: str, teacher_fingerprint, distributed: _Distributed) -> dict | None:
    """Prepare the run directory; returns the saved training state when resuming from last.pt."""
    last = run_dir / "last.pt"
    if not resume:
        taken = run_dir.exists() and any(run_dir.iterdir())
        _barrier(distributed)  # every process looks before the main one creates anything
        if taken:
            raise ConfigError(f"run directory {run_dir} already exists and is not empty (pass --resume to continue it)")
        if distributed.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            _write_config(run_dir, config)
        _barrier(distributed)
        return None
    if not run_dir.is_dir():
        raise ConfigError(f"cannot resume: run directory {run_dir} does not exist")
    if distributed.is_main:
        for leftover in run_dir.glob(".*.tmp*"):  # from a process killed while writing
            leftover.unlink()
        _write_config(run_dir, config)
    if not last.is_file():
        LOG.info("resume: %s has no last.pt yet, starting from the first epoch", run_dir)
        return None
    try:
        state = torch.load(last, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt files
        raise CheckpointError(f"cannot resume from {last}: not a readable training state ({exc})") from exc
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise CheckpointError(f"cannot resume from {last}: not a tscm_ros training state")
    if int(state.get("version", -1)) > STATE_VERSION:
        raise CheckpointError(f"cannot resume from {last}: training state version {state.get('version')} is newer than supported")
    if state["kind"] != kind:
        raise CheckpointError(f"cannot resume from {last}: it is a {state['kind']} run, not a {kind} run")
    if state.get("teacher_fingerprint") != teacher_fingerprint:
        raise CheckpointError(f"cannot resume from {last}: it was distilled from another teacher ({state.get('teacher_fingerprint')})")
    return state


def _write_config(run_dir: Path, config: TrainConfig) -> None:
    with atomic_file(run_dir / "config.yaml") as tmp:
        tmp.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False), encoding="utf-8")


def _barrier(distributed: _Distributed) -> None:
    if distributed.world_size > 1:
        dist.barrier()


def _train_state(run: _Progress, model, optimizer, scaler, kind: str, teacher_fingerprint: str | None) -> dict:
    """Everything --resume needs, as tensors and plain values (loadable with weights_only=True)."""
    return {
        "format": STATE_FORMAT,
        "version": STATE_VERSION,
        "kind": kind,
        "teacher_fingerprint": teacher_fingerprint,
        "epoch": run.epoch,
        "progress": dataclasses.asdict(run),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _restore(state: dict, model, optimizer, scaler, path: Path) -> _Progress:
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        run = _Progress(**state["progress"])
    except (RuntimeError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"cannot resume from {path}: it does not match the configured model ({exc})") from exc
    scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    LOG.info("resumed %s after epoch %d", path.parent, run.epoch)
    return run


def fit_calibration(database: np.ndarray, queries: np.ndarray, database_positions: np.ndarray,
                    query_positions: np.ndarray, radius_m: float, fitted_on: str) -> ScoreCalibration:
    """Score calibration from validation descriptors: each query's top-1 match, correct within ``radius_m``."""
    similarity, correct, _ = top1_matches(database, queries, database_positions, query_positions, radius_m)
    return ScoreCalibration.fit(similarity, correct, fitted_on)


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


def _calibrate_best(path: Path, model: nn.Module, heads: _Heads, val_caches: list[FeatureCache], val_database: Dataset,
                    val_queries: Dataset, device: torch.device, config: TrainConfig, amp: bool, label: str) -> None:
    """Fit the best checkpoint's score calibration on the val queries' top-1 matches and store it in it."""
    best = load_checkpoint(path)
    model.load_state_dict(best.model.state_dict())
    db = describe_cached(heads, val_caches[0], device, config.cache_batch_size, amp)
    q = describe_cached(heads, val_caches[1], device, config.cache_batch_size, amp)
    calibration = fit_calibration(db, q, val_database.positions, val_queries.positions, config.eval_radius_m,
                                  f"val split of {label}, correct within {config.eval_radius_m:g} m")
    save_checkpoint(path, best.model, best.model_config, best.preprocess,
                    {**best.extra, "score_calibration": calibration.to_dict()})
    LOG.info("score calibration fitted on %d val queries: a published score of 0.95 means raw similarity >= %.3f",
             len(q), calibration.min_similarity(0.95))


def _save_best(run_dir, model, model_config, preprocess_config, epoch, recall, label, kind, teacher_fingerprint) -> None:
    extra = {
        "epoch": epoch,
        "val_recall": {str(n): float(value) for n, value in recall.items()},
        "dataset": label,
        "trained_as": kind,
    }
    if teacher_fingerprint is not None:
        extra["teacher_fingerprint"] = teacher_fingerprint
    save_checkpoint(run_dir / "best.pt", model, model_config, preprocess_config, extra)  # atomic itself
