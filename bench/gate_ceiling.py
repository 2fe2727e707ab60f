"""What could any score threshold publish? The ceiling of a top-1 score gate, from a recognition run.

Reads the per-query tables (`queries_*.csv`) that `bench/recognition.py` writes under its output folder and,
per set and method, reports R@1, the precision and recall of what is published at the node's default
min_score, and the highest recall any single threshold reaches at a given precision (99 % by default), the
threshold chosen on the very queries it is scored on: an oracle, so an upper bound for a score gate, not
a figure to ship. Rendered worlds pool their conditions (runs with odometry only).

    python -m bench.gate_ceiling bench_output/recognition               # after bench/recognition.py
    python -m bench.gate_ceiling bench_output/recognition --method default_model
"""

from __future__ import annotations

import argparse
import csv
from collections import defaultdict
from pathlib import Path

import numpy as np

from tscm_ros.detect.detection import DEFAULT_MIN_SCORE
from tscm_ros.evaluate.loop_metrics import precision_recall_curve


def read_queries(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-1 scores (NaN where nothing was returned), whether the top-1 was right, whether a loop exists."""
    with open(path, newline="") as stream:
        rows = list(csv.DictReader(stream))
    score = np.array([float(r["top1_score"]) if r["top1_score"] else np.nan for r in rows])
    correct = np.array([r["top1_correct"] == "1" for r in rows])
    has_loop = np.array([r["has_true_loop"] == "1" for r in rows])
    return score, correct, has_loop


def ceiling_recall(score: np.ndarray, correct: np.ndarray, has_loop: np.ndarray, precision: float) -> float:
    """The highest recall over all thresholds whose published top-1 candidates are at least ``precision``
    right (a threshold cannot split tied scores: they are published together)."""
    curve = precision_recall_curve(score, correct, has_loop)
    reachable = curve.recall[curve.precision >= precision]
    return float(reachable.max()) if len(reachable) else 0.0


def collect(root: Path) -> dict[tuple[str, str], list[Path]]:
    """(set, method) -> its query tables: a real set's folder, or a rendered world's conditions pooled."""
    groups: dict[tuple[str, str], list[Path]] = defaultdict(list)
    for path in sorted(root.rglob("queries_*.csv")):
        folder = path.parent
        if folder.name.endswith("_no_odometry"):
            continue
        name = folder.parent.name if folder.name.startswith("eval_") else folder.name
        groups[(name, path.stem.removeprefix("queries_"))].append(path)
    return groups


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", type=Path, help="the output folder of bench/recognition.py")
    parser.add_argument("--method", default="", help="only methods whose table name contains this")
    parser.add_argument("--precision", type=float, default=0.99, help="the precision the ceiling must keep")
    parser.add_argument("--min-score", type=float, default=DEFAULT_MIN_SCORE,
                        help="the score threshold the node publishes at (its default)")
    args = parser.parse_args(argv)
    groups = {key: paths for key, paths in collect(args.root).items() if args.method in key[1]}
    if not groups:
        parser.error(f"no queries_*.csv under {args.root}" + (f" for method {args.method!r}" if args.method else ""))
    print(f"| set | method | R@1 % | half R@1 % | at min_score {args.min_score:g}: P / R % "
          f"| oracle max R at P >= {100 * args.precision:g} % |")
    print("|---|---|---:|---:|---:|---:|")
    for (name, method), paths in sorted(groups.items()):
        score, correct, has_loop = map(np.concatenate, zip(*(read_queries(p) for p in paths)))
        loops = int(has_loop.sum())
        published = np.nan_to_num(score, nan=-np.inf) >= args.min_score
        precision = f"{100 * correct[published].mean():.1f}" if published.any() else "-"
        recall_1 = 100 * correct.sum() / max(loops, 1)
        print(f"| {name} | {method} | {recall_1:.1f} | {recall_1 / 2:.1f} | {precision} / "
              f"{100 * correct[published].sum() / max(loops, 1):.1f} "
              f"| {100 * ceiling_recall(score, correct, has_loop, args.precision):.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
