"""Shared fixtures: small rendered routes (real rosbag2 files), made once per test session, and a map of the
reference route with its frames, made once per test module (node tests may change the map)."""

from __future__ import annotations

import pytest

from tscm_ros.cli import build_map
from tscm_ros.io.bag import FrameSource
from tscm_ros.sim.simulate import simulate_route

ROUTE = dict(seed=0, frames=40, width=160, height=120, route_length_m=300.0, progress=False)


@pytest.fixture(scope="session")
def route_reference(tmp_path_factory):
    """Traversal 0 of the test town: 40 frames, 160x120, one 300 m lap, sqlite3."""
    return simulate_route(tmp_path_factory.mktemp("routes") / "reference", traversal=0, **ROUTE)


@pytest.fixture(scope="session")
def route_query(tmp_path_factory):
    """Traversal 1 of the same town: the same places under changed appearance."""
    return simulate_route(tmp_path_factory.mktemp("routes") / "query", traversal=1, **ROUTE)


@pytest.fixture(scope="module")
def reference_map(route_reference, tmp_path_factory):
    """A map of the reference route built by build_map, one keyframe per frame."""
    out = tmp_path_factory.mktemp("reference_map") / "map"
    assert build_map.main(["--bag", str(route_reference), "--out", str(out), "--min-distance", "0"]) == 0
    return out


@pytest.fixture(scope="module")
def reference_frames(route_reference):
    return list(FrameSource(route_reference).open())
