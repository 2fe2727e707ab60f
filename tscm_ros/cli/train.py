"""train: train the teacher, then distil the student from it (TSCM cross-metric distillation)."""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence

from tscm_ros.cli.common import check_output_path, run_main

DESCRIPTION = """\
Train on a dataset made by extract_dataset. `train teacher` trains the large teacher with a triplet
loss over hard-mined negatives; `train student` distils the small student from a trained teacher
(L_hard + L_soft + L_cm). Settings come from config/train_<kind>.yaml (or --config), each
overridable with --set key=value. Every epoch measures recall@1/5/10 on the val split, keeps
best.pt, saves last.pt (continue an interrupted run with --resume) and writes metrics.csv and
learning_curves.png into the run directory. Multi-GPU: launch with
`torchrun --nproc_per_node=N -m tscm_ros.cli.train ...`.
"""

EXAMPLE = """\
examples:
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
    kinds_help = (("teacher", "train the teacher (triplet loss)"), ("student", "distil the student from a teacher"))
    for kind, help_text in kinds_help:
        sub = kinds.add_parser(kind, help=help_text, description=help_text)
        sub.add_argument("--data", required=True, action="append", metavar="DIR",
                         help="dataset directory made by extract_dataset; repeat to train on several sites at once")
        if kind == "student":
            sub.add_argument("--teacher", required=True, metavar="CKPT",
                             help="trained teacher checkpoint (its best.pt)")
        sub.add_argument("--out", required=True, metavar="RUN",
                         help="run directory (created; must be new unless --resume)")
        sub.add_argument("--config", metavar="YAML", help=f"training config (default: config/train_{kind}.yaml)")
        sub.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                         help="override a config setting, e.g. --set epochs=10 --set lr=3e-4 --set device=cpu "
                         "(repeatable)")
        sub.add_argument("--resume", action="store_true",
                         help="continue RUN after its last completed epoch "
                         "(settings from RUN/config.yaml plus any --set)")
        sub.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    check_output_path(args.out)
    from pathlib import Path

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
