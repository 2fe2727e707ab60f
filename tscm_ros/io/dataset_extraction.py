"""Extraction of a place-recognition dataset (layout in :mod:`tscm_ros.io.dataset`) from rosbag2 recordings:
frames sampled by distance and time, with their poses, split into train / val / test and database / queries.

Each source bag is one *sequence* (one traversal of the area). On a large site frames are split
into train / val / test **by place**: the x-y plane is cut into square cells, whole cells go to one
split, and frames closer than ``buffer_m`` to a frame of a later split (train < val < test) are
dropped, so no test place is ever trained on. A small site (a robot's tens to hundreds of metres)
has too few places to hold some out, so there the last **traversal** is held out instead: it is the
validation queries, matched against the first traversal (which also trains). Within every split the
first ``database_bags`` sequences are the *database* and the others the *queries*.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import cv2
import numpy as np
from scipy.spatial import cKDTree

from tscm_ros import __version__
from tscm_ros.atomic import atomic_directory
from tscm_ros.errors import BagError, ConfigError, DatasetError, TscmError
from tscm_ros.io.bag import FrameSource
from tscm_ros.io.dataset import DATASET_FORMAT, DATASET_VERSION, FRAME_COLUMNS, ROLES, SPLITS

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamplingConfig:
    """Keep a frame once the robot moved ``every_m`` metres AND ``every_s`` seconds passed since the
    last kept frame (0 disables a criterion; both 0 keeps every frame with a pose)."""

    every_m: float = 0.0
    every_s: float = 0.0

    def __post_init__(self) -> None:
        if self.every_m < 0 or self.every_s < 0:
            raise ConfigError(f"sampling intervals must be >= 0, got every_m={self.every_m}, every_s={self.every_s}")


SPLIT_MODES = ("auto", "places", "traversal")
SMALL_SITE_M = 300.0


@dataclass(frozen=True)
class SplitConfig:
    """How frames are split into train / val / test and into database / queries.

    ``mode``: 'places' cuts the x-y plane into square cells of ``cell_m`` and gives whole cells to one split
    (for sites large enough to hold out places); 'traversal' holds out the last traversal as the val
    queries against the first ``database_bags`` traversals (which also train), for small sites mapped in
    a few traversals; 'auto' takes 'traversal' for a site under 300 m across with at least three
    traversals, else 'places'. ``cell_m`` and ``buffer_m`` None: chosen from the site's extent.
    """

    mode: str = "auto"
    cell_m: float | None = None
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    buffer_m: float | None = None
    database_bags: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in SPLIT_MODES:
            raise ConfigError(f"split mode must be one of {SPLIT_MODES}, got {self.mode!r}")
        if self.cell_m is not None and self.cell_m <= 0:
            raise ConfigError(f"split cell size must be > 0 m, got {self.cell_m}")
        if self.val_fraction < 0 or self.test_fraction < 0 or self.val_fraction + self.test_fraction >= 1:
            raise ConfigError(
                f"val and test fractions must be >= 0 and sum below 1, got {self.val_fraction} and {self.test_fraction}"
            )
        if self.buffer_m is not None and self.buffer_m < 0:
            raise ConfigError(f"split buffer must be >= 0 m, got {self.buffer_m}")
        if self.database_bags < 1:
            raise ConfigError(f"database_bags must be >= 1, got {self.database_bags}")


def site_extent_m(positions_xy: np.ndarray) -> float:
    """Diagonal of the horizontal bounding box of the positions, in metres."""
    xy = np.asarray(positions_xy, dtype=np.float64)[:, :2]
    return float(np.linalg.norm(xy.max(axis=0) - xy.min(axis=0))) if len(xy) else 0.0


def resolve_split(cfg: SplitConfig, positions_xy: np.ndarray, bags: int) -> tuple[SplitConfig, str]:
    """``cfg`` with mode, cell size and buffer chosen from the data, and a sentence saying why."""
    extent = site_extent_m(positions_xy)
    mode = cfg.mode
    if mode == "auto":
        mode = "traversal" if extent < SMALL_SITE_M and bags >= 3 else "places"
    if mode == "traversal":
        if bags < 3:
            raise ConfigError(
                f"split mode 'traversal' holds out the last traversal for validation and trains on the others, "
                f"so it needs at least three bags, got {bags}"
            )
        why = (f"site {extent:.0f} m across (< {SMALL_SITE_M:.0f} m) in {bags} traversals: "
               if cfg.mode == "auto" else "")
        reason = (f"{why}validating on held-out traversal {bags - 1} (the last bag) against the first "
                  f"{cfg.database_bags} traversal(s); training on traversals 0-{bags - 2}, no test split")
        return replace(cfg, mode=mode, cell_m=None, buffer_m=None), reason
    cell = cfg.cell_m if cfg.cell_m is not None else float(np.clip(round(extent / 8.0), 5.0, 50.0))
    buffer = cfg.buffer_m if cfg.buffer_m is not None else float(min(10.0, cell / 2))
    why = f"site {extent:.0f} m across in {bags} traversal(s): " if cfg.mode == "auto" else ""
    reason = (f"{why}splitting by place: cells of {cell:g} m{' (auto)' if cfg.cell_m is None else ''}, "
              f"buffer {buffer:g} m{' (auto)' if cfg.buffer_m is None else ''}, "
              f"val {cfg.val_fraction:g}, test {cfg.test_fraction:g}")
    return replace(cfg, mode=mode, cell_m=cell, buffer_m=buffer), reason


# --------------------------------------------------------------------------------------------
# Splits


def assign_splits(positions_xy: np.ndarray, cfg: SplitConfig) -> np.ndarray:
    """Split name per frame: whole grid cells of ``cfg.cell_m`` go to one split, in a seeded random
    cell order, each cell to the split furthest below its target share (test and val get a cell first)."""
    cells = np.floor(np.asarray(positions_xy, dtype=np.float64)[:, :2] / cfg.cell_m).astype(np.int64)
    unique_cells, cell_of_frame = np.unique(cells, axis=0, return_inverse=True)
    cell_of_frame = cell_of_frame.reshape(-1)
    frames_per_cell = np.bincount(cell_of_frame, minlength=len(unique_cells))
    fractions = {"train": 1.0 - cfg.val_fraction - cfg.test_fraction, "val": cfg.val_fraction,
                 "test": cfg.test_fraction}
    counts = dict.fromkeys(SPLITS, 0)
    split_of_cell = np.empty(len(unique_cells), dtype=object)
    total = len(cell_of_frame)
    for cell in np.random.default_rng(cfg.seed).permutation(len(unique_cells)):
        first_needed = [name for name in ("test", "val") if fractions[name] > 0 and counts[name] == 0]
        if first_needed:
            name = first_needed[0]
        else:
            name = max(SPLITS, key=lambda s: fractions[s] * total - counts[s])
        split_of_cell[cell] = name
        counts[name] += int(frames_per_cell[cell])
    return split_of_cell[cell_of_frame].astype(str)


def buffer_mask(positions_xy: np.ndarray, splits: np.ndarray, buffer_m: float) -> np.ndarray:
    """True for frames to keep: a frame is dropped when a frame of a later split (train < val < test)
    lies within ``buffer_m``, so places of different splits stay at least that far apart."""
    xy = np.asarray(positions_xy, dtype=np.float64)[:, :2]
    keep = np.ones(len(xy), dtype=bool)
    if buffer_m <= 0:
        return keep
    for rank, name in enumerate(SPLITS[:-1]):
        later = np.isin(splits, SPLITS[rank + 1 :])
        mine = splits == name
        if not later.any() or not mine.any():
            continue
        distance, _ = cKDTree(xy[later]).query(xy[mine], k=1)
        keep[np.flatnonzero(mine)[distance < buffer_m]] = False
    return keep


# --------------------------------------------------------------------------------------------
# Extraction


@dataclass
class _BagReport:
    path: str
    sequence: int
    image_topic: str
    pose_topic: str
    frames_read: int = 0
    frames_without_pose: int = 0
    frames_malformed: int = 0
    poses_invalid: int = 0
    frames_sampled: int = 0


def _write_image(path: Path, rgb: np.ndarray) -> None:
    if not cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)):
        raise DatasetError(f"could not write image {path}")


def _sample_bag(
    source: FrameSource, sequence: int, image_dir: Path, image_format: str, sampling: SamplingConfig, progress: bool,
) -> tuple[list[dict], _BagReport]:
    bag = Path(source.bag)
    reader = source.open(progress=progress)
    if not reader.pose_topic:
        raise BagError(
            f"bag {bag}: no pose topic (Odometry, PoseStamped, PoseWithCovarianceStamped or NavSatFix); "
            "a dataset needs a pose for every image"
        )
    report = _BagReport(str(bag), sequence, str(reader.image_topic), str(reader.pose_topic))
    rows: list[dict] = []
    travelled = 0.0
    previous_xy = None
    last_kept_stamp = None
    last_kept_travelled = 0.0
    for frame in reader:
        if frame.pose is None:
            continue
        xy = np.asarray(frame.pose.position, dtype=np.float64)[:2]
        if previous_xy is not None:
            travelled += float(np.linalg.norm(xy - previous_xy))
        previous_xy = xy
        if last_kept_stamp is not None and (
            travelled - last_kept_travelled < sampling.every_m
            or (frame.stamp_ns - last_kept_stamp) * 1e-9 < sampling.every_s
        ):
            continue
        last_kept_stamp, last_kept_travelled = frame.stamp_ns, travelled
        name = f"seq{sequence:02d}_{len(rows):06d}.{image_format}"
        _write_image(image_dir / name, frame.image)
        position = np.asarray(frame.pose.position, dtype=np.float64)
        orientation = np.asarray(frame.pose.orientation, dtype=np.float64)
        rows.append(
            {
                "image": f"images/{name}",
                "stamp_ns": int(frame.stamp_ns),
                **dict(zip(("x", "y", "z"), position.tolist())),
                **dict(zip(("qx", "qy", "qz", "qw"), orientation.tolist())),
                "bag": bag.name,
                "sequence": sequence,
            }
        )
    report.frames_read = reader.frames_read
    report.frames_without_pose = reader.frames_without_pose
    report.frames_malformed = reader.frames_malformed
    report.poses_invalid = reader.poses_invalid
    report.frames_sampled = len(rows)
    if reader.frames_read == 0:
        problem = (
            f"none of its {reader.frames_malformed} images on {reader.image_topic} could be decoded (see the warnings)"
            if reader.frames_malformed
            else f"no images on topic {reader.image_topic}"
        )
        raise BagError(f"bag {bag}: {problem}")
    if not rows:
        raise BagError(
            f"bag {bag}: none of its {reader.frames_read} images has a pose from {reader.pose_topic} "
            f"(poses are interpolated only between pose messages at most {source.max_gap_s} s apart)"
        )
    LOG.info("%s", reader.summary())
    return rows, report


def _write_csv(path: Path, rows: Sequence[dict]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as stream:
        writer = csv.DictWriter(stream, fieldnames=FRAME_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def _traversal_split(rows: list[dict], bags: int, database_bags: int) -> list[dict]:
    """Rows of a 'traversal' split: every traversal but the last trains; the last is the val queries, and
    the first ``database_bags`` traversals are listed a second time as the val database (same images)."""
    held_out = bags - 1
    database = min(database_bags, held_out)
    out = []
    for row in rows:
        if row["sequence"] == held_out:
            out.append({**row, "split": "val", "role": "query"})
            continue
        role = "database" if row["sequence"] < database else "query"
        out.append({**row, "split": "train", "role": role})
        if row["sequence"] < database:
            out.append({**row, "split": "val", "role": "database"})
    return out


def extract_dataset(
    sources: Sequence[FrameSource],
    out: str | Path,
    sampling: SamplingConfig = SamplingConfig(),
    split: SplitConfig = SplitConfig(),
    image_format: str = "png",
    overwrite: bool = False,
    progress: bool = False,
) -> dict:
    """Extract frames with poses from the bags of ``sources`` (one sequence each) into a dataset at ``out``.

    Written in a temporary directory next to ``out`` and renamed into place when complete;
    on any error nothing is left behind. Returns the manifest.
    """
    if not sources:
        raise ConfigError("no input bag given")
    if image_format not in ("png", "jpg"):
        raise ConfigError(f"image format must be 'png' or 'jpg', got {image_format!r}")
    out = Path(out)
    if out.exists() and not overwrite:
        raise ConfigError(f"output {out} already exists (choose another path or pass --overwrite)")
    for source in sources:
        if not Path(source.bag).exists():
            raise BagError(f"bag {source.bag} does not exist")
    with atomic_directory(out) as staging:
        image_dir = staging / "images"
        image_dir.mkdir()
        rows: list[dict] = []
        reports = []
        for sequence, source in enumerate(sources):
            try:
                bag_rows, report = _sample_bag(source, sequence, image_dir, image_format, sampling, progress)
            except TscmError as exc:
                if str(Path(source.bag)) in str(exc):
                    raise
                raise type(exc)(f"bag {Path(source.bag)}: {exc}") from exc
            rows.extend(bag_rows)
            reports.append(report)
        positions = np.array([[row["x"], row["y"]] for row in rows])
        split, split_reason = resolve_split(split, positions, len(sources))
        LOG.info("split: %s", split_reason)
        if split.mode == "traversal":
            keep = np.ones(len(rows), dtype=bool)
            kept_rows = _traversal_split(rows, len(sources), split.database_bags)
        else:
            splits = assign_splits(positions, split)
            keep = buffer_mask(positions, splits, split.buffer_m)
            kept_rows = []
            for row, name, kept in zip(rows, splits, keep):
                if not kept:
                    (staging / row["image"]).unlink()
                    continue
                role = "database" if row["sequence"] < split.database_bags else "query"
                kept_rows.append({**row, "split": str(name), "role": role})
        if not kept_rows:
            raise DatasetError(f"dataset {out}: no frame left after the split buffer of {split.buffer_m} m")
        _write_csv(staging / "frames.csv", kept_rows)
        counts = {
            name: {role: sum(1 for r in kept_rows if r["split"] == name and r["role"] == role) for role in ROLES}
            for name in SPLITS
        }
        manifest = {
            "format": DATASET_FORMAT,
            "version": DATASET_VERSION,
            "created_by": f"tscm_ros {__version__}",
            "bags": [asdict(report) for report in reports],
            "sampling": asdict(sampling),
            "split": {**asdict(split), "reason": split_reason},
            "image_format": image_format,
            "max_gap_s": max(source.max_gap_s for source in sources),
            "counts": {"frames": len(kept_rows), "dropped_by_buffer": int((~keep).sum()), "splits": counts},
        }
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    for name in SPLITS:
        LOG.info("%s: %d database + %d query frames", name, counts[name]["database"], counts[name]["query"])
    return manifest
