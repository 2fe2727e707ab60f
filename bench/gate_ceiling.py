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
from collections import defaultdict
from pathlib import Path

from bench.recognition import pooled_metrics, read_queries, top1_curve
from tscm_ros.detect.detection import DEFAULT_MIN_SCORE


def ceiling_recall(rows: list[dict], precision: float) -> float:
    """The highest recall over all thresholds whose published top-1 candidates are at least ``precision``
    right (a threshold cannot split tied scores: they are published together)."""
    curve = top1_curve(rows)
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


def percent(value: float) -> str:
    return "-" if value != value else f"{100 * value:.1f}"  # NaN: nothing published


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", type=Path, help="the output folder of bench/recognition.py")
    parser.add_argument("--method", default="", help="only methods whose table name contains this")
    parser.add_argument("--precision", type=float, default=0.99, help="the precision the ceiling must keep")
    args = parser.parse_args(argv)
    groups = {key: paths for key, paths in collect(args.root).items() if args.method in key[1]}
    if not groups:
        parser.error(f"no queries_*.csv under {args.root}" + (f" for method {args.method!r}" if args.method else ""))
    print(f"| set | method | R@1 % | half R@1 % | at min_score {DEFAULT_MIN_SCORE:g}: P / R % "
          f"| oracle max R at P >= {100 * args.precision:g} % |")
    print("|---|---|---:|---:|---:|---:|")
    for (name, method), paths in sorted(groups.items()):
        rows = [row for path in paths for row in read_queries(path)]
        metric = pooled_metrics(rows)
        print(f"| {name} | {method} | {percent(metric['r1'])} | {percent(metric['r1'] / 2)} | "
              f"{percent(metric['precision_at_min_score'])} / {percent(metric['recall_at_min_score'])} "
              f"| {percent(ceiling_recall(rows, args.precision))} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
