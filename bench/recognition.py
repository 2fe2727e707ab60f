"""Recognition benchmark: real photographs first, then rendered worlds, every method in the same run.

Real track (``--real DIR``): every revisit set under DIR (folders with ref/, query/ and gt.csv, as in
tscm_ros/io/revisit_set.py) goes through ``evaluate --revisit-set``: a map of the set's references built the
node's way (the default model fits its vocabulary on them), every query through the node's code path,
judged by the set's ground truth. Per set: R@1, R@1 on the report half (the second half of the queries:
bench/descriptor_selection.py chose the default's settings on the first half only), R@5, maximum recall at
100 % precision and median ms per query.

Rendered track: sites of two worlds, each with a day reference traversal (the map, which skips a stretch of
the loop, so queries there must be rejected), two traversals for site training (the README's commands,
unchanged: extract a dataset, train a teacher, distil the student) and four held-out query traversals nobody
trains on: night, haze, season and clutter, each driven 1-2 m to the side with other camera height and
heading. The box town (``--sites`` of them) has look-alike street blocks; the garden (``--garden``) is a
world of another kind (photographic textures, meshes, other light) that nothing was designed or tuned on.
Every method runs through ``evaluate --bag``: R@1 within 5 m per condition and pooled per world, maximum
recall at 100 % precision of the top-1 score, the precision and recall of what the node publishes with its
default min_score (calibrated models), median ms per query.

Methods everywhere: ORB bag of words, the pretrained GeM baseline, the default model (training-free VLAD
with the map's own vocabulary), the teacher and student trained on the first site of the box town (on that
world's sites each site's own), and any ``--model NAME=CKPT``. With ``--students``, each real set also gets
the shipped student distilled on its own ref/ images (``train student``'s code, no labels), judged on its
queries beside the default. Rendered routes are cached in .cache/bench/ per version of the simulator.

    python -m bench.recognition --real ../shared/realdata      # 2 town sites + the garden: about 40 minutes
    python -m bench.recognition --real DIR --no-training       # the methods nobody trains here (minutes)
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

from tscm_ros.detect.detection import DEFAULT_MIN_SCORE
from tscm_ros.evaluate.loop_metrics import (
    PRCurve,
    at_threshold,
    max_recall_at_full_precision,
    precision_recall_curve,
)
from tscm_ros.io.revisit_set import find_revisit_sets, read_rgb

REPO = Path(__file__).resolve().parent.parent

TOWN_SITES = [(11, 120.0), (12, 200.0), (13, 160.0)]  # seed, lap length (m)
GARDEN_SITE = (21, 160.0)
ALIASING = 0.3
SPACING_M = 2.0
SKIP_ARC = (0.80, 0.92)
TRAINING = [(1, "auto"), (2, "day")]
QUERIES = [(3, "night"), (4, "haze"), (5, "season"), (6, "clutter")]
RADIUS_M = 5.0
BASELINES = {  # row name in the report -> name in evaluate's output
    "ORB bag of words": "ORB bag of words",
    "GeM baseline (pretrained)": "GeM baseline (pretrained, no training)",
    "default model": "default model (training-free VLAD)",
}
TRAINED = ("teacher (site-trained)", "student (distilled)")
NODE_DEFAULTS = " + temporal"  # the evaluate row of the node's shipped stages (temporal consistency, no verification)
NO_ODOMETRY = " [no odometry]"
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


def simulator_cache() -> Path:
    """Where rendered routes are kept: one folder per version of the simulator."""
    sources = sorted((REPO / "tscm_ros" / "sim").glob("*.py"))
    simulator = hashlib.sha256(b"".join(path.read_bytes() for path in sources)).hexdigest()[:12]
    return REPO / ".cache" / "bench" / simulator


def render(cache: Path, world: str, seed: int, length: float, traversal: int, condition: str, skip: bool) -> Path:
    out = cache / f"{world}{seed}_t{traversal}_{condition}"
    if not out.exists():
        argv = ["tscm_ros.cli.simulate_route", "--out", str(out), "--world", world, "--seed", str(seed),
                "--traversal", str(traversal), "--frames", str(round(length / SPACING_M)), "--route-length",
                str(length), "--condition", condition, "--aliasing", str(ALIASING)]
        if skip:
            argv += ["--skip-arc", f"{SKIP_ARC[0]},{SKIP_ARC[1]}"]
        run(argv, f"rendering {out.name}")
    return out


def read_queries(csv_path: Path) -> list[dict]:
    with open(csv_path, newline="", encoding="utf-8") as stream:
        return list(csv.DictReader(stream))


def top1_curve(rows: list[dict]) -> PRCurve:
    """The top-1 precision-recall curve over per-query rows of evaluate's queries_*.csv."""
    has_loop = np.array([row["has_true_loop"] == "1" for row in rows])
    correct = np.array([row["top1_correct"] == "1" for row in rows])
    scores = np.array([float(row["top1_score"]) if row["top1_score"] else math.nan for row in rows])
    return precision_recall_curve(scores, correct & has_loop, has_loop)


def pooled_metrics(rows: list[dict]) -> dict:
    """R@1, max recall at 100 % precision and what the default min_score publishes, over pooled per-query rows
    of evaluate's queries_*.csv."""
    has_loop = np.array([row["has_true_loop"] == "1" for row in rows])
    correct = np.array([row["top1_correct"] == "1" for row in rows])
    curve = top1_curve(rows)
    max_recall, threshold = max_recall_at_full_precision(curve)
    precision, recall = at_threshold(curve, DEFAULT_MIN_SCORE)
    return {"r1": float(correct[has_loop].mean()) if has_loop.any() else math.nan,
            "max_recall_p100": max_recall, "threshold": threshold,
            "ms": float(np.median([float(row["latency_ms"]) for row in rows])), "queries": len(rows),
            "true_negatives": int((~has_loop).sum()), "precision_at_min_score": precision,
            "recall_at_min_score": recall}


def train_site(data: Path, runs: Path) -> list[dict]:
    """The README's training commands on a site's dataset: teacher, then the distilled student."""
    measured = []
    for kind in ("teacher", "student"):
        run_dir = runs / kind
        if run_dir.exists():
            shutil.rmtree(run_dir)
        extra = ["--teacher", str(runs / "teacher" / "best.pt")] if kind == "student" else []
        seconds, peak_mb = run(["tscm_ros.cli.train", kind, "--data", str(data), *extra, "--out", str(run_dir),
                                "--no-progress"], f"train {kind}")
        measured.append({"site": data.parent.name, "kind": kind, "seconds": seconds, "peak_mb": peak_mb})
    return measured


def prepare_site(cache: Path, site: Path, world: str, seed: int, length: float) -> Path:
    """A site's training dataset (site/data) from its reference traversal and the TRAINING traversals."""
    bags = [render(cache, world, seed, length, 0, "day", skip=True)]
    bags += [render(cache, world, seed, length, t, c, skip=False) for t, c in TRAINING]
    data = site / "data"
    run(["tscm_ros.cli.extract_dataset", *[a for bag in bags for a in ("--bag", str(bag))], "--out", str(data),
         "--every-m", "2", "--overwrite", "--no-progress"], "extract_dataset")
    return data


def rendered_site(cache: Path, out: Path, world: str, seed: int, length: float, training: bool,
                  models: list[str]) -> tuple[dict, list[dict]]:
    """A site's held-out queries through evaluate --bag for every method: {(row, condition): per-query rows}."""
    site = out / f"{world}{seed}"
    reference = render(cache, world, seed, length, 0, "day", skip=True)
    measured = []
    own = []
    if training:
        data = prepare_site(cache, site, world, seed, length)
        measured = train_site(data, site / "runs")
        own = [f"{TRAINED[0]}={site / 'runs' / 'teacher' / 'best.pt'}",
               f"{TRAINED[1]}={site / 'runs' / 'student' / 'best.pt'}"]
    rows: dict[tuple[str, str], list[dict]] = {}
    for traversal, condition in QUERIES:
        query = render(cache, world, seed, length, traversal, condition, skip=False)
        # With odometry every method; without (a node with no pose_topic) the descriptor methods' stages again.
        for odometry, extra, suffix in ((True, [], ""), (False, ["--no-odometry", "--baselines", "default"],
                                                         NO_ODOMETRY)):
            evaluation = site / f"eval_{condition}{'' if odometry else '_no_odometry'}"
            run(["tscm_ros.cli.evaluate", "--bag", str(reference), "--query-bag", str(query), "--out",
                 str(evaluation), "--overwrite", "--radius-m", str(RADIUS_M), "--device", "cpu", *extra,
                 "--intrinsics", f"{FOCAL_PX},{FOCAL_PX},160,120", *[a for m in own + models for a in ("--model", m)]],
                f"evaluate {world}{seed} {condition}{suffix}")
            summary = json.loads((evaluation / "loop_closure.json").read_text())
            for method in summary["methods"]:
                if not odometry and not method["name"].endswith("temporal"):
                    continue  # only temporal consistency uses the query poses
                rows.setdefault((row_name(method["name"]) + suffix, condition), []).extend(
                    dict(r, calibrated=method["calibrated"]) for r in read_queries(evaluation / method["queries_csv"]))
    return rows, measured


def row_name(evaluate_name: str) -> str:
    for row, name in BASELINES.items():
        if evaluate_name.startswith(name):
            return row + evaluate_name[len(name):]
    return evaluate_name


def rendered_table(title: str, rows: dict[tuple[str, str], list[dict]]) -> list[str]:
    conditions = [c for _, c in QUERIES]
    methods = list(dict.fromkeys(name for name, _ in rows))
    pooled = {name: pooled_metrics([r for c in conditions for r in rows.get((name, c), [])]) for name in methods}
    gem = pooled["GeM baseline (pretrained)"]["r1"]
    lines = [f"### {title}", "",
             "| method | " + " | ".join(f"R@1 {c} %" for c in conditions)
             + f" | R@1 all % | vs GeM (points) | max R @ P=100 % | P / R % at score >= {DEFAULT_MIN_SCORE:g} | "
             "median ms/query |", "|---|" + "---:|" * (len(conditions) + 5)]
    for name in methods:
        metric = pooled[name]
        cells = [f"{100 * pooled_metrics(rows[(name, c)])['r1']:.1f}" for c in conditions]
        calibrated = rows[(name, conditions[0])][0]["calibrated"]
        at_min = (f"{100 * metric['precision_at_min_score']:.1f} / {100 * metric['recall_at_min_score']:.1f}"
                  if calibrated else "(uncalibrated)")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {100 * metric['r1']:.1f} | "
                     f"{100 * (metric['r1'] - gem):+.1f} | {100 * metric['max_recall_p100']:.1f} | {at_min} | "
                     f"{metric['ms']:.1f} |")
    any_metric = next(iter(pooled.values()))
    return lines + ["", f"{any_metric['queries']} queries per method ({any_metric['true_negatives']} in a stretch the "
                    "map never saw: true negatives, counted against precision).", ""]


def gate_rows(track: str, rows: dict[tuple[str, str], list[dict]]) -> list[tuple]:
    """(track, method, odometry, retrieval R@1, published precision, published recall) of every method's
    node-defaults row, pooled over the track's conditions."""
    out = []
    methods = list(dict.fromkeys(name for name, _ in rows))
    for name in (m for m in methods if " + " not in m and NO_ODOMETRY not in m):
        retrieval = pooled_metrics([r for (n, _), v in rows.items() if n == name for r in v])
        for stages, label in ((NODE_DEFAULTS, name), (" + verification" + NODE_DEFAULTS, f"{name}, verification on")):
            for suffix, odometry in (("", "yes"), (NO_ODOMETRY, "no")):
                staged = name + stages + suffix
                if staged not in methods:
                    continue
                published = pooled_metrics([r for (n, _), v in rows.items() if n == staged for r in v])
                out.append((track, label, odometry, retrieval["r1"], published["precision_at_min_score"],
                            published["recall_at_min_score"]))
    return out


def gate_table(rows: list[tuple]) -> list[str]:
    lines = [f"### The node's shipped defaults: what it publishes (min_score {DEFAULT_MIN_SCORE:g}, temporal "
             "consistency on, verification off)", "",
             "| set | method | odometry | retrieval R@1 % | published precision % | published recall % | "
             "recall / R@1 |", "|---|---|---|---:|---:|---:|---:|"]
    for track, name, odometry, r1, precision, recall in rows:
        shown = "n/a (none published)" if math.isnan(precision) else f"{100 * precision:.1f}"
        lines.append(f"| {track} | {name} | {odometry} | {100 * r1:.1f} | {shown} | {100 * recall:.1f} | "
                     f"{recall / r1 if r1 else math.nan:.2f} |")
    return lines + [""]


STUDENT = "student (distilled on ref/)"


def distilled_student(revisit_set, run: Path) -> Path:
    """The shipped student distilled on the set's ref/ images alone, into ``run`` (kept: a rerun resumes)."""
    from tscm_ros.train.distillation import STUDENT_FILE, distil, load_distill_config

    if not (run / STUDENT_FILE).is_file():
        shutil.rmtree(run, ignore_errors=True)
        references = [read_rgb(path) for path in revisit_set.references]
        distil(lambda: references, len(references), run, load_distill_config(None), revisit_set.name,
               show_progress=False)
    return run / STUDENT_FILE


def real_track(real: Path, out: Path, models: list[str], students: bool = False) -> tuple[list[str], list[tuple]]:
    """Every revisit set under ``real`` through evaluate --revisit-set (its stages in the map's keyframe
    order): the table rows and the gate rows. ``students``: with each set's own distilled student too."""
    lines = ["### Real photographs (" + str(real.name) + ")", "",
             "| set | method | R@1 % | R@1 report half % | vs GeM (points) | R@5 % | max R @ P=100 % | "
             "median ms/query |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    gates = []
    for revisit_set in find_revisit_sets(real):
        evaluation = out / "real" / revisit_set.name
        own = [f"{STUDENT}={distilled_student(revisit_set, out / 'students' / revisit_set.name)}"] if students else []
        run(["tscm_ros.cli.evaluate", "--revisit-set", str(revisit_set.root), "--out", str(evaluation), "--overwrite",
             "--device", "cpu", "--ns", "1", "5", *[a for m in models + own for a in ("--model", m)]],
            f"evaluate {revisit_set.name}")
        summary = json.loads((evaluation / "loop_closure.json").read_text())
        report_half = slice(len(revisit_set.queries) // 2, None)
        gem = next(m for m in summary["methods"] if m["name"] == BASELINES["GeM baseline (pretrained)"])
        rows = {}
        for method in summary["methods"]:
            queries = read_queries(evaluation / method["queries_csv"])
            rows[(row_name(method["name"]), revisit_set.name)] = [dict(r, calibrated=method["calibrated"])
                                                                  for r in queries]
            if method["name"].endswith(("temporal", "verification")):
                continue
            half = np.mean([r["top1_correct"] == "1" for r in queries[report_half] if r["has_true_loop"] == "1"])
            r1, r5 = method["recall_at"]["1"], method["recall_at"]["5"]
            lines.append(f"| {revisit_set.name} | {row_name(method['name'])} | {100 * r1:.1f} | {100 * half:.1f} | "
                         f"{100 * (r1 - gem['recall_at']['1']):+.1f} | {100 * r5:.1f} | "
                         f"{100 * method['max_recall_at_full_precision']:.1f} | {method['latency_ms']['median']:.1f} |")
        gates += [(track, name, "n/a", r1, precision, recall)
                  for track, name, _, r1, precision, recall in gate_rows(revisit_set.name, rows)]
    return lines + [""], gates


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--real", metavar="DIR", action="append", default=[],
                        help="folder of real revisit sets (e.g. ../shared/realdata); repeat for several")
    parser.add_argument("--sites", type=int, default=2, help=f"box-town sites, 0-{len(TOWN_SITES)} (default 2)")
    parser.add_argument("--no-garden", action="store_true", help="leave out the garden world")
    parser.add_argument("--no-training", action="store_true",
                        help="skip site training: only ORB bag of words, GeM, the default and --model")
    parser.add_argument("--model", action="append", default=[], metavar="NAME=CKPT",
                        help="another model to evaluate everywhere (repeatable)")
    parser.add_argument("--students", action="store_true",
                        help="also each real set's own student, distilled on its ref/ images")
    parser.add_argument("--out", default=str(REPO / "bench_output" / "recognition"), help="output directory")
    args = parser.parse_args()
    if not 0 <= args.sites <= len(TOWN_SITES):
        parser.error(f"--sites must be in 0..{len(TOWN_SITES)}")
    cache, out = simulator_cache(), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started, load_before = time.monotonic(), os.getloadavg()[0]
    training: list[dict] = []
    town: dict[tuple[str, str], list[dict]] = {}
    trained_models: list[str] = []
    for index, (seed, length) in enumerate(TOWN_SITES[: args.sites]):
        rows, measured = rendered_site(cache, out, "town", seed, length, not args.no_training, args.model)
        training += measured
        for key, value in rows.items():
            town.setdefault(key, []).extend(value)
        if index == 0 and measured:
            trained_models = [f"{name} (town {seed})={out / f'town{seed}' / 'runs' / kind / 'best.pt'}"
                              for name, kind in zip(TRAINED, ("teacher", "student"))]
    lines = [f"## Recognition benchmark ({time.strftime('%Y-%m-%d')}, load average {load_before:.2f} at the start)",
             ""]
    gates: list[tuple] = []
    for real in args.real:
        real_lines, real_gates = real_track(Path(real), out, trained_models + args.model, args.students)
        lines += real_lines
        gates += real_gates
    if not args.no_garden:
        garden, measured = rendered_site(cache, out, "garden", *GARDEN_SITE, False, trained_models + args.model)
        lines += rendered_table(f"Rendered: the garden (seed {GARDEN_SITE[0]}), held-out traversals, R@1 within "
                                f"{RADIUS_M:g} m", garden)
        gates += gate_rows("garden (rendered)", garden)
    if town:
        lines += rendered_table(f"Rendered: {args.sites} box-town site(s), held-out traversals, R@1 within "
                                f"{RADIUS_M:g} m", town)
        gates += gate_rows("box town (rendered)", town)
    lines += gate_table(gates)
    if training:
        lines += ["Training (README commands, this machine): " + "; ".join(
            f"{t['site']} {t['kind']} {t['seconds']:.0f} s, peak {t['peak_mb']:.0f} MB" for t in training), ""]
    lines.append(f"Whole run {(time.monotonic() - started) / 60:.0f} min.")
    report = "\n".join(lines) + "\n"
    (out / "recognition.md").write_text(report, encoding="utf-8")
    print(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
