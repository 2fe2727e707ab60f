"""extract_dataset: turn rosbag2 recordings (several traversals of one area) into a training dataset."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from tscm_ros.cli.common import (
    add_frame_reader_arguments,
    check_output_path,
    finite_number,
    frame_source_from_args,
    run_main,
)
from tscm_ros.errors import ConfigError
from tscm_ros.io.dataset_extraction import SPLIT_MODES, SamplingConfig, SplitConfig, extract_dataset

DESCRIPTION = """\
Extract images with poses from one or more rosbag2 recordings into a place-recognition dataset:
images/, frames.csv (image, stamp, position, orientation, bag, sequence, split, role) and
manifest.json. Each bag is one traversal (sequence). The split is chosen from the data (--split
auto, printed with its reason): on a small site (under 300 m across) recorded in three or more
traversals, the last traversal is held out as the validation queries against the first, and the
others train; otherwise frames are split into train / val / test by place (grid cells sized to the
site, with a buffer so test places are never trained on). Within each split the first
--database-bags bags are the database and the others the queries.
"""

EXAMPLE = """\
example:
  extract_dataset --bag run1 --bag run2 --bag run3 --out data/site --every-m 2
"""


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface of extract_dataset."""
    parser = argparse.ArgumentParser(
        prog="extract_dataset",
        description=DESCRIPTION,
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--bag", action="append", required=True, metavar="DIR",
                        help="rosbag2 directory (repeat for several traversals; order sets sequence ids)")
    parser.add_argument("--out", required=True, metavar="DIR", help="dataset directory to create")
    add_frame_reader_arguments(parser)
    parser.add_argument("--every-m", type=finite_number, default=0.0, metavar="M",
                        help="keep a frame only after travelling M metres since the last kept one (default 0: off)")
    parser.add_argument("--every-s", type=finite_number, default=0.0, metavar="S",
                        help="keep a frame only S seconds after the last kept one (default 0: off)")
    parser.add_argument("--split", choices=SPLIT_MODES, default="auto", dest="split_mode",
                        help="auto (default): 'traversal' for a site under 300 m across with >= 3 bags, else "
                        "'places'; traversal: the last bag is the val queries; places: grid cells")
    parser.add_argument("--cell-m", type=finite_number, default=None, metavar="M",
                        help="places split: size of the square place cells assigned whole to one split "
                        "(default: an eighth of the site's extent, 5 to 50 m)")
    parser.add_argument("--val-fraction", type=finite_number, default=0.15,
                        help="share of frames for validation (default 0.15)")
    parser.add_argument("--test-fraction", type=finite_number, default=0.15,
                        help="share of frames for testing (default 0.15)")
    parser.add_argument("--buffer-m", type=finite_number, default=None, metavar="M",
                        help="places split: drop frames closer than M metres to a place of a later split "
                        "(default: half a cell, at most 10)")
    parser.add_argument("--database-bags", type=int, default=1, metavar="N",
                        help="the first N bags form the database, the others the queries (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split (default 0)")
    parser.add_argument("--image-format", choices=("png", "jpg"), default="png", help="image file format (default png)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    out = check_output_path(args.out)
    if args.overwrite and out.is_dir():
        from tscm_ros.train.run import run_lock_holder  # torch: only for a directory to replace

        holder = run_lock_holder(out)
        if holder is not None:
            raise ConfigError(f"--overwrite: {out} is a training run in use: {holder} is training in it; replacing "
                              "it would pull the run out from under that process (wait for it to end, or stop it)")
    manifest = extract_dataset(
        sources=[frame_source_from_args(args, bag) for bag in args.bag],
        out=args.out,
        sampling=SamplingConfig(every_m=args.every_m, every_s=args.every_s),
        split=SplitConfig(
            mode=args.split_mode,
            cell_m=args.cell_m,
            val_fraction=args.val_fraction,
            test_fraction=args.test_fraction,
            buffer_m=args.buffer_m,
            database_bags=args.database_bags,
            seed=args.seed,
        ),
        image_format=args.image_format,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    print(f"split: {manifest['split']['reason']}")
    splits = manifest["counts"]["splits"]
    summary = ", ".join(f"{name} {c['database']}+{c['query']}" for name, c in splits.items())
    print(
        f"wrote {args.out}: {manifest['counts']['frames']} frames from {len(args.bag)} bag(s) "
        f"(database+query: {summary}; {manifest['counts']['dropped_by_buffer']} dropped by the split buffer)"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: extract a dataset; exit code 2 with ``error: ...`` on bad input."""
    return run_main(_main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
