"""train: train the teacher, then distil the student from it (TSCM cross-metric distillation)."""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from tscm_ros.cli.common import add_frame_reader_arguments, check_output_path, frame_source_from_args, run_main
from tscm_ros.errors import ConfigError

DESCRIPTION = """\
`train student --bag RECORDING --out RUN` distils the compact student from the default model on the
recording's own frames, without labels or poses (config/train_distill.yaml): the path for a new site. Then
build the map with it: `build_map --bag ... --model RUN/student.pt`. Interrupted, it continues with --resume.

Labelled training, on a dataset made by extract_dataset: `train teacher` trains the large teacher with a triplet
loss over hard-mined negatives; `train student` distils the small student from a trained teacher
(L_hard + L_soft + L_cm). Settings come from config/train_<kind>.yaml (or --config), each
overridable with --set key=value. Every epoch measures recall@1/5/10 on the val split, keeps
best.pt, saves last.pt (continue an interrupted run with --resume) and writes metrics.csv and
learning_curves.png into the run directory. Multi-GPU: launch with
`torchrun --nproc_per_node=N -m tscm_ros.cli.train ...`.
"""

EXAMPLE = """\
examples:
  train student --bag site_run1 --out runs/site_student
  build_map --bag site_run1 --out maps/site --model runs/site_student/student.pt
  train teacher --data data/campus --out runs/teacher
  train student --data data/campus --teacher runs/teacher/best.pt --out runs/student --set epochs=20 --set lr=3e-4
  train student --data data/campus --teacher runs/teacher/best.pt --out runs/student --resume
"""


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface of train (sub-commands teacher and student)."""
    parser = argparse.ArgumentParser(
        prog="train", description=DESCRIPTION, epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    kinds = parser.add_subparsers(dest="kind", required=True, metavar="{teacher,student}")
    kinds_help = (("teacher", "train the teacher (triplet loss)"),
                  ("student", "distil the compact student from a recording (--bag, no labels) or from a trained "
                   "teacher (--data)"))
    for kind, help_text in kinds_help:
        sub = kinds.add_parser(kind, help=help_text, description=help_text)
        if kind == "student":
            source = sub.add_mutually_exclusive_group(required=True)
            source.add_argument("--bag", action="append", metavar="BAG",
                                help="distil without labels from this recording (rosbag2; repeatable): the teacher "
                                "describes its frames and the compact student learns its metric space "
                                "(config/train_distill.yaml); RUN/student.pt is the student")
            source.add_argument("--data", action="append", metavar="DIR",
                                help="dataset directory made by extract_dataset (labelled TSCM distillation from a "
                                "trained teacher); repeat to train on several sites at once")
            sub.add_argument("--teacher", metavar="MODEL",
                             help="with --bag: 'default' (the default model, with a vocabulary fitted on the "
                             "recording; the default) or a checkpoint; with --data: the trained teacher's best.pt")
            add_frame_reader_arguments(sub)
        else:
            sub.add_argument("--data", required=True, action="append", metavar="DIR",
                             help="dataset directory made by extract_dataset; repeat to train on several sites at once")
        sub.add_argument("--out", required=True, metavar="RUN",
                         help="run directory (created; must be new unless --resume)")
        sub.add_argument("--config", metavar="YAML", help=f"training config (default: config/train_{kind}.yaml; "
                         "with --bag, config/train_distill.yaml)" if kind == "student" else
                         f"training config (default: config/train_{kind}.yaml)")
        sub.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                         help="override a config setting, e.g. --set epochs=10 --set lr=3e-4 --set device=cpu "
                         "(repeatable)")
        sub.add_argument("--resume", action="store_true",
                         help="continue RUN after its last completed epoch "
                         "(settings from RUN/config.yaml plus any --set)")
        sub.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _distil(args) -> int:
    from tscm_ros.train.distillation import distil, load_distill_config

    run_config = Path(args.out) / "config.yaml"
    overrides = list(args.set) + ([f"teacher={args.teacher}"] if args.teacher else [])
    if args.resume and run_config.is_file():
        config = load_distill_config(run_config, overrides)
    else:
        config = load_distill_config(args.config, overrides)
    sources = [frame_source_from_args(args, bag) for bag in args.bag]
    readers = [source.open() for source in sources]  # BagError names a bag that cannot be read, before any work

    def frames():
        for reader in readers:
            yield from (frame.image for frame in reader)

    recording = "+".join(Path(bag).name for bag in args.bag)
    result = distil(frames, sum(len(reader) for reader in readers), args.out, config, recording,
                    resume=args.resume, show_progress=not args.no_progress)
    print(f"train student: distilled from {result.teacher} on {result.frames} frames of {recording} in "
          f"{result.epochs} epoch(s), final loss {result.final_loss:.4f}; checkpoint {result.checkpoint} "
          f"(fingerprint {result.fingerprint})")
    return 0


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    check_output_path(args.out)
    if getattr(args, "bag", None):
        return _distil(args)
    if args.kind == "student" and not args.teacher:
        raise ConfigError("train student --data needs --teacher (the trained teacher's best.pt)")

    from tscm_ros.train.config import default_config_path, load_train_config
    from tscm_ros.train.training import train
    from tscm_ros.train.validation import MAX_RECALL_KEY

    run_config = Path(args.out) / "config.yaml"
    if args.resume and run_config.is_file():
        if args.config:
            logging.getLogger("train").warning("resuming with %s; --config %s is not used", run_config, args.config)
        config = load_train_config(run_config, args.set)
    else:
        config = load_train_config(args.config or default_config_path(args.kind), args.set)
    result = train(
        args.kind,
        args.data,
        args.out,
        config,
        teacher_path=getattr(args, "teacher", None),
        resume=args.resume,
        progress=not args.no_progress,
    )
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    best = result.best_val_recall
    recall = "/".join(f"{100 * best[n]:.1f}" for n in (1, 5, 10)) + " %" if best else "n/a"
    if best:
        recall += f", max recall at 100 % precision {100 * best[MAX_RECALL_KEY]:.1f} %"
    stopped = f" (stopped early: {result.stop_reason or 'no better validation'})" if result.stopped_early else ""
    print(
        f"train {args.kind}: {result.epochs_done} epoch(s){stopped}; "
        f"best val recall@1/5/10 {recall} at epoch {result.best_epoch}; checkpoint {Path(args.out) / 'best.pt'}"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: train a teacher or a student; exit code 2 with ``error: ...`` on bad input."""
    return run_main(_main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
