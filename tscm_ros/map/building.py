"""Adding keyframes to a map: the one path shared by build_map, the evaluation and the node's mapping mode.

``KeyframeSelector`` decides which frames become keyframes (travel, time, appearance); ``KeyframeBuilder``
describes keyframes with the map's describer and adds them, with their local features (and thumbnails when
asked): ``add_frames`` a stream of frames in batches (build_map, the evaluation), ``add_image`` one image
already described (mapping mode). ``build_map`` is build_map's whole pipeline: recordings read in a thread
(decoding overlaps inference), the travel/time test while reading, the appearance test on the batches'
descriptors, the map written at the end. With a model that describes
through a VLAD vocabulary (the training-free default), a map started empty begins with the generic
vocabulary shipped in the package and fits its own on its first ``fit_keyframes`` keyframes: their
feature maps are kept (half precision, about 43 kB each for the default) until then, the vocabulary is
fitted on them, every keyframe so far is described again with it and the index is rebuilt. After that
the vocabulary stays. A map that ends with fewer than ``MIN_FIT_KEYFRAMES`` keyframes keeps the generic
vocabulary; ``finish()`` fits on what there is otherwise. Queries must then be described by
``builder.describer`` (the describer with the map's vocabulary).

The builder also keeps the map's score calibration (tscm_ros/map/calibration.py): ``finish()`` estimates
it; with ``calibrate_while_adding`` (mapping mode) it is estimated anew whenever the map has doubled since
the last estimate (from ``MIN_KEYFRAMES`` on) and after the vocabulary was fitted.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np

from tscm_ros.describe.describer import Describer
from tscm_ros.describe.local_features import LocalFeatures, extract_local_features
from tscm_ros.errors import ConfigError, MapError
from tscm_ros.map.index import IndexConfig
from tscm_ros.map.keyframe_map import KeyframeMap, KeyframeMeta
from tscm_ros.map.storage import check_replaceable
from tscm_ros.progress import progress as progress_bar

if TYPE_CHECKING:
    from tscm_ros.io.bag import Frame, FrameReader

LOG = logging.getLogger(__name__)

MIN_FIT_KEYFRAMES = 20  # fewer keyframes than this: the generic vocabulary stays
BUILD_FIT_KEYFRAMES = 2000  # build_map fits on (at most) the first this many keyframes
MAPPING_FIT_KEYFRAMES = 100  # mapping mode fits once its map has this many keyframes
THUMBNAIL_WIDTH = 64  # build_map --thumbnails


@dataclass
class KeyframeSelector:
    """Decides which frames become keyframes: enough time and travel since the last one, and
    (optionally) a descriptor that differs enough from it.

    Each threshold at 0 (or ``max_similarity`` None) is off. Distance is only checked when both the
    frame's and the last keyframe's positions are known.
    """

    min_interval_s: float = 0.0
    min_distance_m: float = 0.0
    max_similarity: float | None = None
    _last_stamp_ns: int | None = field(default=None, init=False, repr=False)
    _last_position: np.ndarray | None = field(default=None, init=False, repr=False)
    _last_descriptor: np.ndarray | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.min_interval_s < 0 or self.min_distance_m < 0:
            raise ConfigError("keyframe selection: minimum interval and distance must be >= 0")
        if self.max_similarity is not None and not 0.0 < self.max_similarity <= 1.0:
            raise ConfigError(f"keyframe selection: max_similarity must be in (0, 1], got {self.max_similarity}")

    def moved_enough(self, stamp_ns: int, position: np.ndarray | None) -> bool:
        """Time and travel since the last keyframe are both above their thresholds."""
        if self._last_stamp_ns is None:
            return True
        if abs(stamp_ns - self._last_stamp_ns) < self.min_interval_s * 1e9:
            return False
        if self.min_distance_m > 0 and position is not None and self._last_position is not None:
            return float(np.linalg.norm(position - self._last_position)) >= self.min_distance_m
        return True

    def looks_new(self, descriptor: np.ndarray) -> bool:
        """The descriptor's similarity to the last keyframe's is below ``max_similarity``."""
        if self.max_similarity is None or self._last_descriptor is None:
            return True
        return float(np.dot(descriptor, self._last_descriptor)) < self.max_similarity

    def accept(self, stamp_ns: int, position: np.ndarray | None, descriptor: np.ndarray) -> bool:
        """Whether this frame becomes a keyframe; remembers it if so."""
        if not (self.moved_enough(stamp_ns, position) and self.looks_new(descriptor)):
            return False
        self._last_stamp_ns = stamp_ns
        self._last_position = None if position is None else np.asarray(position, dtype=np.float64)
        self._last_descriptor = descriptor
        return True


def _thumbnail(image: np.ndarray) -> np.ndarray:
    """A ``THUMBNAIL_WIDTH``-px wide copy of ``image``, as the map stores it."""
    height = max(1, round(image.shape[0] * THUMBNAIL_WIDTH / image.shape[1]))
    return cv2.resize(image, (THUMBNAIL_WIDTH, height), interpolation=cv2.INTER_AREA)


def describer_for_map(describer: Describer, keyframe_map: KeyframeMap) -> Describer:
    """``describer`` with the map's vocabulary, the one that computed the map's descriptors.

    ``describer`` is the model the map was built with, as loaded by name or checkpoint (the map checked
    that its ``base_fingerprint`` matches). MapError when the map's vocabulary does not reproduce the
    fingerprint the map recorded, or when the map and the model disagree on having a vocabulary.
    """
    if keyframe_map.vocabulary is None:
        if describer.adapts_to_map:
            raise MapError(f"{keyframe_map.source} has no vocabulary, but {describer.model_name} describes with one: "
                           "rebuild the map with build_map")
        return describer
    if not describer.adapts_to_map:
        raise MapError(f"{keyframe_map.source} holds a vocabulary, but {describer.model_name} has none to use it")
    adapted = describer.with_vocabulary(keyframe_map.vocabulary)
    if adapted.fingerprint != keyframe_map.model_fingerprint:
        raise MapError(f"{keyframe_map.source}: its vocabulary with {describer.model_name} gives fingerprint "
                       f"{adapted.fingerprint}, but the map records {keyframe_map.model_fingerprint}: the map is "
                       "damaged; rebuild it with build_map")
    return adapted


class KeyframeBuilder:
    """Describes keyframes and adds them to ``keyframe_map``, fitting the map's own vocabulary (module doc).

    ``describer`` is the map's describer: the model with the map's vocabulary, or with the generic one for a
    new map (``describer_for_map`` gives it for a loaded map).
    """

    def __init__(self, describer: Describer, keyframe_map: KeyframeMap,
                 fit_keyframes: int = BUILD_FIT_KEYFRAMES, calibrate_while_adding: bool = False) -> None:
        if fit_keyframes < MIN_FIT_KEYFRAMES:
            raise ConfigError(f"the vocabulary needs at least {MIN_FIT_KEYFRAMES} keyframes to fit, "
                              f"got {fit_keyframes}")
        if describer.fingerprint != keyframe_map.model_fingerprint:
            raise ConfigError(f"{keyframe_map.source} holds descriptors of model {keyframe_map.model_fingerprint}, "
                              f"not of {describer.model_name} ({describer.fingerprint})")
        self.describer = describer
        self.map = keyframe_map
        self.fit_keyframes = int(fit_keyframes)
        samples = keyframe_map.vocabulary_samples
        resumed = samples is not None and len(samples) == len(keyframe_map)  # a saved map that had not fitted yet
        fits = (describer.adapts_to_map and keyframe_map.vocabulary is not None
                and keyframe_map.vocabulary.source == "generic" and (len(keyframe_map) == 0 or resumed))
        # The feature maps are held in the map itself, so that a save before the fit (mapping mode's autosave,
        # build_map of a map too small to fit) keeps them and a session resumed from it still fits.
        self._held: list[tuple[np.ndarray, ...]] | None = (samples if resumed else []) if fits else None
        keyframe_map.vocabulary_samples = self._held
        self.calibrate_while_adding = calibrate_while_adding
        self._calibrated_at = len(keyframe_map) if keyframe_map.calibration is not None else 0

    @property
    def fitting(self) -> bool:
        """Whether the map will still fit its own vocabulary (it holds the keyframes' feature maps till then)."""
        return self._held is not None

    def add_frames(self, frames: Iterable[Frame], selector: KeyframeSelector | None = None, *,
                   thumbnails: bool = False) -> int:
        """Describe ``frames`` in batches (the describer's batch size) and add each that ``selector`` accepts (None:
        every one) as a keyframe; how many were added. When the vocabulary is fitted on a frame of a batch, the
        frames after it are described again from their feature maps, with the map's own vocabulary."""
        added = 0
        for batch in _batches(frames, self.describer.batch_size):
            descriptors, maps = self.describe([frame.image for frame in batch])
            described_by = self.describer
            for row, frame in enumerate(batch):
                if self.describer is not described_by:  # the map fitted its vocabulary on a frame of this batch
                    descriptors[row:] = self.describer.aggregate(maps[row:])
                    described_by = self.describer
                added += self.add_image(frame.image, frame.stamp_ns, frame.pose, frame.bag, descriptors[row],
                                        maps[row], selector, thumbnail=thumbnails) is not None
        return added

    def add_image(self, image: np.ndarray, stamp_ns: int, pose, bag: str, descriptor: np.ndarray,
                  feature_maps: tuple[np.ndarray, ...] = (), selector: KeyframeSelector | None = None, *,
                  thumbnail: bool = False, local_features: LocalFeatures | None = None) -> int | None:
        """Add one image, already described by ``self.describer`` (``describe``), as a keyframe when ``selector``
        (None: any) accepts it, with its local features (``local_features`` when already extracted) and, with
        ``thumbnail``, a thumbnail; its keyframe id, or None when not accepted."""
        position = None if pose is None else pose.position
        if selector is not None and not selector.accept(stamp_ns, position, descriptor):
            return None
        meta = KeyframeMeta(stamp_ns=stamp_ns, pose=pose, bag=bag, thumbnail=_thumbnail(image) if thumbnail else None,
                            local_features=extract_local_features(image) if local_features is None else local_features)
        return int(self.add_described(descriptor[None, :], [feature_maps], [meta])[0])

    def add(self, images: Sequence[np.ndarray], metas: Sequence[KeyframeMeta]) -> np.ndarray:
        """Describe ``images`` and add them with ``metas``; their keyframe ids."""
        return self.add_described(*self.describe(images), metas)

    def describe(self, images: Sequence[np.ndarray]) -> tuple[np.ndarray, list[tuple[np.ndarray, ...]]]:
        """``images``' descriptors with the map's describer, and the feature maps ``add_described`` needs."""
        if self.fitting:
            return self.describer.describe_with_maps(images)
        return self.describer.describe(images), [()] * len(images)

    def add_described(self, descriptors: np.ndarray, feature_maps: Sequence[tuple[np.ndarray, ...]],
                      metas: Sequence[KeyframeMeta]) -> np.ndarray:
        """Add keyframes already described by ``self.describer``; ``feature_maps`` (``describe_with_maps``) are
        needed while the map is ``fitting``, and ignored after."""
        ids = self.map.add(descriptors, metas)
        if self._held is not None:
            self._held += [tuple(x.astype(np.float16) for x in maps) for maps in feature_maps]
            if len(self._held) >= self.fit_keyframes:
                self._fit()
        if self.calibrate_while_adding and (self.map.calibration is None or len(self.map) >= 2 * self._calibrated_at):
            self._calibrate()
        return ids

    def finish(self) -> None:
        """Fit the vocabulary on the keyframes held, when there are enough, and calibrate the map's scores; call
        once all keyframes are in."""
        if self._held is not None and len(self._held) >= MIN_FIT_KEYFRAMES:
            self._fit()
        self._calibrate()

    def _calibrate(self) -> None:
        if self.map.calibrate() is not None:
            self._calibrated_at = len(self.map)
            LOG.info("%s: %s", self.map.source, self.map.calibration.summary())

    def _fit(self) -> None:
        held, self._held = self._held, None
        self.map.vocabulary_samples = None
        vocabulary = self.describer.fit_vocabulary([maps[0] for maps in held])
        adapted = self.describer.with_vocabulary(vocabulary)
        descriptors = adapted.aggregate([tuple(x.astype(np.float32) for x in maps) for maps in held])
        self.map.replace_descriptors(descriptors, adapted.fingerprint, vocabulary)
        self.describer = adapted
        LOG.info("%s: %s", self.map.source, vocabulary.describe())


def _batches(frames: Iterable[Frame], size: int) -> Iterator[list[Frame]]:
    batch: list[Frame] = []
    for frame in frames:
        batch.append(frame)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


# ----- build_map: a map from recordings ------------------------------------------------------------------


@dataclass(frozen=True)
class BuildSettings:
    """How ``build_map`` chooses and stores keyframes (its command line's options): a keyframe needs
    ``min_distance_m`` of travel and ``min_interval_s`` since the previous one (0: off) and, with
    ``max_similarity``, a descriptor scoring below it against the previous one's; ``thumbnails`` stores
    thumbnails; ``index`` is the FAISS index of a new map; ``fit_keyframes`` the keyframes a new map fits its
    vocabulary on."""

    min_distance_m: float = 2.0
    min_interval_s: float = 0.0
    max_similarity: float | None = None
    thumbnails: bool = False
    index: IndexConfig = field(default_factory=IndexConfig)
    fit_keyframes: int = BUILD_FIT_KEYFRAMES


@dataclass
class BuildResult:
    """What ``build_map`` did: frames read, keyframes added, the map as saved and its describer, in seconds."""

    frames_read: int
    keyframes_added: int
    keyframe_map: KeyframeMap
    describer: Describer
    seconds: float


def build_map(readers: Sequence[FrameReader], describer: Describer, out: str | Path, settings: BuildSettings, *,
              replace: bool = False, append: bool = False) -> BuildResult:
    """Build the map at ``out`` from the frames of ``readers`` (opened bags) with ``describer`` (the model as
    loaded by name or checkpoint), and save it. ``out`` must not exist, unless ``replace`` (a new map replaces
    it once complete) or ``append`` (its keyframes stay and more are added; it must exist). MapError when
    nothing was selected (nothing is written then)."""
    builder = _open_target(Path(out), describer, settings, replace, append)
    keyframe_map = builder.map
    keyframe_map.frame_id = _pose_frame_id(readers, keyframe_map)
    # Travel and time pick candidate keyframes while reading; the appearance test, which needs their
    # descriptors, then drops candidates too similar to the previous keyframe.
    motion = KeyframeSelector(min_interval_s=settings.min_interval_s, min_distance_m=settings.min_distance_m)
    appearance = KeyframeSelector(max_similarity=settings.max_similarity)
    counts = {"read": 0}
    started = time.perf_counter()
    frames = _frames_in_background(readers, describer.batch_size, motion, counts, _AlreadyMapped(keyframe_map))
    added = builder.add_frames(frames, appearance, thumbnails=settings.thumbnails)
    builder.finish()
    if added == 0:
        raise MapError(f"no keyframes were selected from {', '.join(str(r.path) for r in readers)}; "
                       f"nothing written to {out}")
    keyframe_map.save(out)
    return BuildResult(counts["read"], added, keyframe_map, builder.describer, time.perf_counter() - started)


def _open_target(out: Path, describer: Describer, settings: BuildSettings, replace: bool,
                 append: bool) -> KeyframeBuilder:
    if out.exists() and not (replace or append):
        raise MapError(f"{out} already exists: pass --force to replace it or --append to add to it")
    if replace:
        check_replaceable(out)  # before the work, not once the new map is built
    if append:
        if not out.exists():
            raise MapError(f"--append: {out} does not exist")
        keyframe_map = KeyframeMap.load(out, expected_fingerprint=describer.fingerprint,
                                        expected_model_name=describer.model_name)
        describer = describer_for_map(describer, keyframe_map)
    else:
        keyframe_map = KeyframeMap.for_describer(describer, settings.index)
    return KeyframeBuilder(describer, keyframe_map, settings.fit_keyframes)


def _pose_frame_id(readers: Sequence[FrameReader], keyframe_map: KeyframeMap) -> str:
    """The one frame of all the bags' poses (and of the map's, when appending)."""
    frame_ids = {reader.pose_frame_id for reader in readers if reader.pose_frame_id}
    if keyframe_map.frame_id and len(keyframe_map):
        frame_ids.add(keyframe_map.frame_id)
    if len(frame_ids) > 1:
        raise MapError(f"poses in different frames ({', '.join(sorted(frame_ids))}): a map holds poses of one "
                       "frame; build one map per frame")
    return frame_ids.pop() if frame_ids else keyframe_map.frame_id


class _AlreadyMapped:
    """Tells a frame that is a keyframe of the map already (``--append`` of a recording appended before): the
    same stamp and the same image, told by its local features (a keyframe stored without any: by its pose, the
    same or none). Two recordings may share stamps (simulation time starts at 0 in each), not images."""

    def __init__(self, keyframe_map: KeyframeMap) -> None:
        self.map = keyframe_map
        self._ids = {int(stamp): keyframe_id for keyframe_id, stamp in enumerate(keyframe_map.stamps)}

    def check(self, frame: Frame, path) -> None:
        keyframe_id = self._ids.get(int(frame.stamp_ns))
        if keyframe_id is None:
            return
        stored = self.map.local_features(keyframe_id)
        if stored is not None and len(stored):
            if not np.array_equal(stored.descriptors, extract_local_features(frame.image).descriptors):
                return
        else:
            position = self.map.positions[keyframe_id]
            if (frame.pose is None) != np.isnan(position).any() or (
                    frame.pose is not None and not np.allclose(frame.pose.position, position, rtol=0, atol=1e-6)):
                return
        raise MapError(f"{path}: its image stamped {frame.stamp_ns} is keyframe {keyframe_id} of the map already (from "
                       f"{self.map.bags[keyframe_id]}): this recording is in the map; nothing written")


def _frames_in_background(readers: Sequence[FrameReader], batch_size: int, motion: KeyframeSelector,
                          counts: dict, mapped: _AlreadyMapped) -> Iterator[Frame]:
    """Frames that pass the travel/time test, decoded in a thread so decoding overlaps inference; MapError on a
    frame that is in the map already (``mapped``)."""
    frames: queue.Queue = queue.Queue(maxsize=4 * batch_size)
    done = object()

    def read() -> None:
        try:
            with progress_bar(total=sum(len(r) for r in readers), unit="frame", desc="reading") as progress:
                for reader in readers:
                    for frame in reader:
                        progress.update()
                        counts["read"] += 1
                        position = frame.pose.position if frame.pose is not None else None
                        if motion.accept(frame.stamp_ns, position, None):
                            mapped.check(frame, reader.path)
                            frames.put(frame)
        except BaseException as exc:  # handed to the consumer, which re-raises it
            frames.put(exc)
        frames.put(done)

    threading.Thread(target=read, name="build_map_reader", daemon=True).start()
    while (item := frames.get()) is not done:
        if isinstance(item, BaseException):
            raise item
        yield item
