"""Recognition benchmark: site training and every method on held-out traversals under hard changes.

Each *site* is a rendered town (its own seed) with perceptual aliasing (a share of its 20 m street
blocks are exact copies of others). Per site:

- reference traversal 0 (day) becomes the map; it skips a stretch of the loop, so queries there have
  no true loop (a detour through places never mapped: a detector must reject them);
- traversals 1 and 2 (a dusk drive and a day drive with other offsets) are the site's training data:
  the README's commands, unchanged, extract a dataset from traversals 0-2, train a teacher and distil
  the student;
- held-out query traversals, never trained on: night (low light, sensor noise), haze, season
  (recoloured surfaces) and clutter (moved and added objects), each driven 1-2 m to the side, with
  camera height and heading changes.

Every method runs through ``evaluate --bag`` (the node's code path): ORB bag of words, the pretrained
GeM baseline, the default model, the site-trained teacher and the distilled student, each descriptor
method also with geometric verification, and with verification and temporal consistency (the node's
defaults; camera intrinsics of the simulator given, so verification fits the essential matrix). One table pools
the queries of all sites and conditions: R@1 within 5 m per condition and overall, maximum recall at
100 % precision of the top-1 score (one threshold for all queries of a method), median ms per query
(describe + search, this machine, all methods in the same run). Training time and peak memory are
measured per run. Rendered routes are cached in .cache/bench/ per version of the simulator.

    python bench/recognition.py                 # 2 sites, about 15-20 minutes on 2 CPU cores
    python bench/recognition.py --sites 1       # one site
    python bench/recognition.py --no-training   # only the methods nobody trains here: ORB, GeM, default (minutes)
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tscm_ros.loop_detector import DEFAULT_MIN_SCORE  # noqa: E402
from tscm_ros.loop_evaluation import (  # noqa: E402
    at_threshold,
    max_recall_at_full_precision,
    precision_recall_curve,
)

SITES = [  # seed, lap length (m)
    (11, 120.0),
    (12, 200.0),
    (13, 160.0),
]
ALIASING = 0.3
SPACING_M = 2.0
SKIP_ARC = (0.80, 0.92)
TRAINING = [(1, "auto"), (2, "day")]
QUERIES = [(3, "night"), (4, "haze"), (5, "season"), (6, "clutter")]
RADIUS_M = 5.0
DESCRIPTOR_METHODS = {  # row name in the report -> name in evaluate's output
    "GeM baseline (pretrained)": "GeM baseline (pretrained, no training)",
    "default model": "default model (shipped student)",
    "teacher (site-trained)": "teacher (site-trained)",
    "student (distilled)": "student (distilled)",
}
STAGES = ("", " + temporal", " + verification", " + verification + temporal")  # evaluate's row suffixes
METHODS = {"ORB bag of words": "ORB bag of words"} | {
    row + stage: name + stage for row, name in DESCRIPTOR_METHODS.items() for stage in STAGES}
FOCAL_PX = 120.0 / math.tan(math.radians(35.0))  # the simulator's camera: 70 degree vertical field of view, 320x240


def run(argv: list[str], what: str) -> tuple[float, float]:
    """Run a tscm_ros command line in a child process; (seconds, peak resident MB). Exits on failure."""
    started = time.monotonic()
    process = subprocess.Popen([sys.executable, "-m", *argv], cwd=REPO)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.monotonic() - started
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"bench/recognition.py: {what} failed (exit code {os.waitstatus_to_exitcode(status)})")
    return seconds, usage.ru_maxrss / 1024.0


def render(cache: Path, seed: int, length: float, traversal: int, condition: str, skip: bool) -> Path:
    out = cache / f"site{seed}_t{traversal}_{condition}"
    if not out.exists():
        frames = int(round(length / SPACING_M))
        argv = ["tscm_ros.cli.simulate_route", "--out", str(out), "--seed", str(seed), "--traversal", str(traversal),
                "--frames", str(frames), "--route-length", str(length), "--condition", condition,
                "--aliasing", str(ALIASING)]
        if skip:
            argv += ["--skip-arc", f"{SKIP_ARC[0]},{SKIP_ARC[1]}"]
        run(argv, f"rendering {out.name}")
    return out


def simulator_cache() -> Path:
    """Where rendered routes are kept: one folder per version of the simulator."""
    sources = sorted((REPO / "tscm_ros").glob("simulat*.py"))
    simulator = hashlib.sha256(b"".join(path.read_bytes() for path in sources)).hexdigest()[:12]
    return REPO / ".cache" / "bench" / simulator


def prepare_site(cache: Path, site: Path, seed: int, length: float) -> tuple[Path, Path, Path]:
    """Render a site's reference and training traversals and extract its dataset with the README's command;
    (reference bag, dataset, runs directory)."""
    reference = render(cache, seed, length, 0, "day", skip=True)
    bags = [reference] + [render(cache, seed, length, t, c, skip=False) for t, c in TRAINING]
    data = site / "data"
    run(["tscm_ros.cli.extract_dataset", *[a for bag in bags for a in ("--bag", str(bag))], "--out", str(data),
         "--every-m", "2", "--overwrite", "--no-progress"], "extract_dataset")
    return reference, data, site / "runs"


def read_queries(csv_path: Path) -> list[dict]:
    with open(csv_path, newline="", encoding="utf-8") as stream:
        return list(csv.DictReader(stream))


def pooled_metrics(rows: list[dict]) -> dict:
    """R@1 and max recall at 100 % precision over pooled per-query rows of evaluate's queries_*.csv."""
    has_loop = np.array([row["has_true_loop"] == "1" for row in rows])
    correct = np.array([row["top1_correct"] == "1" for row in rows])
    scores = np.array([float(row["top1_score"]) if row["top1_score"] else math.nan for row in rows])
    recall1 = correct[has_loop].mean() if has_loop.any() else math.nan
    curve = precision_recall_curve(scores, correct & has_loop, has_loop)
    max_recall, threshold = max_recall_at_full_precision(curve)
    precision, recall = at_threshold(curve, DEFAULT_MIN_SCORE)
    latency = float(np.median([float(row["latency_ms"]) for row in rows]))
    return {"r1": float(recall1), "max_recall_p100": max_recall, "threshold": threshold, "ms": latency,
            "queries": len(rows), "true_negatives": int((~has_loop).sum()),
            "precision_at_min_score": precision, "recall_at_min_score": recall}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sites", type=int, default=2, help=f"number of sites, 1-{len(SITES)} (default 2)")
    parser.add_argument("--out", default=str(REPO / "bench_output" / "recognition"), help="output directory")
    parser.add_argument("--no-training", action="store_true",
                        help="skip site training: only ORB bag of words, GeM and the default model (with their stages)")
    args = parser.parse_args()
    if not 1 <= args.sites <= len(SITES):
        parser.error(f"--sites must be in 1..{len(SITES)}")
    cache = simulator_cache()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pooled: dict[str, list[dict]] = {name: [] for name in METHODS}
    by_condition: dict[tuple[str, str], list[dict]] = {}
    calibrated: dict[str, bool] = {}
    training = []
    for seed, length in SITES[: args.sites]:
        site = out / f"site{seed}"
        reference, data, runs = prepare_site(cache, site, seed, length)
        for kind in () if args.no_training else ("teacher", "student"):
            run_dir = runs / kind
            if run_dir.exists():
                shutil.rmtree(run_dir)
            extra = ["--teacher", str(runs / "teacher" / "best.pt")] if kind == "student" else []
            seconds, peak_mb = run(["tscm_ros.cli.train", kind, "--data", str(data), *extra, "--out", str(run_dir),
                                    "--no-progress"], f"train {kind}")
            training.append({"site": seed, "kind": kind, "seconds": seconds, "peak_mb": peak_mb})
        for traversal, condition in QUERIES:
            query = render(cache, seed, length, traversal, condition, skip=False)
            evaluation = site / f"eval_{condition}"
            models = [] if args.no_training else [
                "--model", f"teacher (site-trained)={runs / 'teacher' / 'best.pt'}",
                "--model", f"student (distilled)={runs / 'student' / 'best.pt'}"]
            run(["tscm_ros.cli.evaluate", "--bag", str(reference), "--query-bag", str(query), "--out", str(evaluation),
                 "--overwrite", "--radius-m", str(RADIUS_M), "--device", "cpu",
                 "--intrinsics", f"{FOCAL_PX},{FOCAL_PX},160,120", *models], f"evaluate {condition}")
            summary = json.loads((evaluation / "loop_closure.json").read_text())
            for method in summary["methods"]:
                row_name = next(k for k, v in METHODS.items() if v == method["name"])
                calibrated[row_name] = method["calibrated"]
                rows = read_queries(evaluation / method["queries_csv"])
                pooled[row_name] += rows
                by_condition.setdefault((row_name, condition), []).extend(rows)

    conditions = [c for _, c in QUERIES]
    results = {name: pooled_metrics(rows) for name, rows in pooled.items() if rows}
    per_condition = {key: pooled_metrics(rows) for key, rows in by_condition.items()}
    gem = results["GeM baseline (pretrained)"]["r1"]
    lines = [
        f"## Recognition benchmark: {args.sites} site(s), held-out traversals, R@1 within {RADIUS_M:g} m",
        "",
        "| method | " + " | ".join(f"R@1 {c} %" for c in conditions)
        + f" | R@1 all % | vs GeM (points) | max R @ P=100 % | P / R % at score >= {DEFAULT_MIN_SCORE:g}"
        + " | median ms/query |",
        "|---|" + "---:|" * (len(conditions) + 5),
    ]
    for name, metric in results.items():
        cells = [f"{100 * per_condition[(name, c)]['r1']:.1f}" for c in conditions]
        at_min = (f"{100 * metric['precision_at_min_score']:.1f} / {100 * metric['recall_at_min_score']:.1f}"
                  if calibrated.get(name) else "(uncalibrated)")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {100 * metric['r1']:.1f} | "
                     f"{100 * (metric['r1'] - gem):+.1f} | {100 * metric['max_recall_p100']:.1f} | {at_min} | "
                     f"{metric['ms']:.1f} |")
    any_result = next(iter(results.values()))
    lines += ["", f"{any_result['queries']} queries per method ({any_result['true_negatives']} in a stretch the map "
              "never saw: true negatives, counted against precision)."]
    if training:
        teacher, student = results["teacher (site-trained)"]["r1"], results["student (distilled)"]["r1"]
        lines[-1] += (f" Student / teacher R@1: {student / teacher:.2f}. Training (README commands, this machine): "
                      + "; ".join(f"site {t['site']} {t['kind']} {t['seconds']:.0f} s, peak {t['peak_mb']:.0f} MB"
                                  for t in training))
    report = "\n".join(lines) + "\n"
    (out / "recognition.md").write_text(report, encoding="utf-8")
    (out / "recognition.json").write_text(json.dumps(
        {"methods": results, "per_condition": {f"{n} / {c}": m for (n, c), m in per_condition.items()},
         "training": training}, indent=2) + "\n", encoding="utf-8")
    print(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
