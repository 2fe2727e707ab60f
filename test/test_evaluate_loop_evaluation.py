"""Loop-closure metrics on a hand-made case with a known answer, and the bag-mode evaluation end to end."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from tscm_ros.evaluate.loop_metrics import (
    evaluate_loop_closures,
    max_recall_at_full_precision,
    precision_recall_curve,
    within_radius,
)

# Four keyframes 20 m apart on a line; correct = within 10 m.
KEYFRAMES = np.array([[0, 0, 0], [20, 0, 0], [40, 0, 0], [60, 0, 0]], dtype=float)
# Six queries (position, ranked candidate ids, their scores):
QUERIES = [
    ((1, 0, 0), [0, 1], [0.9, 0.3]),           # q0: loop at k0, top-1 correct
    ((21, 0, 0), [2, 1], [0.8, 0.7]),          # q1: loop at k1, top-1 wrong (k2), k1 second
    ((41, 0, 0), [2], [0.8]),                  # q2: loop at k2, top-1 correct, score tied with q1
    ((200, 0, 0), [3], [0.6]),                 # q3: no keyframe within 10 m: its top-1 is a false positive
    ((59, 0, 0), [], []),                      # q4: loop at k3, but no candidate at all
    ((0, 1, 0), [3, 2, 1, 0], [0.5, 0.4, 0.3, 0.2]),  # q5: loop at k0, found only at rank 4
]


def hand_made_metrics(ns=(1, 2, 5)):
    positions = np.array([q[0] for q in QUERIES], dtype=float)
    within = within_radius(positions, KEYFRAMES, 10.0)
    ids = [np.array(q[1], dtype=np.int64) for q in QUERIES]
    scores = [np.array(q[2], dtype=np.float64) for q in QUERIES]
    return evaluate_loop_closures(ids, scores, within, ns)


def test_recall_at_n_counts_only_queries_with_a_true_loop():
    metrics = hand_made_metrics()
    assert metrics.num_queries == 6
    assert metrics.num_with_loop == 5  # q3 has no keyframe within 10 m
    assert metrics.num_without_candidates == 1  # q4
    # R@1: q0, q2. R@2: + q1. R@5: + q5. q4 (no candidate) is a miss at every N.
    assert metrics.recall_at == pytest.approx({1: 2 / 5, 2: 3 / 5, 5: 4 / 5})


def test_precision_recall_curve_accepts_ties_together():
    curve = hand_made_metrics().curve
    # Thresholds are the distinct top-1 scores; at 0.8 q1 (wrong) and q2 (right) enter together.
    np.testing.assert_allclose(curve.thresholds, [0.9, 0.8, 0.6, 0.5])
    np.testing.assert_allclose(curve.precision, [1.0, 2 / 3, 2 / 4, 2 / 5])
    np.testing.assert_allclose(curve.recall, [1 / 5, 2 / 5, 2 / 5, 2 / 5])


def test_average_precision_and_max_recall_at_full_precision():
    metrics = hand_made_metrics()
    assert metrics.average_precision == pytest.approx(1 / 5 * 1.0 + 1 / 5 * 2 / 3)
    # Only the 0.9 threshold is perfect; q2 ties with the wrong q1, so it cannot be accepted alone.
    assert metrics.max_recall_at_full_precision == pytest.approx(1 / 5)
    assert metrics.full_precision_threshold == pytest.approx(0.9)


def test_average_precision_agrees_with_scikit_learn_rescaled_to_all_true_loops():
    metrics = hand_made_metrics()
    answered = [q for q in QUERIES if q[1]]
    top1_correct = [1, 0, 1, 0, 0]  # q0, q1, q2, q3, q5
    sklearn_ap = average_precision_score(top1_correct, [q[2][0] for q in answered])
    # scikit-learn's recall is relative to the correct top-1s (2); ours to the queries with a true loop (5).
    assert metrics.average_precision == pytest.approx(sklearn_ap * 2 / 5)


def test_a_wrong_best_scored_query_means_no_recall_at_full_precision():
    curve = precision_recall_curve(np.array([0.9, 0.7]), np.array([False, True]), np.array([True, True]))
    assert max_recall_at_full_precision(curve)[0] == 0.0
    assert math.isnan(max_recall_at_full_precision(curve)[1])


def test_a_perfect_detector_reaches_full_recall_at_full_precision():
    within = within_radius(KEYFRAMES + 1.0, KEYFRAMES, 10.0)
    ids = [np.array([i]) for i in range(4)]
    metrics = evaluate_loop_closures(ids, [np.array([0.5 + 0.1 * i]) for i in range(4)], within, (1,))
    assert metrics.recall_at == {1: 1.0}
    assert metrics.average_precision == pytest.approx(1.0)
    assert metrics.max_recall_at_full_precision == 1.0
    assert metrics.full_precision_threshold == pytest.approx(0.5)


def test_no_true_loop_anywhere_gives_undefined_recall():
    within = within_radius(np.array([[500.0, 0, 0]]), KEYFRAMES, 10.0)
    metrics = evaluate_loop_closures([np.array([0])], [np.array([0.7])], within, (1,))
    assert metrics.num_with_loop == 0
    assert math.isnan(metrics.recall_at[1]) and math.isnan(metrics.average_precision)
    assert math.isnan(metrics.max_recall_at_full_precision)


def test_keyframes_without_pose_are_never_correct():
    within = within_radius(np.zeros((1, 3)), np.array([[np.nan] * 3, [3.0, 4.0, 0.0]]), 5.0)
    assert within.tolist() == [[False, True]]


def test_ground_truth_from_the_k_d_tree_equals_brute_force():
    rng = np.random.default_rng(0)
    keyframes = rng.uniform(0, 100, (500, 3))
    keyframes[::37] = np.nan  # keyframes without pose
    queries = rng.uniform(0, 100, (300, 3))
    queries[5] = np.nan
    with np.errstate(invalid="ignore"):
        expected = np.linalg.norm(queries[:, None, :] - keyframes[None, :, :], axis=2) <= 10.0
    within = within_radius(queries, keyframes, 10.0)
    assert within.dtype == bool and (within == expected).all() and within.sum() > 300
    from tscm_ros.evaluate.recall import describe_streamed, ground_truth_within

    matches = ground_truth_within(queries, keyframes, 10.0)
    assert all((m == np.flatnonzero(row)).all() for m, row in zip(matches, expected))

    class Frames:  # 10 images, decoded on demand
        def __len__(self):
            return 10

        def load_images(self, indices):
            return [np.full((2, 2, 3), i, dtype=np.uint8) for i in indices]

    class Describer:
        dim, largest = 1, 0

        def describe(self, images):
            self.largest = max(self.largest, len(images))
            return np.array([[float(image[0, 0, 0])] for image in images], dtype=np.float32)

    describer = Describer()
    assert describe_streamed(Frames(), describer, chunk=4).ravel().tolist() == list(range(10))
    assert describer.largest == 4  # never more than a chunk of images in memory


def test_inconsistent_inputs_are_rejected():
    with pytest.raises(ValueError):
        evaluate_loop_closures([np.array([0])], [], np.ones((1, 4), dtype=bool))
    with pytest.raises(ValueError):
        precision_recall_curve(np.array([0.5]), np.array([True]), np.array([False]))


# ----- bag mode end to end, on the rendered routes of test/conftest.py ----------------------------


@pytest.fixture(scope="module")
def tiny_student(tmp_path_factory):
    """A real checkpoint of the tiny student (random tiny CNN: fast, and untrained)."""
    import torch

    from tscm_ros.describe.checkpoint import load_model_config, save_checkpoint
    from tscm_ros.describe.models import build_model

    torch.manual_seed(0)
    config, preprocess = load_model_config("tiny", "student")
    path = tmp_path_factory.mktemp("tiny") / "student.pt"
    save_checkpoint(path, build_model(config), config, preprocess)
    return path


def bag_args(reference, query, out, *extra):
    from tscm_ros.cli.evaluate import build_parser

    return build_parser().parse_args(["--bag", str(reference), "--query-bag", str(query), "--out", str(out),
                                          "--device", "cpu", *extra])


def test_bag_evaluation_reports_every_method_on_the_same_queries(route_reference, route_query, tiny_student,
                                                                 tmp_path, capsys):
    import json

    from tscm_ros.cli import build_map
    from tscm_ros.cli.evaluate import run_bag_evaluation
    from tscm_ros.io.bag import FrameSource
    from tscm_ros.map.keyframe_map import KeyframeMap

    out = tmp_path / "evaluation"
    args = bag_args(route_reference, route_query, out, "--model", f"tiny={tiny_student}", "--baselines", "bow",
                    "--bow-words", "200", "--ns", "1", "5")
    assert run_bag_evaluation(args) == 0
    printed = capsys.readouterr().out
    assert "| tiny | tscm_student_tiny |" in printed and "| ORB bag of words |" in printed

    for name in ("loop_closure.md", "pr_curve.png", "trajectories.png", "queries_tiny.csv",
                 "queries_orb_bag_of_words.csv", "matches.png"):
        assert (out / name).stat().st_size > 0, name
    summary = json.loads((out / "loop_closure.json").read_text())
    assert summary["settings"]["matches_png"] == "tiny"  # the given model's matches, not the baseline's
    # each descriptor method also with each verification stage the node runs (evaluate --stages all)
    assert [m["name"] for m in summary["methods"]] == ["tiny", "tiny + temporal", "tiny + verification",
                                                       "tiny + verification + temporal", "ORB bag of words"]

    query_positions = [frame.pose.position for frame in FrameSource(str(route_query)).open() if frame.pose is not None]
    posed_queries = len(query_positions)
    # The evaluation's map holds the keyframes build_map (what the node loads) selects from the same bag.
    build_map.main(["--bag", str(route_reference), "--out", str(tmp_path / "map"), "--model", str(tiny_student),
                    "--device", "cpu"])
    node_map = KeyframeMap.load(tmp_path / "map")
    for method in summary["methods"]:
        assert method["queries"] == posed_queries > 0
        assert method["keyframes"] == len(node_map)
        assert 0.0 <= method["recall_at"]["1"] <= method["recall_at"]["5"] <= 1.0
        assert method["max_recall_at_full_precision"] <= method["recall_at"]["1"]
        assert method["latency_ms"]["median"] > 0
    tiny = summary["methods"][0]
    assert tiny["fingerprint"] == node_map.model_fingerprint
    # The simulated revisit looks like the reference: the classical baseline must beat chance clearly
    # (chance R@1: the average share of map keyframes within the radius of a query).
    chance = within_radius(np.array(query_positions), node_map.positions, 10.0).mean()
    assert summary["methods"][-1]["recall_at"]["1"] > 3 * chance


def test_bag_evaluation_rejects_bad_requests(route_reference, route_query, tmp_path):
    from tscm_ros.cli.evaluate import run_bag_evaluation
    from tscm_ros.errors import BagError, ConfigError

    (tmp_path / "taken").mkdir()
    with pytest.raises(ConfigError, match="already exists"):
        run_bag_evaluation(bag_args(route_reference, route_query, tmp_path / "taken"))
    with pytest.raises(ConfigError, match="--baselines: unknown"):
        run_bag_evaluation(bag_args(route_reference, route_query, tmp_path / "out", "--baselines", "gem,sift"))
    with pytest.raises(BagError, match="does not exist"):
        run_bag_evaluation(bag_args(route_reference, tmp_path / "missing", tmp_path / "out"))
    args = bag_args(route_reference, route_query, tmp_path / "out")
    args.query_bag = None
    with pytest.raises(ConfigError, match="--query-bag"):
        run_bag_evaluation(args)
    assert not (tmp_path / "out").exists()


def test_matches_png_shows_the_highest_scored_false_matches_then_true_ones(route_reference, route_query, tmp_path):
    """Query image next to keyframe image, read back from the bags: the false loops a threshold lets through
    first, and a sample of true ones."""
    import matplotlib.image

    from tscm_ros.evaluate.loop_evaluation import MethodRun
    from tscm_ros.evaluate.loop_metrics import LoopMetrics, PRCurve
    from tscm_ros.evaluate.match_figure import chosen_queries, write_matches_figure
    from tscm_ros.io.bag import FrameSource

    queries, keyframes = list(FrameSource(route_query).open())[:8], list(FrameSource(route_reference).open())[:8]
    # query q's top-1 is keyframe q (right) for even q, keyframe 7 - q (wrong) for odd q; query 6 has none
    top = [q if q % 2 == 0 else 7 - q for q in range(8)]
    within = np.eye(8, dtype=bool)
    scores = [0.9, 0.5, 0.8, 0.95, 0.7, 0.6, 0.0, 0.99]
    run = MethodRun(
        name="synthetic", model_name="m", fingerprint="f", dim=4,
        map_positions=np.array([k.pose.position for k in keyframes]),
        query_stamps=np.array([f.stamp_ns for f in queries]),
        query_positions=np.array([f.pose.position for f in queries]),
        query_orientations=np.array([f.pose.orientation for f in queries]),
        ranked_ids=[np.array([] if q == 6 else [top[q]]) for q in range(8)],
        ranked_scores=[np.array([] if q == 6 else [scores[q]]) for q in range(8)], latencies_ms=np.ones(8),
        metrics=LoopMetrics({}, PRCurve(np.zeros(0), np.zeros(0), np.zeros(0)), 0, 0, 0, 8, 8, 1),
        top1_distance=2 * (1 - np.array(scores)), top1_stamp_ns=np.array([keyframes[t].stamp_ns for t in top]),
        within=within)
    # wrong: 1, 3, 5, 7 by score 0.99 (7), 0.95 (3), 0.6 (5), 0.5 (1); right: 0, 2, 4 spread over the traversal
    assert chosen_queries(run, worst_false=3, true_sample=2) == [(7, False), (3, False), (5, False), (0, True),
                                                                (4, True)]
    reader = FrameSource(route_query).open()
    images = reader.images_at([queries[7].stamp_ns, queries[3].stamp_ns, 123])
    assert sorted(images) == sorted([queries[7].stamp_ns, queries[3].stamp_ns])  # only those, none made up
    np.testing.assert_array_equal(images[queries[3].stamp_ns], queries[3].image)

    path = tmp_path / "matches.png"
    assert write_matches_figure(run, FrameSource(route_query), FrameSource(route_reference), path, 10.0)
    picture = matplotlib.image.imread(path)
    assert picture.shape[0] > picture.shape[1]  # seven rows of two images


def test_a_reference_bag_without_poses_and_query_bag_beside_data_are_refused(tmp_path, capsys):
    from bag_support import write_drive

    from tscm_ros.cli import evaluate

    posed = write_drive(tmp_path / "posed", images=4)
    no_topic = write_drive(tmp_path / "no_topic", images=4, odometry_topic=None)
    elsewhere = write_drive(tmp_path / "elsewhere", images=4, odometry_offset_ns=3600 * 10**9)  # an hour off
    out = tmp_path / "out"
    common = ["--out", str(out), "--device", "cpu", "--baselines", "bow", "--bow-words", "2", "--stages", "none"]
    assert evaluate.main(["--bag", str(no_topic), "--query-bag", str(posed), *common]) == 2
    assert capsys.readouterr().err == (f"error: reference bag {no_topic} has no pose topic: loops are judged by "
                                       "where the query and the map's keyframes are (give --pose-topic, or record "
                                       "odometry)\n")
    assert evaluate.main(["--bag", str(posed), "--query-bag", str(no_topic), *common]) == 2
    assert f"error: query bag {no_topic} has no pose topic" in capsys.readouterr().err
    assert evaluate.main(["--bag", str(elsewhere), "--query-bag", str(posed), *common]) == 2
    assert capsys.readouterr().err.endswith(f"error: reference bag {elsewhere}: none of its keyframes has a pose: "
                                            "nothing to judge loops by (check that the pose stream covers the "
                                            "images)\n")
    assert not out.exists()
    # --query-bag belongs to --bag: beside --data (or --revisit-set) it is refused, not ignored
    assert evaluate.main(["--data", str(tmp_path / "data"), "--query-bag", str(posed), "--model", "pretrained",
                          "--out", str(out)]) == 2
    assert capsys.readouterr().err == ("error: --query-bag goes with --bag (loop closures on a reference and a query "
                                       "traversal), not with --data\n")
