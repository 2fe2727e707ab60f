"""What every command-line tool shares: error reporting, logging set-up and the frame-reading options."""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from tscm_ros.errors import ConfigError, TscmError

if TYPE_CHECKING:
    from tscm_ros.io.bag import FrameSource

EXIT_USER_ERROR = 2


def run_main(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """Run a tool's main, turning user-facing errors into one ``error:`` line and exit code 2."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # which CPU build it picked, on every start
    try:
        return main(argv)
    except TscmError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def finite_number(text: str) -> float:
    """An option's number: NaN and infinity mean nothing for any of the tools' options."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def positive_number(text: str) -> float:
    """A finite number above 0."""
    value = finite_number(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a number above 0, got {text!r}")
    return value


def check_output_path(path: str | Path, option: str = "--out", directory: bool = True) -> Path:
    """``path`` as a Path, refused before any work (ConfigError) when it cannot be written: the nearest folder
    above it that exists is a file, or, for a ``directory`` output, the path itself is a file."""
    path = Path(path)
    for above in path.parents:
        if above.exists() or above.is_symlink():
            if not above.is_dir():
                raise ConfigError(f"{option} {path}: cannot create it, {above} is a file, not a directory")
            break
    if directory and path.exists() and not path.is_dir():
        raise ConfigError(f"{option} {path} is a file; give a directory to write")
    return path


def add_frame_reader_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """--image-topic, --pose-topic and --max-pose-gap: how every tool reads frames from bags (tscm_ros.io.bag)."""
    parser.add_argument("--image-topic",
                        help="sensor_msgs/Image or CompressedImage topic (default: the bag's only one)")
    parser.add_argument("--pose-topic", help="pose topic: Odometry, PoseStamped, PoseWithCovarianceStamped or "
                        "NavSatFix (default: the bag's only one, if any)")
    parser.add_argument("--max-pose-gap", type=positive_number, default=1.0, metavar="S",
                        help="frames across a gap longer than S seconds in the pose stream get no pose (default 1.0)")


def frame_source_from_args(args: argparse.Namespace, bag: str | Path) -> FrameSource:
    """``bag`` read as the options of :func:`add_frame_reader_arguments` say."""
    from tscm_ros.io.bag import FrameSource  # rosbags only for the tools that read bags

    return FrameSource(bag, image_topic=args.image_topic, pose_topic=args.pose_topic, max_gap_s=args.max_pose_gap)
