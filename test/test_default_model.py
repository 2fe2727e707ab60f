"""The shipped default model: loaded offline from the package with its fingerprint, revisited places of a
rendered route it never saw ranked first, and its score calibration holding there (the precision of the
top-1 candidates the node publishes at its default min_score)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tscm_ros.bag import FrameSource
from tscm_ros.describe import DEFAULT_MODEL, DEFAULT_WEIGHTS, Describer, describer_for
from tscm_ros.loop_detector import DEFAULT_MIN_SCORE, LoopDetector, MatchingConfig
from tscm_ros.loop_evaluation import build_descriptor_map, run_queries
from tscm_ros.simulate import simulate_route

# Pinned: a changed default model must be a deliberate change (make pretrain, then update this).
DEFAULT_FINGERPRINT = "6932c4cfda71361a"
RADIUS_M = 5.0
# A world of its own (no pretraining world, benchmark site, test or demo route uses seed 31).
ROUTE = dict(seed=31, frames=60, width=160, height=120, route_length_m=120.0, aliasing=0.2, progress=False)


@pytest.fixture(scope="module")
def default() -> Describer:
    return describer_for(DEFAULT_MODEL, device="cpu")


@pytest.fixture(scope="module")
def held_out_route(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("held_out")
    reference = simulate_route(root / "reference", traversal=0, condition="day", **ROUTE)
    revisit = simulate_route(root / "revisit", traversal=1, condition="auto", appearance_change=0.8, **ROUTE)
    return reference, revisit


def test_the_default_is_the_shipped_pretrained_student(default: Describer):
    assert DEFAULT_WEIGHTS.is_file() and DEFAULT_WEIGHTS.stat().st_size <= 10 * 1024 * 1024
    assert default.fingerprint == DEFAULT_FINGERPRINT
    assert default.model_name == "tscm_student_offline" and default.dim == 512
    assert default.calibration is not None and default.calibration.queries > 100


def test_revisited_places_rank_first_and_published_candidates_are_true_loops(default: Describer, held_out_route):
    reference, revisit = held_out_route
    everything = MatchingConfig(k=5, min_score=0.0, exclude_recent_s=0.0)
    detector = LoopDetector(default, build_descriptor_map(default, FrameSource(reference), 2.0), everything)
    result = run_queries("default", detector, FrameSource(revisit), RADIUS_M, (1, 5))
    precision, recall = result.at_score(DEFAULT_MIN_SCORE)
    print(f"held-out route: R@1 {result.metrics.recall_at[1]:.3f}, R@5 {result.metrics.recall_at[5]:.3f}; "
          f"top-1 scoring >= {DEFAULT_MIN_SCORE}: precision {precision:.3f}, recall {recall:.3f}")
    assert result.metrics.recall_at[1] >= 0.8
    assert recall > 0.2  # the threshold lets loops through ...
    # ... and what it lets through is right. The 95 % goal is measured on bench/recognition.py's hundreds
    # of held-out queries; on this route's ~25 published candidates one error moves precision by 4 points
    # (measured: 24 of 26, 92.3 %). A raw-similarity threshold of 0.95 published unrelated places.
    assert precision >= 0.9
