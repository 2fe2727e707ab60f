"""evaluate: recall@N of one or more models side by side.

Modes (exactly one): ``--data DIR`` measures place recognition on a dataset split made by
extract_dataset (queries against the database); ``--bag DIR --query-bag DIR`` measures loop-closure
detection through the node's own code path (runs: tscm_ros.evaluate.loop_evaluation, metrics:
tscm_ros.evaluate.loop_metrics);
``--revisit-set DIR`` does the same on photographs without poses: a map of the set's reference images,
queried with its query images, judged by its ground-truth file (tscm_ros/io/revisit_set.py).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from tscm_ros.cli.common import (
    add_frame_reader_arguments,
    check_output_path,
    finite_number,
    frame_source_from_args,
    run_main,
)
from tscm_ros.describe.describer import DEFAULT_MODEL, PRETRAINED, describer_for
from tscm_ros.detect.detection import DEFAULT_MIN_SCORE
from tscm_ros.detect.verification import CameraIntrinsics
from tscm_ros.errors import BagError, ConfigError
from tscm_ros.evaluate.loop_evaluation import MethodRun, reference_keyframes, run_queries, run_revisit_set
from tscm_ros.evaluate.match_figure import write_matches_figure
from tscm_ros.evaluate.methods import BASELINES, STAGES, matches_run, method_specs, run_methods
from tscm_ros.evaluate.reporting import (
    loop_closure_table_markdown,
    pose_graph_table_markdown,
    recall_table_markdown,
    write_loop_closure_report,
    write_pose_graph_report,
    write_recall_report,
)
from tscm_ros.evaluate.trajectory import OdometryDrift, trajectory_figures
from tscm_ros.io.geometry import Pose
from tscm_ros.io.revisit_set import RevisitSet

DATA_RADIUS_M = 25.0  # --radius-m default with --data
BAG_RADIUS_M = 10.0  # --radius-m default with --bag

DESCRIPTION = """\
Measure recall@N (a query counts as found when one of its top-N database matches lies within
--radius-m of it) for each --model, side by side, and write recall.md (Markdown table),
recall.png (recall@N curves) and recall.json into --out. --model takes a checkpoint (teacher or
student best.pt), 'pretrained' for the baseline (ImageNet-pretrained CNN + GeM, no place-recognition
training) or 'default' for the default model (the training-free VLAD the node uses without --model).

With --bag REFERENCE --query-bag QUERY instead of --data: loop-closure evaluation. A map is built per
method from the reference traversal, every query frame runs through the node's code path, and
recall@N, the top-1 precision-recall curve, average precision, maximum recall at 100 % precision and
the per-query latency are written side by side (loop_closure.md/.json, pr_curve.png,
trajectories.png), with the built-in baselines (--baselines) next to the given models. matches.png shows
why loops were wrong: the highest-scored false top-1 matches of the first --model (else the default
model) and a sample of true ones, query image next to keyframe image, with score, descriptor distance
and metres apart.

With --revisit-set SET instead: the same on a folder of photographs without poses (SET/ref/ the map, in
order; SET/query/ the revisit; SET/gt.csv with columns query,matching_refs naming the references each query
should match). Every reference becomes a keyframe; a candidate is right when the ground truth lists it.
Without poses, temporal consistency follows the map's keyframe order.
"""

EXAMPLE = (
    "example:\n"
    "  evaluate --data data/campus --model runs/teacher/best.pt --model runs/student/best.pt --model pretrained "
    "--out eval/campus\n"
    "  evaluate --bag routes/t0 --query-bag routes/t1 --model student=runs/student/best.pt --out eval/loops\n"
    "  evaluate --revisit-set photos/campus --out eval/campus\n"
)


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface of evaluate."""
    parser = argparse.ArgumentParser(
        prog="evaluate", description=DESCRIPTION, epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--data", metavar="DIR", help="dataset directory made by extract_dataset")
    mode.add_argument("--bag", metavar="DIR",
                      help="reference traversal (rosbag2): loop-closure evaluation against a map of it; "
                      "queries from --query-bag")
    mode.add_argument("--revisit-set", metavar="DIR",
                      help="folder of photographs with ref/, query/ and gt.csv: loop-closure evaluation against a "
                      "map of its references")
    parser.add_argument("--model", action="append", metavar="CKPT",
                        help=f"model checkpoint (NAME=CKPT in bag mode), '{PRETRAINED}' (CNN + GeM baseline) "
                        f"or '{DEFAULT_MODEL}' (repeatable; at least one with --data)")
    parser.add_argument("--out", required=True, metavar="DIR", help="directory for recall.md, recall.png, recall.json")
    parser.add_argument("--split", choices=("train", "val", "test"), default="test",
                        help="dataset split (default test)")
    parser.add_argument("--radius-m", type=finite_number, default=None, metavar="M",
                        help="a retrieved frame is correct within M metres of the query "
                        "(default 25 with --data, 10 with --bag)")
    parser.add_argument("--ns", type=int, nargs="+", default=[1, 5, 10, 20], metavar="N",
                        help="recall@N values (default 1 5 10 20)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default auto)")
    parser.add_argument("--batch-size", type=int, default=16, help="images per forward pass (default 16)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    add_bag_arguments(parser)
    return parser


def add_bag_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options only bag mode has (the shared ones, --bag, --model, --radius-m, ..., are build_parser's)."""
    group = parser.add_argument_group("loop-closure evaluation on bags (--bag)")
    group.add_argument("--query-bag", metavar="DIR",
                       help="with --bag: the traversal whose frames are the queries (revisits the --bag route)")
    add_frame_reader_arguments(group)
    group.add_argument("--keyframe-distance", type=finite_number, default=2.0, metavar="M",
                       help="map keyframe every M metres of travel on the reference, as build_map (default 2.0)")
    group.add_argument("--baselines", default=",".join(BASELINES), metavar="LIST",
                       help="comma-separated built-in methods to include: gem (pretrained backbone + GeM), "
                       "default (the default model: the training-free VLAD with the map's own vocabulary), "
                       "bow (ORB bag of words); "
                       f"'none' for none (default {','.join(BASELINES)})")
    group.add_argument("--bow-words", type=int, default=1000, metavar="K",
                       help="ORB vocabulary size, trained on the reference keyframes (default 1000)")
    group.add_argument("--stages", choices=("all", "none"), default="all",
                       help="all: also run each descriptor method with geometric verification, and with verification "
                       "and temporal consistency (the node's defaults); none: global retrieval only (default all)")
    group.add_argument("--no-odometry", action="store_true",
                       help="the detector gets no query poses, as a node without pose_topic (they still give the "
                       "ground truth): temporal consistency and exclusion then work without odometry")
    group.add_argument("--pose-graph", action="store_true",
                       help="also close each method's published loops (score >= the node's default min_score) in the "
                       "pose-graph back-end, on the query run's odometry drifted by --drift, and write the trajectory "
                       "errors (ATE RMSE after rigid alignment) to pose_graph.md/.json/.png")
    group.add_argument("--drift", metavar="BIAS,NOISE,POS", default="0.3,0.1,0.02",
                       type=lambda text: [finite_number(v) for v in text.split(",")],
                       help="with --pose-graph: the drift added to the query poses as odometry: heading bias in "
                       "degrees per metre, heading noise in degrees per square-root metre, position noise as a "
                       "fraction of each step (default 0.3,0.1,0.02; 0,0,0 for a recording whose odometry "
                       "already drifts)")
    group.add_argument("--drift-seed", type=int, default=0, metavar="N", help="seed of --drift (default 0)")
    group.add_argument("--false-loops", type=finite_number, default=0.05, metavar="SHARE",
                       help="with --pose-graph: the share of published loops moved to a random keyframe at least "
                       "2 x --radius-m away, for the robustness column (default 0.05)")
    group.add_argument("--intrinsics", metavar="FX,FY,CX,CY", type=lambda text: text.split(","),
                       help="camera intrinsics in pixels: verification fits the essential matrix (and the relative "
                       "pose) instead of the fundamental matrix")


# ----- --data: recall@N on a dataset split ----------------------------------------------------------


def _run_data(args: argparse.Namespace) -> tuple[list, str]:
    from tscm_ros.evaluate.recall import evaluate_split
    from tscm_ros.io.dataset import load_dataset, require_split

    dataset = load_dataset(args.data)
    database, queries = require_split(dataset, args.split)
    describers = [(model, describer_for(model, device=args.device, batch_size=args.batch_size))
                  for model in args.model]
    results = [
        (f"{model} ({describer.model_name})", evaluate_split(dataset, args.split, describer, args.radius_m, args.ns))
        for model, describer in describers
    ]
    title = (
        f"{Path(args.data).name}, {args.split} split: {len(queries)} queries against {len(database)} database frames, "
        f"correct within {args.radius_m:g} m"
    )
    return results, title


# ----- --bag: loop-closure evaluation -------------------------------------------------------------


def _check_common(args: argparse.Namespace) -> tuple[list[int], Path]:
    ns = sorted({int(n) for n in args.ns})
    if not ns or ns[0] < 1 or args.batch_size < 1:
        raise ConfigError("--ns and --batch-size must be positive")
    if args.keyframe_distance < 0 or args.bow_words < 2:
        raise ConfigError("--keyframe-distance must be >= 0 and --bow-words >= 2")
    out = check_output_path(args.out)
    if out.exists() and not args.overwrite:
        raise ConfigError(f"output {out} already exists (choose another path or pass --overwrite)")
    return ns, out


def _stages(args: argparse.Namespace) -> list:
    return STAGES if args.stages == "all" else STAGES[:1]


def _report(runs: list[MethodRun], title: str, out: Path, radius_m: float, overwrite: bool, settings: dict,
            extra: Callable[[Path], None] | None = None) -> None:
    write_loop_closure_report(runs, title, out, radius_m, overwrite, settings, extra)
    print(loop_closure_table_markdown(runs, title), end="")
    plots = ", ".join(str(out / name) for name in ("pr_curve.png", "trajectories.png", "matches.png")
                      if (out / name).exists())
    print(f"wrote {out / 'loop_closure.md'}, {plots} (per-query CSVs and loop_closure.json alongside)")


def run_bag_evaluation(args: argparse.Namespace) -> int:
    """``evaluate --bag``: every method on the same traversals; writes the report and prints the table."""
    radius_m = BAG_RADIUS_M if args.radius_m is None else float(args.radius_m)
    if not args.query_bag:
        raise ConfigError("--bag needs --query-bag: the traversal to query against the --bag map")
    if radius_m <= 0:
        raise ConfigError("--radius-m must be positive")
    ns, out = _check_common(args)
    for path in (args.bag, args.query_bag):
        if not Path(path).exists():
            raise BagError(f"bag {path} does not exist")
    intrinsics = CameraIntrinsics.from_values(args.intrinsics or [])
    reference = frame_source_from_args(args, args.bag)
    queries = frame_source_from_args(args, args.query_bag)
    for role, source in (("reference", reference), ("query", queries)):
        if source.open().pose_topic is None:  # opening reads the bag's topics and pose stream, not its images
            raise BagError(f"{role} bag {source.bag} has no pose topic: loops are judged by where the query and the "
                           "map's keyframes are (give --pose-topic, or record odometry)")
    specs = method_specs(args.baselines, args.model or [])
    runs = run_methods(specs, lambda: reference_keyframes(reference, args.keyframe_distance), _stages(args),
                       lambda name, detector: run_queries(name, detector, queries, radius_m, ns,
                                                          odometry=not args.no_odometry),
                       ns, reference.bag, intrinsics, args.device, args.batch_size, args.bow_words)
    if not np.isfinite(runs[0].map_positions).any():
        raise BagError(f"reference bag {args.bag}: none of its keyframes has a pose: nothing to judge loops by "
                       "(check that the pose stream covers the images)")
    first = runs[0].metrics
    title = (f"Loop closure: {first.num_queries} queries from {Path(args.query_bag).name} "
             f"({first.num_with_loop} with a true loop) against {Path(args.bag).name}, "
             f"keyframes every {args.keyframe_distance:g} m, correct within {radius_m:g} m"
             + (", queries without odometry" if args.no_odometry else ""))
    settings = {"reference_bag": str(args.bag), "query_bag": str(args.query_bag), "radius_m": radius_m,
                "ns": ns, "keyframe_distance_m": args.keyframe_distance, "bow_words": args.bow_words,
                "stages": args.stages, "intrinsics": None if intrinsics is None else list(vars(intrinsics).values()),
                "odometry": not args.no_odometry, "device": args.device}
    shown = matches_run(runs, specs)
    settings["matches_png"] = shown.name
    pose_graph = _pose_graph(args, runs, radius_m) if args.pose_graph else None

    def matches(directory: Path) -> None:
        write_matches_figure(shown, queries, reference, directory / "matches.png", radius_m)
        if pose_graph is not None:
            write_pose_graph_report(directory, *pose_graph)

    _report(runs, title, out, radius_m, args.overwrite, settings, matches)
    if pose_graph is not None:
        print(pose_graph_table_markdown(pose_graph[0], pose_graph[4]), end="")
        print(f"wrote {out / 'pose_graph.md'}, {out / 'pose_graph.png'}")
    return 0


def _pose_graph(args: argparse.Namespace, runs: list[MethodRun], radius_m: float) -> tuple:
    """Each run's loops at the node's default min_score closed in the back-end on drifted odometry: the arguments
    of ``write_pose_graph_report``."""
    if len(args.drift) != 3:
        raise ConfigError(f"--drift: expected BIAS,NOISE,POS (3 numbers), got {len(args.drift)}")
    if not 0.0 <= args.false_loops <= 1.0:
        raise ConfigError(f"--false-loops must be a share in [0, 1], got {args.false_loops}")
    drift = OdometryDrift(*args.drift, seed=args.drift_seed)
    first = runs[0]
    truth_poses = [Pose(p, q) for p, q in zip(first.query_positions, first.query_orientations)]
    odometry = drift.apply(truth_poses)
    figures = []
    for run in runs:
        loops = [ids[scores >= DEFAULT_MIN_SCORE] for ids, scores in zip(run.ranked_ids, run.ranked_scores)]
        figures.append(trajectory_figures(run.name, run.query_stamps, run.query_positions, odometry, loops,
                                          run.map_positions, args.false_loops, 2 * radius_m,
                                          seed=args.drift_seed))
    title = (f"Drift corrected: the query run's odometry drifted by {args.drift[0]:g} deg/m heading bias, "
             f"{args.drift[1]:g} deg/sqrt(m) heading noise, {100 * args.drift[2]:g} % position noise (seed "
             f"{args.drift_seed}), closed with each method's loops at min_score {DEFAULT_MIN_SCORE:g}; false loops: "
             f"{100 * args.false_loops:g} % of them moved >= {2 * radius_m:g} m")
    settings = {"drift": args.drift, "drift_seed": args.drift_seed, "false_loops": args.false_loops,
                "min_score": DEFAULT_MIN_SCORE}
    drifted = np.array([pose.position for pose in odometry]).reshape(-1, 3)
    return figures, first.query_positions, drifted, first.map_positions, title, settings


def run_revisit_evaluation(args: argparse.Namespace) -> int:
    """``evaluate --revisit-set``: every method on a set of photographs; writes the report, prints the table."""
    ns, out = _check_common(args)
    revisit_set = RevisitSet.load(args.revisit_set)
    runs = run_methods(method_specs(args.baselines, args.model or []), revisit_set.reference_frames, _stages(args),
                       lambda name, detector: run_revisit_set(name, detector, revisit_set, ns), ns,
                       revisit_set.name, None, args.device, args.batch_size, args.bow_words)
    first = runs[0].metrics
    title = (f"Loop closure: {first.num_queries} queries of {revisit_set.name} ({first.num_with_loop} with a "
             f"true loop) against its {len(revisit_set.references)} references, correct as its ground truth says")
    settings = {"revisit_set": str(args.revisit_set), "ns": ns, "bow_words": args.bow_words, "stages": args.stages,
                "device": args.device}
    _report(runs, title, out, math.nan, args.overwrite, settings)
    return 0


# ----- the command ---------------------------------------------------------------------------------


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    if args.pose_graph and not args.bag:
        raise ConfigError("--pose-graph goes with --bag and --query-bag: it needs the query run's poses")
    if args.query_bag and not args.bag:
        raise ConfigError(f"--query-bag goes with --bag (loop closures on a reference and a query traversal), not "
                          f"with {'--data' if args.data else '--revisit-set'}")
    if args.bag:
        return run_bag_evaluation(args)
    if args.revisit_set:
        return run_revisit_evaluation(args)
    if not args.model:
        raise ConfigError("--data needs at least one --model (a checkpoint, 'pretrained' or 'default')")
    if args.radius_m is None:
        args.radius_m = DATA_RADIUS_M
    if args.radius_m <= 0 or any(n < 1 for n in args.ns) or args.batch_size < 1:
        raise ConfigError("--radius-m, --ns and --batch-size must be positive")
    args.ns = sorted(set(args.ns))
    out = check_output_path(args.out)
    if out.exists() and not args.overwrite:
        raise ConfigError(f"output {out} already exists (choose another path or pass --overwrite)")
    results, title = _run_data(args)
    write_recall_report(results, title, out, args.overwrite)
    print(recall_table_markdown(results, title), end="")
    print(f"wrote {out / 'recall.md'}, {out / 'recall.png'}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: evaluate models; exit code 2 with ``error: ...`` on bad input."""
    return run_main(_main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
