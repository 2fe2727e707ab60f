"""The distilled student against its teacher (the default model) on real photographs, and the cost of each.

For every revisit set under each ``--real`` folder, the student is distilled as ``train student --bag`` does
(``tscm_ros.train.distillation.distil``), from the set's ``ref/`` images only (the map's), and judged on its
``query/`` images, which the distillation never sees. Per set and model, R@1 of the queries against the
references:

- the teacher: the default model with a vocabulary fitted on the references, as build_map does;
- the pretrained GeM baseline;
- each student variant (``--variants``), with its k-means vocabulary (no distillation, ``epochs=0``) and
  distilled (the shipped settings, config/train_distill.yaml).

Then ``describe()`` of a 640x480 image at batch 1 (preprocessing included, the Describer's default backend),
median over interleaved rounds of the teacher and every variant in the same run, and each variant's time
as a ratio of the teacher's. That gives the curve R@1 against describe time and descriptor size.

    python -m bench.student --real ../shared/realdata --real HELD_OUT_DIR      # about 25 minutes on 2 CPU cores
    python -m bench.student --real DIR --variants shipped                       # the shipped student only
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from tscm_ros.describe.checkpoint import load_model_config
from tscm_ros.describe.describer import DEFAULT_MODEL, PRETRAINED, Describer, describer_for
from tscm_ros.io.revisit_set import find_revisit_sets, read_rgb
from tscm_ros.train.distillation import STUDENT_FILE, distil, load_distill_config

SHIPPED = "shipped"
# name -> changes to config/model_student_distilled.yaml: (backbone variant, input height, width, token_dim, clusters)
VARIANTS = {
    SHIPPED: (0, 120, 160, 32, 16),
    "lite0 144x192": (0, 144, 192, 32, 16),
    "lite0 192x256": (0, 192, 256, 32, 16),
    "lite0 144x192 64x8": (0, 144, 192, 64, 8),
}


def variant_config(name: str) -> dict:
    """The student's model config (with its preprocess section) for a variant."""
    model, preprocess = load_model_config("student_distilled", kind="vlad")
    backbone, height, width, token_dim, clusters = VARIANTS[name]
    model = copy.deepcopy(model)
    model["backbone"]["name"] = f"efficientnet_lite{backbone}"
    model["vlad"] |= {"token_dim": token_dim, "clusters": clusters}
    return {**model, "preprocess": {**preprocess.to_dict(), "height": height, "width": width}}


def recall_at_1(describer: Describer, references: list[np.ndarray], queries: list[np.ndarray],
                truth: np.ndarray) -> float:
    """R@1 of the queries; a model with a vocabulary fits it on the references first, as build_map does."""
    if describer.adapts_to_map:
        _, maps = describer.describe_with_maps(references)
        describer = describer.with_vocabulary(describer.fit_vocabulary([m[0] for m in maps]))
    top = np.argmax(describer.describe(queries) @ describer.describe(references).T, axis=1)
    return float(truth[np.arange(len(queries)), top].mean())


def describe_ms(describers: dict[str, Describer], rounds: int) -> dict[str, float]:
    """Median ms of describe() of one 640x480 image per model, rounds interleaved across the models."""
    image = np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    samples: dict[str, list[float]] = {name: [] for name in describers}
    for describer in describers.values():
        for _ in range(5):
            describer.describe([image])
    for _ in range(rounds):
        for name, describer in describers.items():
            start = time.perf_counter()
            describer.describe([image])
            samples[name].append(1000 * (time.perf_counter() - start))
    return {name: statistics.median(values) for name, values in samples.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--real", action="append", required=True, metavar="DIR",
                        help="folder of revisit sets (ref/, query/, gt.csv); repeat for several")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated student variants (default: all of {', '.join(VARIANTS)})")
    parser.add_argument("--rounds", type=int, default=200, help="timed describe() calls per model")
    parser.add_argument("--out", default="bench_output/student", help="folder for student.md and student.json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    variants = [name.strip() for name in args.variants.split(",") if name.strip()]
    unknown = [name for name in variants if name not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; known: {list(VARIANTS)}")
    shipped = load_distill_config(None)
    teacher, gem = describer_for(DEFAULT_MODEL, device="cpu"), describer_for(PRETRAINED, device="cpu")
    results: dict[str, dict] = {}
    students: dict[str, Describer] = {}
    for folder in args.real:
        for revisit_set in find_revisit_sets(folder):
            references = [read_rgb(path) for path in revisit_set.references]
            queries = [read_rgb(path) for path in revisit_set.queries]
            truth = revisit_set.ground_truth()
            row = {"references": len(references), "queries": len(queries),
                   "teacher": recall_at_1(teacher, references, queries, truth),
                   "gem": recall_at_1(gem, references, queries, truth)}
            for name in variants:
                config = load_distill_config(None, [f"model={json.dumps(variant_config(name))}"])
                with tempfile.TemporaryDirectory() as run:
                    for epochs in (0, shipped.epochs):
                        started = time.monotonic()
                        config_now = type(config).from_dict({**config.to_dict(), "epochs": epochs}, "bench")
                        distil(lambda: references, len(references), run, config_now, revisit_set.name,
                               resume=epochs > 0, show_progress=False)
                        student = describer_for(str(Path(run) / STUDENT_FILE), device="cpu")
                        key = f"{name} {'distilled' if epochs else 'k-means'}"
                        row[key] = recall_at_1(student, references, queries, truth)
                        row[key + " s"] = time.monotonic() - started
                students[name] = student
            results[revisit_set.name] = row
            print(revisit_set.name, {k: round(v, 3) for k, v in row.items()}, flush=True)
    timing = describe_ms({"teacher": teacher, **students}, args.rounds)
    dims = {"teacher": teacher.dim, **{name: s.dim for name, s in students.items()}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "student.json").write_text(json.dumps({"sets": results, "describe_ms": timing, "dims": dims}, indent=1))
    lines = ["| set | teacher (default) | GeM | " + " | ".join(
        f"{name} k-means | {name} distilled" for name in variants) + " |",
        "|---|---:|---:|" + "---:|---:|" * len(variants)]
    for set_name, row in results.items():
        cells = [f"{100 * row['teacher']:.1f}", f"{100 * row['gem']:.1f}"]
        for name in variants:
            cells += [f"{100 * row[name + ' k-means']:.1f}", f"{100 * row[name + ' distilled']:.1f}"]
        lines.append(f"| {set_name} ({row['queries']} queries) | " + " | ".join(cells) + " |")
    mean = {key: np.mean([row[key] for row in results.values()]) for key in
            ["teacher", "gem"] + [f"{n} {k}" for n in variants for k in ("k-means", "distilled")]}
    lines.append("| mean | " + " | ".join(f"{100 * mean[k]:.1f}" for k in mean) + " |")
    lines += ["", "| model | descriptor | describe() ms, 640x480 | x teacher |", "|---|---:|---:|---:|"]
    for name, ms in timing.items():
        lines.append(f"| {name} | {dims[name]}-d | {ms:.2f} | {ms / timing['teacher']:.2f} |")
    (out / "student.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
