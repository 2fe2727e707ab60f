"""The pose-graph back-end on a synthetic drifting loop: loops correct the drift, a false loop does not bend
the path, bad input is counted and skipped."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tscm_ros.errors import ConfigError
from tscm_ros.evaluate.trajectory import OdometryDrift, align_rigid, ate_rmse, close_loops, inject_false_loops
from tscm_ros.graph.pose_graph import PoseGraph, PoseGraphConfig, to_pose3
from tscm_ros.io.geometry import Pose

SIDE_M, PER_SIDE = 40.0, 40  # a 40 m square, a pose per metre


def _square_lap() -> list[Pose]:
    poses = []
    for side in range(4):
        heading = side * math.pi / 2
        start = np.array([(0, 0), (SIDE_M, 0), (SIDE_M, SIDE_M), (0, SIDE_M)][side], dtype=np.float64)
        for i in range(PER_SIDE):
            xy = start + i * (SIDE_M / PER_SIDE) * np.array([math.cos(heading), math.sin(heading)])
            poses.append(Pose(np.array([xy[0], xy[1], 0.0]),
                              np.array([0.0, 0.0, math.sin(heading / 2), math.cos(heading / 2)])))
    return poses


@pytest.fixture(scope="module")
def revisit():
    """The map: the first lap's poses as keyframes. The query run: two laps with drifting odometry, a loop to
    the right keyframe every 8th pose of the second lap."""
    lap = _square_lap()
    truth_poses = lap + lap
    keyframes = np.array([pose.position for pose in lap])
    stamps = np.arange(len(truth_poses), dtype=np.int64) * 500_000_000
    odometry = OdometryDrift(heading_bias_deg_per_m=0.3, seed=1).apply(truth_poses)
    loops = [np.zeros(0, np.int64)] * len(lap) + [np.array([i]) if i % 8 == 0 else np.zeros(0, np.int64)
                                                   for i in range(len(lap))]
    truth = np.array([pose.position for pose in truth_poses])
    return stamps, truth, odometry, loops, keyframes


def test_ate_after_rigid_alignment_ignores_where_the_trajectory_is_and_how_it_is_turned():
    rng = np.random.default_rng(0)
    truth = rng.normal(size=(50, 3)) * 10
    angle = 0.7
    rotation = np.array([[math.cos(angle), -math.sin(angle), 0], [math.sin(angle), math.cos(angle), 0], [0, 0, 1]])
    moved = truth @ rotation.T + np.array([5.0, -3.0, 2.0])
    np.testing.assert_allclose(align_rigid(moved, truth), truth, atol=1e-9)
    assert ate_rmse(moved, truth) < 1e-9
    assert ate_rmse(moved + np.array([[1.0, 0, 0]] * 25 + [[-1.0, 0, 0]] * 25), truth) == pytest.approx(1.0, rel=0.05)


def test_loops_correct_the_drift_of_a_second_lap(revisit):
    stamps, truth, odometry, loops, keyframes = revisit
    drifted = np.array([pose.position for pose in odometry])
    corrected, graph = close_loops(stamps, odometry, loops, keyframes)
    assert graph.loops == sum(len(ids) for ids in loops) == 20
    assert not graph.skipped
    before, after = ate_rmse(drifted, truth), ate_rmse(corrected, truth)
    assert before > 5.0  # the drift is real
    assert after < 0.3 * before


def test_a_single_false_loop_does_not_raise_the_error_beyond_odometry_alone(revisit):
    stamps, truth, odometry, _, keyframes = revisit
    drifted = np.array([pose.position for pose in odometry])
    only_false = [np.zeros(0, np.int64)] * len(stamps)
    only_false[-40] = np.array([5])  # the query is near the far corner, keyframe 5 near the start
    assert np.linalg.norm(truth[-40] - keyframes[5]) > 30
    corrected, graph = close_loops(stamps, odometry, only_false, keyframes)
    assert graph.loops == 0  # no other loop agrees with it: it never enters the graph
    assert ate_rmse(corrected, truth) <= ate_rmse(drifted, truth) + 1e-6


def test_repeated_matches_to_one_wrong_keyframe_do_not_support_each_other(revisit):
    stamps, truth, odometry, _, keyframes = revisit
    repeated = [np.zeros(0, np.int64)] * len(stamps)
    for i in range(-45, -35):  # ten images in a row, over 10 m, all matched to keyframe 5, 35 m away
        repeated[i] = np.array([5])
    _, graph = close_loops(stamps, odometry, repeated, keyframes)
    assert graph.loops == 0


def test_several_candidates_of_one_image_and_loops_long_past_are_handled(revisit):
    stamps, truth, odometry, loops, keyframes = revisit
    several = [np.array([i, i + 1]) if len(ids) else ids for i, ids in enumerate(loops)]
    several = [ids % len(keyframes) for ids in several]
    corrected, graph = close_loops(stamps, odometry, several, keyframes)  # loops leave the support window
    assert graph.skipped["loop without support"] == 0 and graph.loops > 0
    assert ate_rmse(corrected, truth) < 0.3 * ate_rmse(np.array([p.position for p in odometry]), truth)


def test_a_false_loop_beside_true_ones_does_not_raise_the_error(revisit):
    stamps, truth, odometry, loops, keyframes = revisit
    with_false = list(loops)
    with_false[-40] = np.array([5])  # instead of the true keyframe of that image
    corrected, graph = close_loops(stamps, odometry, with_false, keyframes)
    true_only, _ = close_loops(stamps, odometry, loops, keyframes)
    assert ate_rmse(corrected, truth) <= ate_rmse(true_only, truth) + 0.2


def test_five_percent_false_loops_among_true_ones_still_correct_the_drift(revisit):
    stamps, truth, odometry, loops, keyframes = revisit
    every = [np.array([i % len(keyframes)]) if i >= len(keyframes) and i % 2 == 0 else np.zeros(0, np.int64)
             for i in range(len(stamps))]
    false, moved = inject_false_loops(every, keyframes, 0.05, min_distance_m=20.0, seed=3)
    assert moved >= 2
    corrected, _ = close_loops(stamps, odometry, false, keyframes)
    drifted = np.array([pose.position for pose in odometry])
    assert ate_rmse(corrected, truth) < 0.4 * ate_rmse(drifted, truth)


def test_bad_input_is_counted_and_skipped_never_raised():
    graph = PoseGraph()
    identity = np.array([0.0, 0.0, 0.0, 1.0])
    assert graph.add_loop(5, [0.0, 0.0, 0.0]) == "pending"  # before any odometry: waits for it
    assert not graph.add_odometry(10, Pose(np.array([np.nan, 0.0, 0.0]), identity))
    assert not graph.add_odometry(10, Pose(np.zeros(3), np.zeros(4)))
    assert graph.add_odometry(10, Pose(np.zeros(3), identity))
    assert graph.skipped["before the first odometry"] == 1  # the pending loop, once the odometry came
    assert not graph.add_odometry(9, Pose(np.ones(3), identity))
    assert graph.add_loop(20, [np.inf, 0.0, 0.0]) == "non-finite keyframe position"
    assert graph.add_loop(20, [1.0, 0.0, 0.0]) == "pending"
    graph.add_odometry(30, Pose(np.array([2.0, 0.0, 0.0]), identity))
    assert graph.add_loop(30, [1.0, 0.0, 0.0]) == "waiting for support"  # too close to the first to support it
    assert graph.add_loop(30, [1.0, 0.0, 0.0]) == "the same loop again"
    assert not graph.add_odometry(40, Pose(np.array([5e3, 0.0, 0.0]), identity))
    graph.add_odometry(50, Pose(np.array([8.0, 0.0, 0.0]), identity))
    assert graph.add_loop(50, [8.0, 0.0, 0.0]) == "added"  # 7 m on, 7 m apart: agrees with both before it
    assert graph.loops == 3
    assert graph.skipped == {"before the first odometry": 1, "non-finite odometry": 2, "odometry out of order": 1,
                             "non-finite keyframe position": 1, "the same loop again": 1, "odometry jump": 1}
    assert np.isfinite(graph.corrected().position).all()


def test_map_to_odom_is_the_identity_until_a_loop_moves_the_path():
    graph = PoseGraph()
    identity = np.array([0.0, 0.0, 0.0, 1.0])
    for i in range(100):
        graph.add_odometry(i * 10**9, Pose(np.array([float(i), 0.0, 0.0]), identity))
    np.testing.assert_allclose(graph.map_to_odom().position, 0.0, atol=1e-6)
    assert graph.add_loop(90 * 10**9, [90.0, 2.0, 0.0]) == "waiting for support"
    graph.add_loop(99 * 10**9, [99.0, 2.0, 0.0])  # the map says the robot is 2 m to the left of its odometry
    assert graph.loops == 2
    corrected = graph.corrected().position
    assert corrected[1] > 0.5
    moved = to_pose3(graph.map_to_odom()).compose(to_pose3(Pose(np.array([99.0, 0.0, 0.0]), identity)))
    np.testing.assert_allclose(moved.translation(), corrected, atol=1e-6)
    stamps, poses = graph.path()
    assert len(stamps) == len(poses) == len(graph)


@pytest.mark.parametrize("field, value", [("loop_sigma_m", math.nan), ("node_spacing_m", math.inf),
                                          ("kernel_width", 0.0), ("kernel", "l2")])
def test_the_configuration_refuses_values_that_mean_nothing(field, value):
    with pytest.raises(ConfigError, match=field):
        PoseGraphConfig(**{field: value})
