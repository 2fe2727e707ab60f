"""Benchmark: the pose-graph back-end (tscm_ros/graph/pose_graph.py), its speed and what it tolerates.

Speed: a route of --nodes pose nodes (one per metre) driven at 1 m/s with odometry at 10 Hz, a rectangle
driven twice; on the second lap a loop every 2 m for 20 m in every 50 m (runs of consecutive loops, as the
place recognition node publishes them). Every odometry message and every loop goes through the back-end as
pose_graph_node feeds it; reported: the time per odometry message (median, p95, max; a loop is charged to
the odometry message it arrives with) with loops, and the same route without loops in the same run (the
ratio against it), and the peak RSS growth. Goal on a 2-core CPU: p95 <= 20 ms at 10k poses.

Robustness: a 40 m square driven three times with seeded drifting odometry (heading bias per metre), true
loops every 4th pose of laps 2 and 3, then a share of them moved to a random keyframe >= 20 m away. Reported
per kernel, drift and share of false loops: ATE with loops / ATE of the odometry alone (worst of 3 seeds).

Rendered worlds (``--worlds``): ``evaluate --bag REF --query-bag QUERY --pose-graph`` on the demo's season
revisit and on the recognition benchmark's held-out traversals (box towns 11 and 12, the garden), rendered
into the caches when missing: per set and method, the loops published at the node's default min_score and
the ATE of the query run's drifted odometry (evaluate's default drift) alone, closed with them, and with 5 %
of them made false.

    . ./env.sh && python -m bench.pose_graph [--nodes 10000] [--worlds]
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from tscm_ros.evaluate.trajectory import OdometryDrift, ate_rmse, close_loops, inject_false_loops
from tscm_ros.graph.pose_graph import PoseGraph, PoseGraphConfig
from tscm_ros.io.geometry import Pose

KERNELS = [("cauchy", 1.0), ("huber", 1.0), ("dcs", 1.0), ("dcs", 5.0), ("none", 1.0)]
DRIFTS = (0.1, 0.3, 0.5, 1.0)
SHARES = (0.0, 0.05, 0.1, 0.2, 0.3)


def rectangle(length_m: float) -> tuple[np.ndarray, np.ndarray]:
    """(N, 2) positions and headings every 0.1 m around a 2:1 rectangle of perimeter ``length_m``."""
    width = length_m / 6
    corners = np.array([(0, 0), (2 * width, 0), (2 * width, width), (0, width), (0, 0)], dtype=np.float64)
    points, headings = [], []
    for a, b in zip(corners, corners[1:]):
        steps = int(round(np.linalg.norm(b - a) / 0.1))
        heading = math.atan2(*(b - a)[::-1])
        for i in range(steps):
            points.append(a + (b - a) * i / steps)
            headings.append(heading)
    return np.array(points), np.array(headings)


def _pose(xy, heading) -> Pose:
    return Pose(np.array([xy[0], xy[1], 0.0]), np.array([0.0, 0.0, math.sin(heading / 2), math.cos(heading / 2)]))


def speed(nodes: int) -> dict:
    """Per-message times with and without loops, and the RSS growth, on a route of ``nodes`` metres."""
    lap, headings = rectangle(nodes / 2)
    results = {}
    for with_loops in (False, True):
        graph = PoseGraph()
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        times = []
        count = len(lap)
        for i in range(2 * count):
            stamp_ns = i * 100_000_000  # 10 Hz at 0.1 m per message
            position, heading = lap[i % count], headings[i % count]
            started = time.perf_counter()
            graph.add_odometry(stamp_ns, _pose(position, heading))
            metre = (i % count) / 10
            if with_loops and i >= count and i % 20 == 0 and metre % 50 < 20:
                graph.add_loop(stamp_ns, [position[0], position[1] + 0.5, 0.0])
            times.append(time.perf_counter() - started)
        times_ms = 1000 * np.array(times)
        results["loops" if with_loops else "odometry only"] = {
            "nodes": len(graph), "loops": graph.loops, "median_ms": float(np.median(times_ms)),
            "p95_ms": float(np.percentile(times_ms, 95)), "max_ms": float(times_ms.max()),
            "rss_growth_mib": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024}
    return results


def robustness() -> dict:
    """Worst ATE ratio over 3 seeds per (kernel, width, drift, share)."""
    side, per_side = 40.0, 40
    lap = []
    for k in range(4):
        heading = k * math.pi / 2
        start = np.array([(0, 0), (side, 0), (side, side), (0, side)][k], dtype=np.float64)
        for i in range(per_side):
            lap.append(_pose(start + i * (side / per_side) * np.array([math.cos(heading), math.sin(heading)]),
                             heading))
    truth_poses = lap * 3
    keyframes = np.array([pose.position for pose in lap])
    stamps = np.arange(len(truth_poses), dtype=np.int64) * 500_000_000
    truth = np.array([pose.position for pose in truth_poses])
    n = len(lap)
    true = [np.zeros(0, np.int64)] * n + [np.array([i % n]) if i % 4 == 0 else np.zeros(0, np.int64)
                                          for i in range(n, len(truth_poses))]
    table = {}
    for drift in DRIFTS:
        for seed in range(3):
            odometry = OdometryDrift(heading_bias_deg_per_m=drift, seed=seed).apply(truth_poses)
            alone = ate_rmse(np.array([pose.position for pose in odometry]), truth)
            for share in SHARES:
                loops, _ = inject_false_loops(true, keyframes, share, 20.0, seed)
                for kernel, width in KERNELS:
                    config = PoseGraphConfig(kernel=kernel, kernel_width=width)
                    ratio = ate_rmse(close_loops(stamps, odometry, loops, keyframes, config)[0], truth) / alone
                    key = (kernel, width, drift, share)
                    table[key] = max(table.get(key, 0.0), ratio)
    return table


WORLD_METHODS = ("default model (training-free VLAD) + temporal", "GeM baseline (pretrained, no training) + temporal",
                 "ORB bag of words")


def world_routes() -> list[tuple[str, Path, Path]]:
    """(name, reference, query) of the demo and the recognition benchmark's held-out traversals, rendered when
    missing."""
    from bench.recognition import GARDEN_SITE, TOWN_SITES, render, simulator_cache

    cache = simulator_cache()
    demo = cache.parent.parent / "demo" / cache.name
    routes = []
    for traversal, condition in ((0, "day"), (1, "season")):
        out = demo / f"world0_t{traversal}_{condition}"
        if not out.exists():
            subprocess.run([sys.executable, "-m", "tscm_ros.cli.simulate_route", "--out", str(out), "--seed", "0",
                            "--traversal", str(traversal), "--condition", condition, "--aliasing", "0.3",
                            "--frames", "120"], check=True)
    routes.append(("demo town, season", demo / "world0_t0_day", demo / "world0_t1_season"))
    for world, (seed, length) in [("town", site) for site in TOWN_SITES[:2]] + [("garden", GARDEN_SITE)]:
        reference = render(cache, world, seed, length, 0, "day", skip=True)
        for traversal, condition in ((3, "night"), (4, "haze"), (5, "season"), (6, "clutter")):
            routes.append((f"{world} {seed}, {condition}", reference,
                           render(cache, world, seed, length, traversal, condition, skip=False)))
    return routes


def worlds() -> list[tuple[str, dict]]:
    """``evaluate --pose-graph`` on every route: (set, its pose_graph.json)."""
    results = []
    with tempfile.TemporaryDirectory() as scratch:
        for name, reference, query in world_routes():
            out = Path(scratch) / "evaluation"
            subprocess.run([sys.executable, "-m", "tscm_ros.cli.evaluate", "--bag", str(reference), "--query-bag",
                            str(query), "--radius-m", "5", "--pose-graph", "--overwrite", "--out", str(out)],
                           check=True, stdout=subprocess.DEVNULL)
            results.append((name, json.loads((out / "pose_graph.json").read_text())))
            print(f"bench.pose_graph: {name} done", file=sys.stderr, flush=True)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=10000, help="pose nodes of the speed route (default 10000)")
    parser.add_argument("--worlds", action="store_true", help="only the rendered worlds (about 15 minutes)")
    args = parser.parse_args()
    if args.worlds:
        print("## Rendered worlds: ATE (m) of the query run, odometry alone / with the loops published at the "
              "node's defaults / with 5 % of them false\n")
        print("| set | method | loops published | in the graph | ATE odometry | ATE with loops | ratio | "
              "ATE with 5 % false |")
        print("|---|---|---:|---:|---:|---:|---:|---:|")
        for name, result in worlds():
            for method in result["methods"]:
                if method["name"] not in WORLD_METHODS:
                    continue
                ratio = method["ate_loops_m"] / method["ate_odometry_m"]
                print(f"| {name} | {method['name']} | {method['loops']} | {method['loops_used']} | "
                      f"{method['ate_odometry_m']:.2f} | {method['ate_loops_m']:.2f} | {ratio:.2f} | "
                      f"{method['ate_false_loops_m']:.2f} |")
        return 0
    print(f"## Speed: {args.nodes} pose nodes, odometry at 10 Hz (1 m/s), this machine\n")
    print("| run | nodes | loops | median ms | p95 ms | max ms | p95 ratio to odometry only | peak RSS growth MiB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    timings = speed(args.nodes)
    base = timings["odometry only"]["p95_ms"]
    for name, t in timings.items():
        print(f"| {name} | {t['nodes']} | {t['loops']} | {t['median_ms']:.3f} | {t['p95_ms']:.3f} | "
              f"{t['max_ms']:.1f} | {t['p95_ms'] / base:.2f} | {t['rss_growth_mib']:.0f} |")
    print("\n## Robustness: ATE with loops / ATE of odometry alone (worst of 3 seeds; below 1 corrects)\n")
    table = robustness()
    print("| kernel | drift deg/m | " + " | ".join(f"{100 * s:g} % false" for s in SHARES) + " |")
    print("|---|---:|" + "---:|" * len(SHARES))
    for kernel, width in KERNELS:
        for drift in DRIFTS:
            cells = " | ".join(f"{table[(kernel, width, drift, share)]:.2f}" for share in SHARES)
            print(f"| {kernel} ({width:g}) | {drift:g} | {cells} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
