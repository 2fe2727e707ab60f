"""A place-recognition dataset on disk (made by :mod:`tscm_ros.io.dataset_extraction`) and its loading.

A dataset directory holds::

    images/            one PNG or JPEG per kept frame
    frames.csv         image, stamp_ns, x, y, z, qx, qy, qz, qw, bag, sequence, split, role
    manifest.json      source bags, topics, sampling, split settings, counts, format version

Each source bag is one *sequence* (one traversal); every frame belongs to a split (train / val / test)
and a role (database / query). Place distances are horizontal (x, y) in metres throughout.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from tscm_ros.errors import ConfigError, DatasetError
from tscm_ros.io.geometry import yaw_from_quaternion

DATASET_FORMAT = "tscm_ros.dataset"
DATASET_VERSION = 1
SPLITS = ("train", "val", "test")
ROLES = ("database", "query")
IMAGE_CACHE_BYTES = 2 * 1024**3
FRAME_COLUMNS = ("image", "stamp_ns", "x", "y", "z", "qx", "qy", "qz", "qw", "bag", "sequence", "split", "role")



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
    """Read a dataset directory (as :func:`tscm_ros.io.dataset_extraction.extract_dataset` writes it), checking
    it is complete."""
    root = Path(root)
    manifest_path, frames_path = root / "manifest.json", root / "frames.csv"
    if not root.is_dir():
        raise DatasetError(f"dataset {root} does not exist or is not a directory")
    for path in (manifest_path, frames_path):
        if not path.is_file():
            raise DatasetError(f"dataset {root}: {path.name} is missing (not a dataset made by extract_dataset?)")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatasetError(f"dataset {root}: manifest.json is not valid JSON ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != DATASET_FORMAT:
        raise DatasetError(f"dataset {root}: manifest.json is not a {DATASET_FORMAT} manifest")
    version = manifest.get("version", -1)
    if not isinstance(version, int):
        raise DatasetError(f"dataset {root}: manifest.json has format version {version!r}, not a number")
    if version > DATASET_VERSION:
        raise DatasetError(
            f"dataset {root}: format version {version} is newer than this tscm_ros reads ({DATASET_VERSION})"
        )
    try:
        with open(frames_path, newline="", encoding="utf-8") as stream:
            reader = csv.DictReader(stream)
            missing = set(FRAME_COLUMNS) - set(reader.fieldnames or ())
            if missing:
                raise DatasetError(f"dataset {root}: frames.csv lacks columns {sorted(missing)}")
            rows = list(reader)
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DatasetError(f"dataset {root}: frames.csv is not a UTF-8 CSV table ({exc})") from exc
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
    for what, values in (("position", dataset.positions), ("orientation", dataset.orientations)):
        bad = np.flatnonzero(~np.isfinite(values).all(axis=1))
        if len(bad):
            raise DatasetError(f"dataset {root}: frames.csv has a NaN or infinite {what} in {len(bad)} row(s), "
                               f"the first for {dataset.images[bad[0]]}")
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
