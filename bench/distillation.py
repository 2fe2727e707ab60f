"""Distillation ablation: what makes the distilled student transfer, measured on held-out traversals.

On the first site of bench/recognition.py (same rendering, dataset and teacher training as there), the
student is distilled from one site-trained teacher in several variants, each changing one thing:

- TSCM as shipped: L_hard + L_soft + L_cm, heads initialised from data, augmentation on;
- no distillation (L_hard only: the student trained like a teacher);
- distillation terms only (L_soft + L_cm, no L_hard);
- no cross-metric term (L_hard + L_soft);
- random head initialisation (no PCA token projection, no k-means NetVLAD centres);
- no augmentation.

Every variant and the teacher are evaluated on the held-out night / haze / season / clutter traversals
(R@1 within 5 m pooled over them, max recall at 100 % precision, student / teacher R@1), and the distance
between the student's and the teacher's descriptor spaces on the held-out query images: the mean
squared distance between S(x) and T(x), the quantity L_soft minimises on training images.

    python -m bench.distillation      # about 15 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from bench.recognition import (
    QUERIES,
    RADIUS_M,
    REPO,
    TOWN_SITES,
    pooled_metrics,
    prepare_site,
    read_queries,
    render,
    run,
    simulator_cache,
)

VARIANTS = {
    "TSCM (hard + soft + cross-metric)": [],
    "no distillation (hard only)": ["soft_weight=0", "cross_metric_weight=0"],
    "distillation only (soft + cross-metric)": ["hard_weight=0"],
    "no cross-metric (hard + soft)": ["cross_metric_weight=0"],
    "random head initialisation": ["init_heads=false"],
    "no augmentation": ["augment=false"],
}


def descriptor_gap(student: Path, teacher: Path, bags: list[Path]) -> float:
    """Mean squared distance between student and teacher descriptors of the bags' images."""
    from tscm_ros.describe.describer import describer_for
    from tscm_ros.io.bag import FrameSource

    images = [frame.image for bag in bags for frame in FrameSource(bag).open()]
    s = describer_for(student, device="cpu").describe(images)
    t = describer_for(teacher, device="cpu").describe(images)
    return float(((s - t) ** 2).sum(axis=1).mean())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(REPO / "bench_output" / "distillation"), help="output directory")
    parser.add_argument("--reuse", action="store_true", help="evaluate the checkpoints of a previous run in --out")
    args = parser.parse_args()
    out = Path(args.out)
    cache = simulator_cache()
    seed, length = TOWN_SITES[0]
    site = out / f"town{seed}"
    reference = render(cache, "town", seed, length, 0, "day", skip=True)
    data, runs = prepare_site(cache, site, "town", seed, length), site / "runs"
    teacher = runs / "teacher" / "best.pt"
    students = {name: runs / f"student{index}" / "best.pt" for index, name in enumerate(VARIANTS)}
    if not (args.reuse and all(path.is_file() for path in [teacher, *students.values()])):
        shutil.rmtree(runs, ignore_errors=True)
        run(["tscm_ros.cli.train", "teacher", "--data", str(data), "--out", str(teacher.parent), "--no-progress"],
            "train teacher")
        for (name, overrides), path in zip(VARIANTS.items(), students.values()):
            settings = [a for setting in overrides for a in ("--set", setting)]
            run(["tscm_ros.cli.train", "student", "--data", str(data), "--teacher", str(teacher), "--out",
                 str(path.parent), "--no-progress", *settings], f"train student: {name}")
    pooled: dict[str, list[dict]] = {}
    queries = []
    for traversal, condition in QUERIES:
        query = render(cache, "town", seed, length, traversal, condition, skip=False)
        queries.append(query)
        evaluation = out / f"eval_{condition}"
        models = [a for name, path in [("teacher", teacher), *students.items()] for a in ("--model", f"{name}={path}")]
        run(["tscm_ros.cli.evaluate", "--bag", str(reference), "--query-bag", str(query), "--out", str(evaluation),
             "--overwrite", "--radius-m", str(RADIUS_M), "--device", "cpu", "--baselines", "gem", *models],
            f"evaluate {condition}")
        for method in json.loads((evaluation / "loop_closure.json").read_text())["methods"]:
            pooled.setdefault(method["name"], []).extend(read_queries(evaluation / method["queries_csv"]))
    results = {name: pooled_metrics(rows) for name, rows in pooled.items()}
    teacher_r1 = results["teacher"]["r1"]
    gem_r1 = results["GeM baseline (pretrained, no training)"]["r1"]
    lines = [f"## Distillation ablation: site {seed}, held-out {', '.join(c for _, c in QUERIES)} traversals", "",
             "| student variant | R@1 % | / teacher | vs GeM (points) | max R @ P=100 % | mean d(S(x), T(x)) |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, path in students.items():
        metric = results[name]
        gap = descriptor_gap(path, teacher, queries)
        lines.append(f"| {name} | {100 * metric['r1']:.1f} | {metric['r1'] / teacher_r1:.2f} | "
                     f"{100 * (metric['r1'] - gem_r1):+.1f} | {100 * metric['max_recall_p100']:.1f} | {gap:.3f} |")
    teacher_p100 = results["teacher"]["max_recall_p100"]
    lines += ["", f"Teacher R@1 {100 * teacher_r1:.1f} %, max R @ P=100 % {100 * teacher_p100:.1f} %; "
              f"GeM baseline R@1 {100 * gem_r1:.1f} %. {results['teacher']['queries']} queries per method."]
    report = "\n".join(lines) + "\n"
    (out / "distillation.md").write_text(report, encoding="utf-8")
    print(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
