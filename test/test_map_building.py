"""KeyframeBuilder: a new map fits its own vocabulary on its first keyframes (or keeps the generic one when too
small), every keyframe is described with it, and the map's describer reproduces the map after a save."""

from __future__ import annotations

import numpy as np
import pytest

from tscm_ros.describe.describer import DEFAULT_MODEL, PRETRAINED, Describer, describer_for
from tscm_ros.errors import ConfigError, MapError
from tscm_ros.io.bag import FrameSource
from tscm_ros.map.building import MIN_FIT_KEYFRAMES, KeyframeBuilder, describer_for_map
from tscm_ros.map.keyframe_map import KeyframeMap, KeyframeMeta


@pytest.fixture(scope="module")
def default() -> Describer:
    return describer_for(DEFAULT_MODEL, device="cpu", batch_size=8)


@pytest.fixture(scope="module")
def frames(route_reference):
    return list(FrameSource(route_reference).open())


def metas(frames) -> list[KeyframeMeta]:
    return [KeyframeMeta(stamp_ns=f.stamp_ns, pose=f.pose, bag=f.bag) for f in frames]


def build(describer, frames, fit_keyframes, chunk=7) -> KeyframeBuilder:
    """A new map of ``frames``, added ``chunk`` at a time."""
    builder = KeyframeBuilder(describer, KeyframeMap.for_describer(describer), fit_keyframes)
    for start in range(0, len(frames), chunk):
        part = frames[start:start + chunk]
        builder.add([f.image for f in part], metas(part))
    return builder


def stored_descriptors(keyframe_map: KeyframeMap) -> np.ndarray:
    return keyframe_map.contents().index.faiss_index.reconstruct_n(0, len(keyframe_map))


def test_a_new_map_fits_its_own_vocabulary_once_it_has_enough_keyframes(default, frames):
    builder = build(default, frames[:14], fit_keyframes=MIN_FIT_KEYFRAMES)
    assert builder.fitting and builder.map.vocabulary.source == "generic"
    builder.add([f.image for f in frames[14:21]], metas(frames[14:21]))  # the add that reaches 20 fits on all 21
    assert builder.map.vocabulary.source == "map" and builder.map.vocabulary.images == 21
    assert not builder.fitting
    adapted = builder.describer
    assert adapted.fingerprint == builder.map.model_fingerprint != default.fingerprint
    assert adapted.base_fingerprint == builder.map.base_fingerprint == default.fingerprint
    # Keyframes described before the fit were described again with the map's vocabulary.
    np.testing.assert_allclose(stored_descriptors(builder.map), adapted.describe([f.image for f in frames[:21]]),
                               atol=2e-3)
    assert not np.allclose(stored_descriptors(builder.map), default.describe([f.image for f in frames[:21]]),
                           atol=2e-3)


def test_a_map_too_small_to_fit_keeps_the_generic_vocabulary(default, frames):
    builder = build(default, frames[:MIN_FIT_KEYFRAMES - 1], fit_keyframes=1000)
    builder.finish()
    assert builder.map.vocabulary.source == "generic" and builder.describer is default
    assert builder.map.model_fingerprint == default.fingerprint
    builder = build(default, frames[:25], fit_keyframes=1000)
    assert builder.fitting
    builder.finish()
    assert builder.map.vocabulary.source == "map" and builder.map.vocabulary.images == 25


def test_the_maps_describer_reproduces_a_saved_map_and_appending_keeps_its_vocabulary(tmp_path, default, frames):
    built = build(default, frames[:24], fit_keyframes=1000)
    built.finish()
    built.map.save(tmp_path / "map")
    loaded = KeyframeMap.load(tmp_path / "map", expected_fingerprint=default.fingerprint)
    describer = describer_for_map(default, loaded)
    assert describer.fingerprint == built.describer.fingerprint
    query = frames[30].image
    np.testing.assert_allclose(describer.describe([query]), built.describer.describe([query]), atol=1e-6)
    appending = KeyframeBuilder(describer, loaded, fit_keyframes=MIN_FIT_KEYFRAMES)
    assert not appending.fitting
    appending.add([f.image for f in frames[24:]], metas(frames[24:]))
    assert appending.map.vocabulary.images == 24 and len(appending.map) == len(frames)


def test_a_model_without_vocabulary_builds_as_before_and_mismatches_are_refused(default, frames):
    baseline = describer_for(PRETRAINED, device="cpu")
    builder = build(baseline, frames[:MIN_FIT_KEYFRAMES], fit_keyframes=MIN_FIT_KEYFRAMES)
    assert builder.map.vocabulary is None and builder.describer is baseline
    with pytest.raises(MapError, match="has no vocabulary, but"):
        describer_for_map(default, builder.map)
    with pytest.raises(ConfigError, match="holds descriptors of model"):
        KeyframeBuilder(default, builder.map)
    with pytest.raises(ConfigError, match="at least"):
        KeyframeBuilder(default, KeyframeMap.for_describer(default), fit_keyframes=MIN_FIT_KEYFRAMES - 1)


def test_a_map_saved_before_it_fitted_fits_once_resumed(tmp_path, default, frames):
    """Mapping mode's autosave, then a restart: the resumed session still fits the map's own vocabulary, on
    the keyframes saved and the new ones, as an uninterrupted session would."""
    before = build(default, frames[:14], fit_keyframes=MIN_FIT_KEYFRAMES)
    assert before.fitting
    KeyframeMap.from_contents(before.map.snapshot(), "autosave").save(tmp_path / "map")
    loaded = KeyframeMap.load(tmp_path / "map", expected_fingerprint=default.fingerprint)
    assert len(loaded.vocabulary_samples) == 14
    resumed = KeyframeBuilder(describer_for_map(default, loaded), loaded, fit_keyframes=MIN_FIT_KEYFRAMES)
    assert resumed.fitting
    resumed.add([f.image for f in frames[14:21]], metas(frames[14:21]))
    assert resumed.map.vocabulary.source == "map" and resumed.map.vocabulary.images == 21
    assert resumed.map.vocabulary_samples is None
    uninterrupted = build(default, frames[:21], fit_keyframes=MIN_FIT_KEYFRAMES)
    np.testing.assert_allclose(stored_descriptors(resumed.map), stored_descriptors(uninterrupted.map), atol=2e-3)
    resumed.map.save(tmp_path / "fitted")
    assert not (tmp_path / "fitted" / "vocabulary_samples.npz").exists()
    assert KeyframeMap.load(tmp_path / "fitted").vocabulary_samples is None


def test_a_saved_sample_table_that_does_not_match_the_map_is_refused(tmp_path, default, frames):
    import json

    before = build(default, frames[:5], fit_keyframes=MIN_FIT_KEYFRAMES)
    before.map.save(tmp_path / "map")
    manifest = json.loads((tmp_path / "map" / "manifest.json").read_text())
    manifest["vocabulary_samples"]["keyframes"] = 4
    (tmp_path / "map" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(MapError, match="vocabulary_samples.npz does not hold one sample per keyframe"):
        KeyframeMap.load(tmp_path / "map")
