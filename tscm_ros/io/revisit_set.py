"""A revisit set on disk: reference images (the map), query images (the revisit) and which references each
query should match, for judging recognition on photographs that come without poses.

Layout (as in public VPR benchmarks' small test sets)::

    SET/ref/*.png|jpg     the map, in traversal order (file-name order)
    SET/query/*.png|jpg   the revisit, in order
    SET/gt.csv            header ``query,matching_refs``; per query ``query/<file>,ref/<a>;ref/<b>;...``

A query's top-1 is right when it is one of its matching references. Frames come out with stamps one
second apart (references first, then queries, starting an hour later) and no pose.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from tscm_ros.errors import DatasetError
from tscm_ros.io.bag import Frame

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
GROUND_TRUTH_FILE = "gt.csv"
FRAME_PERIOD_NS = 1_000_000_000
QUERY_START_NS = 3600 * FRAME_PERIOD_NS


@dataclass(frozen=True)
class RevisitSet:
    """The files of a revisit set and its ground truth: ``matches[q]`` are the indices into ``references``
    of the images query ``q`` should match."""

    root: Path
    references: tuple[Path, ...]
    queries: tuple[Path, ...]
    matches: tuple[tuple[int, ...], ...]

    @property
    def name(self) -> str:
        return self.root.name

    @classmethod
    def load(cls, root: str | Path) -> RevisitSet:
        """Read a set's listing and ground truth; DatasetError naming the file and the problem otherwise."""
        root = Path(root)
        references = _images(root / "ref")
        gt_path = root / GROUND_TRUTH_FILE
        if not gt_path.is_file():
            raise DatasetError(f"revisit set {root} has no {GROUND_TRUTH_FILE} (columns query,matching_refs)")
        reference_index = {f"ref/{path.name}": i for i, path in enumerate(references)}
        queries, matches = [], []
        try:
            with open(gt_path, newline="", encoding="utf-8") as stream:
                reader = csv.DictReader(stream)
                if reader.fieldnames is None or not {"query", "matching_refs"} <= set(reader.fieldnames):
                    raise DatasetError(f"{gt_path}: the header must name the columns query,matching_refs")
                for line, row in enumerate(reader, start=2):
                    query = root / row["query"]
                    if not query.is_file():
                        raise DatasetError(f"{gt_path}, line {line}: query image {row['query']} does not exist")
                    names = [name for name in (row["matching_refs"] or "").split(";") if name]
                    unknown = [name for name in names if name not in reference_index]
                    if unknown:
                        raise DatasetError(f"{gt_path}, line {line}: {unknown[0]} is not an image in {root / 'ref'}")
                    queries.append(query)
                    matches.append(tuple(sorted(reference_index[name] for name in names)))
        except (OSError, UnicodeDecodeError, csv.Error) as exc:
            raise DatasetError(f"cannot read {gt_path}: {exc}") from exc
        if not queries:
            raise DatasetError(f"{gt_path} lists no query")
        return cls(root, tuple(references), tuple(queries), tuple(matches))

    def ground_truth(self) -> np.ndarray:
        """Boolean (queries, references): reference ``r`` is a right answer for query ``q``."""
        within = np.zeros((len(self.queries), len(self.references)), dtype=bool)
        for q, refs in enumerate(self.matches):
            within[q, list(refs)] = True
        return within

    def reference_frames(self) -> Iterator[Frame]:
        """The references as frames, in order."""
        return _frames(self.references, 0, f"{self.name}/ref")

    def query_frames(self) -> Iterator[Frame]:
        """The queries as frames, in order."""
        return _frames(self.queries, QUERY_START_NS, f"{self.name}/query")


def _images(directory: Path) -> list[Path]:
    if not directory.is_dir():
        raise DatasetError(f"revisit set {directory.parent} has no {directory.name}/ folder of images")
    images = sorted(path for path in directory.iterdir() if path.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise DatasetError(f"{directory} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return images


def read_rgb(path: Path) -> np.ndarray:
    """An image file as HxWx3 uint8 RGB; DatasetError naming the file when it cannot be decoded."""
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise DatasetError(f"{path} is not a readable image")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def _frames(paths: tuple[Path, ...], start_ns: int, source: str) -> Iterator[Frame]:
    for i, path in enumerate(paths):
        yield Frame(stamp_ns=start_ns + i * FRAME_PERIOD_NS, image=read_rgb(path), pose=None, bag=source, index=i)


def find_revisit_sets(directory: str | Path) -> list[RevisitSet]:
    """Every revisit set directly under ``directory`` (folders with ref/, query/ and gt.csv), by name;
    ``directory`` may itself be one set."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DatasetError(f"{directory} is not a directory of revisit sets")
    if (directory / GROUND_TRUTH_FILE).is_file():
        return [RevisitSet.load(directory)]
    sets = [RevisitSet.load(child) for child in sorted(directory.iterdir())
            if child.is_dir() and (child / GROUND_TRUTH_FILE).is_file()]
    if not sets:
        raise DatasetError(f"{directory} holds no revisit set (folders with ref/, query/ and {GROUND_TRUTH_FILE})")
    return sets
