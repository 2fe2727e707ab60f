"""Adding keyframes to a map: the one path shared by build_map, the evaluation and the node's mapping mode.

``KeyframeBuilder`` describes keyframes with the map's describer and adds them. With a model that describes
through a VLAD vocabulary (the training-free default), a map started empty begins with the generic
vocabulary shipped in the package and fits its own on its first ``fit_keyframes`` keyframes: their
feature maps are kept (half precision, about 43 kB each for the default) until then, the vocabulary is
fitted on them, every keyframe so far is described again with it and the index is rebuilt. After that
the vocabulary stays. A map that ends with fewer than ``MIN_FIT_KEYFRAMES`` keyframes keeps the generic
vocabulary; ``finish()`` fits on what there is otherwise. Queries must then be described by
``builder.describer`` (the describer with the map's vocabulary).

The builder also keeps the map's score calibration (tscm_ros/map_calibration.py): ``finish()`` estimates
it; with ``calibrate_while_adding`` (mapping mode) it is estimated anew whenever the map has doubled since
the last estimate (from ``MIN_KEYFRAMES`` on) and after the vocabulary was fitted.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from tscm_ros.describe import Describer
from tscm_ros.errors import ConfigError, MapError
from tscm_ros.keyframe_map import KeyframeMap, KeyframeMeta

LOG = logging.getLogger(__name__)

MIN_FIT_KEYFRAMES = 20  # fewer keyframes than this: the generic vocabulary stays
BUILD_FIT_KEYFRAMES = 2000  # build_map fits on (at most) the first this many keyframes
MAPPING_FIT_KEYFRAMES = 100  # mapping mode fits once its map has this many keyframes


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
        fits = (describer.adapts_to_map and keyframe_map.vocabulary is not None
                and keyframe_map.vocabulary.source == "generic" and len(keyframe_map) == 0)
        self._held: list[tuple[np.ndarray, ...]] | None = [] if fits else None
        self.calibrate_while_adding = calibrate_while_adding
        self._calibrated_at = len(keyframe_map) if keyframe_map.calibration is not None else 0

    @property
    def fitting(self) -> bool:
        """Whether the map will still fit its own vocabulary (it holds the keyframes' feature maps till then)."""
        return self._held is not None

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
        vocabulary = self.describer.fit_vocabulary([maps[0] for maps in held])
        adapted = self.describer.with_vocabulary(vocabulary)
        descriptors = adapted.aggregate([tuple(x.astype(np.float32) for x in maps) for maps in held])
        self.map.replace_descriptors(descriptors, adapted.fingerprint, vocabulary)
        self.describer = adapted
        LOG.info("%s: %s", self.map.source, vocabulary.describe())
