"""Pretrain the default student that ships in the package (`make pretrain`).

Renders training worlds (seeds of their own: none is a benchmark site, a test route or the demo world),
each in four traversals under different conditions (day, night, haze, season, clutter, dusk), extracts
one dataset per world with the README's command (the last traversal validates), trains one teacher
on all of them, distils the student from it, and writes the student in half precision to
tscm_ros/weights/default_student.pt (the model behind `Describer.from_checkpoint(None)`), with its
score calibration fitted on the validation traversals.

    python tools/pretrain_default.py [--work DIR]     # about an hour on 2 CPU cores (measured while shared)
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

WORLDS = [  # seed, lap length (m), aliasing
    (101, 160.0, 0.2),
    (102, 140.0, 0.0),
    (103, 180.0, 0.3),
    (104, 150.0, 0.1),
]
CONDITIONS = ["night", "haze", "season", "clutter", "auto"]
SPACING_M = 2.0
RADIUS_M = 5.0  # a match is a true loop within this distance (what 'auto' radii give at 2 m spacing)
TEACHER = ["--set", "augment_views=4", "--set", "epochs=4"]
STUDENT = ["--set", "augment_views=4", "--set", "epochs=10"]


def run(argv: list[str]) -> None:
    print("+", " ".join(argv), flush=True)
    subprocess.run([sys.executable, "-m", *argv], cwd=REPO, check=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default=str(REPO / ".cache" / "pretrain"),
                        help="working directory (bags, datasets, runs)")
    parser.add_argument("--reuse-teacher", action="store_true",
                        help="keep WORK/runs/teacher when it has a best.pt (re-distil the student only)")
    parser.add_argument("--package-only", action="store_true",
                        help="no training: write the default from WORK/runs/student/best.pt "
                        "(half precision, calibrated)")
    args = parser.parse_args()
    work = Path(args.work)
    started = time.monotonic()
    datasets = []
    for index, (seed, length, aliasing) in enumerate(WORLDS):
        bags = []
        conditions = ["day"] + [CONDITIONS[(index + k) % len(CONDITIONS)] for k in range(3)]
        for traversal, condition in enumerate(conditions):
            bag = work / "bags" / f"world{seed}_t{traversal}_{condition}"
            if not bag.exists():
                run(["tscm_ros.cli.simulate_route", "--out", str(bag), "--seed", str(seed), "--traversal",
                     str(traversal), "--frames", str(int(length / SPACING_M)), "--route-length", str(length),
                     "--condition", condition, "--aliasing", str(aliasing)])
            bags.append(bag)
        data = work / "data" / f"world{seed}"
        run(["tscm_ros.cli.extract_dataset", *[a for bag in bags for a in ("--bag", str(bag))], "--out", str(data),
             "--every-m", "2", "--overwrite", "--no-progress"])
        datasets.append(data)
    data_args = [a for data in datasets for a in ("--data", str(data))]
    runs = work / "runs"
    if args.package_only:
        pass
    elif args.reuse_teacher and (runs / "teacher" / "best.pt").is_file():
        print(f"reusing the teacher {runs / 'teacher' / 'best.pt'}")
        shutil.rmtree(runs / "student", ignore_errors=True)
    else:
        shutil.rmtree(runs, ignore_errors=True)
        run(["tscm_ros.cli.train", "teacher", *data_args, "--out", str(runs / "teacher"), "--no-progress", *TEACHER])
    if not args.package_only:
        run(["tscm_ros.cli.train", "student", *data_args, "--teacher", str(runs / "teacher" / "best.pt"),
             "--out", str(runs / "student"), "--no-progress", *STUDENT])

    from tscm_ros.checkpoint import load_checkpoint, save_checkpoint
    from tscm_ros.describe import DEFAULT_WEIGHTS
    from tscm_ros.validation import calibrate_checkpoint

    student = load_checkpoint(runs / "student" / "best.pt")
    extra = {key: value for key, value in student.extra.items() if key != "score_calibration"}
    extra.update(pretrained_on=[f"world{seed}" for seed, _, _ in WORLDS],
                 reproduce="make pretrain (tools/pretrain_default.py)")
    DEFAULT_WEIGHTS.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(DEFAULT_WEIGHTS, student.model.half(), student.model_config, student.preprocess, extra)
    # The calibration is fitted on the shipped (half-precision) weights themselves.
    calibration = calibrate_checkpoint(DEFAULT_WEIGHTS, datasets, RADIUS_M, half=True)
    fingerprint = load_checkpoint(DEFAULT_WEIGHTS).fingerprint
    print(f"pretrain: calibration on {calibration.queries} val queries: score >= 0.95 at raw similarity "
          f">= {calibration.min_similarity(0.95):.3f}")
    minutes = (time.monotonic() - started) / 60
    print(f"pretrain: wrote {DEFAULT_WEIGHTS.relative_to(REPO)} ({DEFAULT_WEIGHTS.stat().st_size / 1e6:.1f} MB, "
          f"fingerprint {fingerprint}) in {minutes:.0f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
