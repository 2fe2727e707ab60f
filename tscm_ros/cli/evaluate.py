"""evaluate: recall@N of one or more models side by side.

Modes (exactly one): ``--data DIR`` measures place recognition on a dataset split made by
extract_dataset (queries against the database); ``--bag DIR --query-bag DIR`` measures loop-closure
detection through the node's own code path (tscm_ros.loop_evaluation).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from tscm_ros.atomic import atomic_directory
from tscm_ros.cli.common import run_main
from tscm_ros.errors import ConfigError
from tscm_ros.loop_evaluation import add_bag_arguments, run_bag_evaluation

PRETRAINED = "pretrained"
DEFAULT_STUDENT = "default"

DESCRIPTION = """\
Measure recall@N (a query counts as found when one of its top-N database matches lies within
--radius-m of it) for each --model, side by side, and write recall.md (Markdown table),
recall.png (recall@N curves) and recall.json into --out. --model takes a checkpoint (teacher or
student best.pt), 'pretrained' for the baseline (ImageNet-pretrained CNN + GeM, no place-recognition
training) or 'default' for the default model (the shipped pretrained student the node uses without --model).

With --bag REFERENCE --query-bag QUERY instead of --data: loop-closure evaluation. A map is built per
method from the reference traversal, every query frame runs through the node's code path, and
recall@N, the top-1 precision-recall curve, average precision, maximum recall at 100 % precision and
the per-query latency are written side by side (loop_closure.md/.json, pr_curve.png,
trajectories.png), with the built-in baselines (--baselines) next to the given models.
"""

EXAMPLE = """\
example:
  evaluate --data data/campus --model runs/teacher/best.pt --model runs/student/best.pt --model pretrained --out eval/campus
  evaluate --bag routes/t0 --query-bag routes/t1 --model student=runs/student/best.pt --out eval/loops
"""


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface of evaluate."""
    parser = argparse.ArgumentParser(
        prog="evaluate", description=DESCRIPTION, epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--data", metavar="DIR", help="dataset directory made by extract_dataset")
    mode.add_argument("--bag", metavar="DIR",
                      help="reference traversal (rosbag2): loop-closure evaluation against a map of it; "
                      "queries from --query-bag")
    parser.add_argument("--model", action="append", metavar="CKPT",
                        help=f"model checkpoint (NAME=CKPT in bag mode), '{PRETRAINED}' (CNN + GeM baseline) "
                        f"or '{DEFAULT_STUDENT}' (repeatable; at least one with --data)")
    parser.add_argument("--out", required=True, metavar="DIR", help="directory for recall.md, recall.png, recall.json")
    parser.add_argument("--split", choices=("train", "val", "test"), default="test", help="dataset split (default test)")
    parser.add_argument("--radius-m", type=float, default=None, metavar="M",
                        help="a retrieved frame is correct within M metres of the query "
                        "(default 25 with --data, 10 with --bag)")
    parser.add_argument("--ns", type=int, nargs="+", default=[1, 5, 10, 20], metavar="N", help="recall@N values (default 1 5 10 20)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default auto)")
    parser.add_argument("--batch-size", type=int, default=16, help="images per forward pass (default 16)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    add_bag_arguments(parser)
    return parser


def _describer(model: str, device: str, batch_size: int):
    from tscm_ros.describe import Describer, pretrained_baseline

    if model == PRETRAINED:
        return pretrained_baseline(device=device, batch_size=batch_size)
    return Describer.from_checkpoint(None if model == DEFAULT_STUDENT else model, device=device, batch_size=batch_size)


def _run_data(args: argparse.Namespace) -> tuple[list, str]:
    from tscm_ros.dataset import load_dataset, require_split
    from tscm_ros.recall import evaluate_split

    dataset = load_dataset(args.data)
    database, queries = require_split(dataset, args.split)
    describers = [(model, _describer(model, args.device, args.batch_size)) for model in args.model]
    results = [
        (f"{model} ({describer.model_name})", evaluate_split(dataset, args.split, describer, args.radius_m, args.ns))
        for model, describer in describers
    ]
    title = (
        f"{Path(args.data).name}, {args.split} split: {len(queries)} queries against {len(database)} database frames, "
        f"correct within {args.radius_m:g} m"
    )
    return results, title


def _write_report(results: list, title: str, out: Path, overwrite: bool) -> None:
    from tscm_ros.reporting import plot_recall_curves, recall_table_markdown

    if out.exists() and not overwrite:
        raise ConfigError(f"output {out} already exists (choose another path or pass --overwrite)")
    with atomic_directory(out) as staging:
        (staging / "recall.md").write_text(recall_table_markdown(results, title), encoding="utf-8")
        plot_recall_curves(results, str(staging / "recall.png"), title)
        summary = {
            "title": title,
            "models": [
                {"model": name, "recall": {str(n): r for n, r in result.recall.items()}, "queries": result.num_queries,
                 "queries_without_match": result.num_skipped}
                for name, result in results
            ],
        }
        (staging / "recall.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    if args.bag:
        return run_bag_evaluation(args)
    if not args.model:
        raise ConfigError("--data needs at least one --model (a checkpoint, 'pretrained' or 'default')")
    if args.radius_m is None:
        args.radius_m = 25.0
    if args.radius_m <= 0 or any(n < 1 for n in args.ns) or args.batch_size < 1:
        raise ConfigError("--radius-m, --ns and --batch-size must be positive")
    args.ns = sorted(set(args.ns))
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise ConfigError(f"output {out} already exists (choose another path or pass --overwrite)")
    results, title = _run_data(args)
    _write_report(results, title, out, args.overwrite)
    from tscm_ros.reporting import recall_table_markdown

    print(recall_table_markdown(results, title), end="")
    print(f"wrote {out / 'recall.md'}, {out / 'recall.png'}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: evaluate models; exit code 2 with ``error: ...`` on bad input."""
    return run_main(_main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
