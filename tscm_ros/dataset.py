"""Place-recognition datasets extracted from rosbag2 recordings, and triplet mining on them.

A dataset directory holds::

    images/            one PNG or JPEG per kept frame
    frames.csv         image, stamp_ns, x, y, z, qx, qy, qz, qw, bag, sequence, split, role
    manifest.json      source bags, topics, sampling, split settings, counts, format version

Each source bag is one *sequence* (one traversal of the area). On a large site frames are split
into train / val / test **by place**: the x-y plane is cut into square cells, whole cells go to one
split, and frames closer than ``buffer_m`` to a frame of a later split (train < val < test) are
dropped, so no test place is ever trained on. A small site (a robot's tens to hundreds of metres)
has too few places to hold some out, so there the last **traversal** is held out instead: it is the
validation queries, matched against the first traversal (which also trains). Within every split the
first ``database_bags`` sequences are the *database* and the others the *queries*.

Place distances are horizontal (x, y) in metres throughout.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import cv2
import numpy as np
from scipy.spatial import cKDTree

from tscm_ros import __version__
from tscm_ros.atomic import atomic_directory
from tscm_ros.bag import open_frames
from tscm_ros.errors import BagError, ConfigError, DatasetError, TscmError
from tscm_ros.geometry import yaw_from_quaternion

LOG = logging.getLogger(__name__)

DATASET_FORMAT = "tscm_ros.dataset"
DATASET_VERSION = 1
SPLITS = ("train", "val", "test")
ROLES = ("database", "query")
IMAGE_CACHE_BYTES = 2 * 1024**3
FRAME_COLUMNS = ("image", "stamp_ns", "x", "y", "z", "qx", "qy", "qz", "qw", "bag", "sequence", "split", "role")


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
    fractions = {"train": 1.0 - cfg.val_fraction - cfg.test_fraction, "val": cfg.val_fraction, "test": cfg.test_fraction}
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
    frames_sampled: int = 0


def _write_image(path: Path, rgb: np.ndarray) -> None:
    if not cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)):
        raise DatasetError(f"could not write image {path}")


def _sample_bag(
    bag: Path, sequence: int, image_dir: Path, image_format: str, sampling: SamplingConfig, reader_args: dict, progress: bool
) -> tuple[list[dict], _BagReport]:
    reader = open_frames(bag, progress=progress, **reader_args)
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
            travelled - last_kept_travelled < sampling.every_m or (frame.stamp_ns - last_kept_stamp) * 1e-9 < sampling.every_s
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
            f"(poses are interpolated only between pose messages at most {reader_args['max_gap_s']} s apart)"
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
    bags: Sequence[str | Path],
    out: str | Path,
    image_topic: str | None = None,
    pose_topic: str | None = None,
    sampling: SamplingConfig = SamplingConfig(),
    split: SplitConfig = SplitConfig(),
    image_format: str = "png",
    max_gap_s: float = 1.0,
    overwrite: bool = False,
    progress: bool = False,
) -> dict:
    """Extract frames with poses from ``bags`` (one sequence each) into a dataset at ``out``.

    Written in a temporary directory next to ``out`` and renamed into place when complete;
    on any error nothing is left behind. Returns the manifest.
    """
    if not bags:
        raise ConfigError("no input bag given")
    if image_format not in ("png", "jpg"):
        raise ConfigError(f"image format must be 'png' or 'jpg', got {image_format!r}")
    out = Path(out)
    if out.exists() and not overwrite:
        raise ConfigError(f"output {out} already exists (choose another path or pass --overwrite)")
    bag_paths = [Path(bag) for bag in bags]
    for bag in bag_paths:
        if not bag.exists():
            raise BagError(f"bag {bag} does not exist")
    with atomic_directory(out) as staging:
        image_dir = staging / "images"
        image_dir.mkdir()
        rows: list[dict] = []
        reports = []
        reader_args = {"image_topic": image_topic, "pose_topic": pose_topic, "max_gap_s": max_gap_s}
        for sequence, bag in enumerate(bag_paths):
            try:
                bag_rows, report = _sample_bag(bag, sequence, image_dir, image_format, sampling, reader_args, progress)
            except TscmError as exc:
                if str(bag) in str(exc):
                    raise
                raise type(exc)(f"bag {bag}: {exc}") from exc
            rows.extend(bag_rows)
            reports.append(report)
        positions = np.array([[row["x"], row["y"]] for row in rows])
        split, split_reason = resolve_split(split, positions, len(bag_paths))
        LOG.info("split: %s", split_reason)
        if split.mode == "traversal":
            keep = np.ones(len(rows), dtype=bool)
            kept_rows = _traversal_split(rows, len(bag_paths), split.database_bags)
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
            "max_gap_s": max_gap_s,
            "counts": {"frames": len(kept_rows), "dropped_by_buffer": int((~keep).sum()), "splits": counts},
        }
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    for name in SPLITS:
        LOG.info("%s: %d database + %d query frames", name, counts[name]["database"], counts[name]["query"])
    return manifest


# --------------------------------------------------------------------------------------------
# Loading


class _ImageCache:
    """Decoded images by relative path, kept until ``limit_bytes`` are used (then new ones are not kept)."""

    def __init__(self, limit_bytes: int = IMAGE_CACHE_BYTES) -> None:
        self.limit_bytes = limit_bytes
        self.used_bytes = 0
        self.images: dict[str, np.ndarray] = {}

    def get(self, key: str) -> np.ndarray | None:
        return self.images.get(key)

    def put(self, key: str, image: np.ndarray) -> None:
        if self.used_bytes + image.nbytes <= self.limit_bytes:
            self.images[key] = image
            self.used_bytes += image.nbytes


@dataclass
class Dataset:
    """Frames of a dataset directory (or a subset of them) as arrays. Images load on demand and stay
    cached in memory up to ``IMAGE_CACHE_BYTES`` (shared by all subsets of one loaded dataset)."""

    root: Path
    manifest: dict
    images: list[str]
    stamps_ns: np.ndarray
    positions: np.ndarray
    orientations: np.ndarray
    bags: list[str]
    sequences: np.ndarray
    splits: np.ndarray
    roles: np.ndarray
    _image_cache: _ImageCache = field(default_factory=_ImageCache, repr=False)

    def __len__(self) -> int:
        return len(self.images)

    @property
    def headings(self) -> np.ndarray:
        """Yaw of each frame in radians."""
        return yaw_from_quaternion(self.orientations)

    def subset(self, split: str | None = None, role: str | None = None) -> Dataset:
        """The frames of one split and/or role (sharing this dataset's image cache)."""
        mask = np.ones(len(self), dtype=bool)
        if split is not None:
            mask &= self.splits == split
        if role is not None:
            mask &= self.roles == role
        rows = np.flatnonzero(mask)
        return Dataset(
            root=self.root,
            manifest=self.manifest,
            images=[self.images[i] for i in rows],
            stamps_ns=self.stamps_ns[rows],
            positions=self.positions[rows],
            orientations=self.orientations[rows],
            bags=[self.bags[i] for i in rows],
            sequences=self.sequences[rows],
            splits=self.splits[rows],
            roles=self.roles[rows],
            _image_cache=self._image_cache,
        )

    def image(self, index: int) -> np.ndarray:
        """The RGB uint8 image of frame ``index`` (cached after the first read)."""
        relative = self.images[index]
        cached = self._image_cache.get(relative)
        if cached is None:
            path = self.root / relative
            bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
            if bgr is None:
                raise DatasetError(f"dataset {self.root}: image {relative} is missing or unreadable")
            cached = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
            self._image_cache.put(relative, cached)
        return cached

    def load_images(self, indices: Sequence[int] | np.ndarray) -> list[np.ndarray]:
        """RGB uint8 images of the given frames."""
        return [self.image(int(i)) for i in indices]


def load_dataset(root: str | Path) -> Dataset:
    """Read a dataset directory written by :func:`extract_dataset`, checking it is complete."""
    root = Path(root)
    manifest_path, frames_path = root / "manifest.json", root / "frames.csv"
    if not root.is_dir():
        raise DatasetError(f"dataset {root} does not exist or is not a directory")
    for path in (manifest_path, frames_path):
        if not path.is_file():
            raise DatasetError(f"dataset {root}: {path.name} is missing (not a dataset made by extract_dataset?)")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DatasetError(f"dataset {root}: manifest.json is not valid JSON ({exc})") from exc
    if manifest.get("format") != DATASET_FORMAT:
        raise DatasetError(f"dataset {root}: manifest.json is not a {DATASET_FORMAT} manifest")
    if int(manifest.get("version", -1)) > DATASET_VERSION:
        raise DatasetError(
            f"dataset {root}: format version {manifest.get('version')} is newer than this tscm_ros reads ({DATASET_VERSION})"
        )
    with open(frames_path, newline="", encoding="utf-8") as stream:
        reader = csv.DictReader(stream)
        missing = set(FRAME_COLUMNS) - set(reader.fieldnames or ())
        if missing:
            raise DatasetError(f"dataset {root}: frames.csv lacks columns {sorted(missing)}")
        rows = list(reader)
    if not rows:
        raise DatasetError(f"dataset {root}: frames.csv has no frames (empty dataset)")
    try:
        dataset = Dataset(
            root=root,
            manifest=manifest,
            images=[row["image"] for row in rows],
            stamps_ns=np.array([int(row["stamp_ns"]) for row in rows], dtype=np.int64),
            positions=np.array([[float(row[c]) for c in ("x", "y", "z")] for row in rows]),
            orientations=np.array([[float(row[c]) for c in ("qx", "qy", "qz", "qw")] for row in rows]),
            bags=[row["bag"] for row in rows],
            sequences=np.array([int(row["sequence"]) for row in rows], dtype=np.int64),
            splits=np.array([row["split"] for row in rows]),
            roles=np.array([row["role"] for row in rows]),
        )
    except (ValueError, TypeError) as exc:
        raise DatasetError(f"dataset {root}: frames.csv has a malformed value ({exc})") from exc
    if not np.isin(dataset.splits, SPLITS).all() or not np.isin(dataset.roles, ROLES).all():
        raise DatasetError(f"dataset {root}: frames.csv has an unknown split or role (splits {SPLITS}, roles {ROLES})")
    for relative in dataset.images:
        if not (root / relative).is_file():
            raise DatasetError(f"dataset {root}: image {relative} listed in frames.csv is missing")
    return dataset


SITE_OFFSET_M = 1.0e6


def load_datasets(roots: Sequence[str | Path]) -> Dataset:
    """One dataset, or several (different sites) merged into one: each later dataset's positions are moved
    ``SITE_OFFSET_M`` further along x, so places of different sites are never positives of each other,
    and its sequence numbers follow the previous dataset's."""
    datasets = [load_dataset(root) for root in roots]
    if not datasets:
        raise ConfigError("no dataset given")
    if len(datasets) == 1:
        return datasets[0]
    images, positions, sequences, next_sequence = [], [], [], 0
    for index, dataset in enumerate(datasets):
        images += [str(dataset.root.resolve() / relative) for relative in dataset.images]
        positions.append(dataset.positions + np.array([index * SITE_OFFSET_M, 0.0, 0.0]))
        sequences.append(dataset.sequences + next_sequence)
        next_sequence += int(dataset.sequences.max()) + 1
    return Dataset(
        root=Path("/"),
        manifest={"format": DATASET_FORMAT, "merged": [str(d.root) for d in datasets]},
        images=images,
        stamps_ns=np.concatenate([d.stamps_ns for d in datasets]),
        positions=np.concatenate(positions),
        orientations=np.concatenate([d.orientations for d in datasets]),
        bags=[bag for d in datasets for bag in d.bags],
        sequences=np.concatenate(sequences),
        splits=np.concatenate([d.splits for d in datasets]),
        roles=np.concatenate([d.roles for d in datasets]),
    )


def require_split(dataset: Dataset, split: str) -> tuple[Dataset, Dataset]:
    """The (database, queries) of a split, raising DatasetError when either is empty."""
    database, queries = dataset.subset(split, "database"), dataset.subset(split, "query")
    if len(database) == 0 or len(queries) == 0:
        raise DatasetError(
            f"dataset {dataset.root}: the {split} split has {len(database)} database and {len(queries)} query frames; "
            "both are needed (extract from at least two traversals, or change the split settings)"
        )
    return database, queries


# --------------------------------------------------------------------------------------------
# Triplet mining


@dataclass(frozen=True)
class MiningConfig:
    """Pittsburgh-style triplet mining settings."""

    positive_radius_m: float = 10.0
    negative_radius_m: float = 25.0
    heading_deg: float | None = None
    negatives_per_triplet: int = 10
    negative_candidates: int = 1000

    def __post_init__(self) -> None:
        if not 0 < self.positive_radius_m <= self.negative_radius_m:
            raise ConfigError(
                f"need 0 < positive_radius_m <= negative_radius_m, got {self.positive_radius_m} and {self.negative_radius_m}"
            )
        if self.negatives_per_triplet < 1 or self.negative_candidates < self.negatives_per_triplet:
            raise ConfigError(
                f"need 1 <= negatives_per_triplet <= negative_candidates, got {self.negatives_per_triplet} "
                f"and {self.negative_candidates}"
            )
        if self.heading_deg is not None and not 0 < self.heading_deg <= 180:
            raise ConfigError(f"heading_deg must be in (0, 180] or null, got {self.heading_deg}")


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
        return Triplets(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, cfg.negatives_per_triplet), np.int64))
    return Triplets(np.array(anchors), np.array(positives), np.stack(negatives))


__all__ = [
    "Dataset",
    "MiningConfig",
    "PlaceGraph",
    "SamplingConfig",
    "SplitConfig",
    "Triplets",
    "assign_splits",
    "buffer_mask",
    "extract_dataset",
    "load_dataset",
    "load_datasets",
    "mine_triplets",
    "require_split",
]
