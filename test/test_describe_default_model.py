"""The default model: training-free VLAD, built offline from the package with its fingerprint; on rendered
routes of both worlds that nothing was fitted or tuned on, a map fitted on its own reference images ranks the
revisited places first."""

from __future__ import annotations

from pathlib import Path

import pytest

from tscm_ros.describe.describer import DEFAULT_MODEL, GENERIC_VOCABULARY, Describer, describer_for
from tscm_ros.detect.detection import MatchingConfig
from tscm_ros.detect.loop_detector import LoopDetector
from tscm_ros.evaluate.loop_evaluation import build_descriptor_map, reference_keyframes, run_queries
from tscm_ros.io.bag import FrameSource
from tscm_ros.sim.simulate import simulate_route

# Pinned: a changed default model (config/model_vlad_default.yaml, or the generic vocabulary refitted by
# tools/fit_generic_vocabulary.py) must be a deliberate change: maps built before it refuse the new one.
DEFAULT_FINGERPRINT = "e8802aa1975f4eca"
RADIUS_M = 5.0
# Worlds of their own (no benchmark site, other test, generic-vocabulary route or demo route uses seed 31).
ROUTE = dict(seed=31, frames=60, width=160, height=120, route_length_m=120.0, aliasing=0.2, progress=False)


@pytest.fixture(scope="module")
def default() -> Describer:
    return describer_for(DEFAULT_MODEL, device="cpu")


def test_the_default_is_the_training_free_vlad_with_the_generic_vocabulary(default: Describer):
    assert GENERIC_VOCABULARY.is_file() and GENERIC_VOCABULARY.stat().st_size <= 100 * 1024
    assert default.fingerprint == DEFAULT_FINGERPRINT
    assert default.model_name == "tscm_vlad_default" and default.dim == 3840
    assert default.vocabulary.source == "generic" and default.vocabulary.images >= 400
    assert default.adapts_to_map and default.calibration is None


@pytest.mark.parametrize("world, expected_recall", [("town", 0.85), ("garden", 0.9)])
def test_revisited_places_rank_first_with_the_maps_own_vocabulary(tmp_path, default, world, expected_recall):
    reference = simulate_route(tmp_path / "reference", traversal=0, condition="day", world=world, **ROUTE)
    revisit = simulate_route(tmp_path / "revisit", traversal=1, condition="auto", appearance_change=0.8,
                             world=world, **ROUTE)
    everything = MatchingConfig(k=5, min_score=0.0, exclude_recent_s=0.0)
    keyframe_map, describer = build_descriptor_map(default, reference_keyframes(FrameSource(reference), 2.0))
    assert keyframe_map.vocabulary.source == "map" and describer.fingerprint == keyframe_map.model_fingerprint
    result = run_queries("default", LoopDetector(describer, keyframe_map, everything), FrameSource(revisit),
                         RADIUS_M, (1, 5))
    print(f"{world}: R@1 {result.metrics.recall_at[1]:.3f}, R@5 {result.metrics.recall_at[5]:.3f}")
    assert result.metrics.recall_at[1] >= expected_recall


def test_the_generic_vocabulary_is_used_by_a_map_too_small_to_fit_its_own(tmp_path: Path, default):
    reference = simulate_route(tmp_path / "reference", traversal=0, condition="day", **{**ROUTE, "frames": 12})
    keyframe_map, describer = build_descriptor_map(default, reference_keyframes(FrameSource(reference), 2.0))
    assert len(keyframe_map) == 12 and keyframe_map.vocabulary.source == "generic"
    assert describer.fingerprint == keyframe_map.model_fingerprint == DEFAULT_FINGERPRINT
