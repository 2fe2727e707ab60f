"""build_map: build a keyframe map (FAISS index + metadata) from rosbag2 recordings."""

from __future__ import annotations

import argparse
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import cv2
import numpy as np

from tscm_ros.bag import Frame, FrameReader
from tscm_ros.cli.common import add_frame_reader_arguments, frame_source_from_args, run_main
from tscm_ros.describe import DEFAULT_MODEL, PRETRAINED, Describer, describer_for
from tscm_ros.errors import ConfigError, MapError
from tscm_ros.keyframe_map import KeyframeMap, KeyframeMeta
from tscm_ros.local_features import extract_local_features
from tscm_ros.loop_detector import KeyframeSelector
from tscm_ros.map_building import BUILD_FIT_KEYFRAMES, MIN_FIT_KEYFRAMES, KeyframeBuilder, describer_for_map
from tscm_ros.map_index import INDEX_TYPES, IndexConfig
from tscm_ros.progress import progress as progress_bar

THUMBNAIL_WIDTH = 64


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="build_map",
        description="Build a keyframe map for place recognition from rosbag2 recordings: frames with poses "
        "interpolated from the odometry, keyframes selected by travel/time (and optionally appearance), "
        "described by the model, stored in a FAISS index with their stamps and poses, and with the local "
        "features geometric verification needs (at most 18 kB per keyframe). The default model fits its VLAD "
        "vocabulary on the map's own keyframes (on the first --vocabulary-keyframes of them) and the map keeps "
        "it: the node describes its queries with it.",
        epilog="example: build_map --bag run1 --out maps/site --min-distance 2.0",
    )
    parser.add_argument("--bag", action="append", required=True, metavar="DIR",
                        help="rosbag2 directory (sqlite3 or mcap) or ROS 1 bag; repeat for several")
    parser.add_argument("--out", required=True, metavar="MAP", help="map directory to write")
    parser.add_argument("--model", metavar="MODEL", default=DEFAULT_MODEL,
                        help=f"'{DEFAULT_MODEL}' (the training-free VLAD that fits its vocabulary on this map; the "
                        f"default), '{PRETRAINED}' (the GeM baseline) or a checkpoint from train")
    add_frame_reader_arguments(parser)
    parser.add_argument("--min-distance", type=float, default=2.0, metavar="M",
                        help="a keyframe needs this much travel since the previous one (default 2.0; 0 = off)")
    parser.add_argument("--min-interval", type=float, default=0.0, metavar="S",
                        help="a keyframe needs this much time since the previous one (default 0 = off)")
    parser.add_argument("--max-similarity", type=float, metavar="SCORE",
                        help="skip frames whose descriptor scores at least this against the previous keyframe")
    parser.add_argument("--index", choices=INDEX_TYPES, default="flat", help="FAISS index type (default flat: exact)")
    parser.add_argument("--pca-dim", type=int, help="reduce descriptors with PCA learned from the map (large maps)")
    parser.add_argument("--thumbnails", action="store_true", help=f"store {THUMBNAIL_WIDTH}-px wide thumbnails")
    parser.add_argument("--vocabulary-keyframes", type=int, default=BUILD_FIT_KEYFRAMES, metavar="N",
                        help="fit the vocabulary on the first N keyframes (default %(default)s; a map of fewer than "
                        f"{MIN_FIT_KEYFRAMES} keeps the generic vocabulary; maps appended to keep theirs)")
    parser.add_argument("--device", default="auto", help="auto (GPU when present), cpu or cuda")
    parser.add_argument("--batch-size", type=int, default=16, help="images per inference batch (default 16)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--force", action="store_true", help="replace an existing map at --out")
    group.add_argument("--append", action="store_true", help="add to an existing map built with the same model")
    return parser


def _pose_frame_id(readers: Sequence[FrameReader], keyframe_map: KeyframeMap) -> str:
    """The one frame of all the bags' poses (and of the map's, when appending)."""
    frame_ids = {reader.pose_frame_id for reader in readers if reader.pose_frame_id}
    if keyframe_map.frame_id and len(keyframe_map):
        frame_ids.add(keyframe_map.frame_id)
    if len(frame_ids) > 1:
        raise MapError(f"poses in different frames ({', '.join(sorted(frame_ids))}): a map holds poses of one "
                       "frame; build one map per frame")
    return frame_ids.pop() if frame_ids else keyframe_map.frame_id


def _frames_in_background(readers: Sequence[FrameReader], batch_size: int, motion: KeyframeSelector,
                          counts: dict) -> Iterator[Frame]:
    """Frames that pass the travel/time test, decoded in a thread so decoding overlaps inference."""
    frames: queue.Queue = queue.Queue(maxsize=4 * batch_size)
    done = object()

    def read() -> None:
        try:
            with progress_bar(total=sum(len(r) for r in readers), unit="frame", desc="reading") as progress:
                for reader in readers:
                    for frame in reader:
                        progress.update()
                        counts["read"] += 1
                        position = frame.pose.position if frame.pose is not None else None
                        if motion.accept(frame.stamp_ns, position, None):
                            frames.put(frame)
        except BaseException as exc:  # handed to the consumer, which re-raises it
            frames.put(exc)
        frames.put(done)

    threading.Thread(target=read, name="build_map_reader", daemon=True).start()
    while (item := frames.get()) is not done:
        if isinstance(item, BaseException):
            raise item
        yield item


def _open_target(args, describer: Describer) -> KeyframeBuilder:
    out = Path(args.out)
    if out.exists() and not (args.force or args.append):
        raise MapError(f"{out} already exists: pass --force to replace it or --append to add to it")
    if args.append:
        if not out.exists():
            raise MapError(f"--append: {out} does not exist")
        keyframe_map = KeyframeMap.load(out, expected_fingerprint=describer.fingerprint,
                                        expected_model_name=describer.model_name)
        describer = describer_for_map(describer, keyframe_map)
    else:
        keyframe_map = KeyframeMap.for_describer(describer, IndexConfig(type=args.index, pca_dim=args.pca_dim))
    return KeyframeBuilder(describer, keyframe_map, args.vocabulary_keyframes)


def _thumbnail(image: np.ndarray) -> np.ndarray:
    height = max(1, round(image.shape[0] * THUMBNAIL_WIDTH / image.shape[1]))
    return cv2.resize(image, (THUMBNAIL_WIDTH, height), interpolation=cv2.INTER_AREA)


def _directory_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    readers = [frame_source_from_args(args, bag).open() for bag in args.bag]
    builder = _open_target(args, describer_for(args.model, device=args.device, batch_size=args.batch_size))
    keyframe_map = builder.map
    keyframe_map.frame_id = _pose_frame_id(readers, keyframe_map)
    # Travel and time pick candidate keyframes while reading; the appearance test, which needs their
    # descriptors, then drops candidates too similar to the previous keyframe.
    motion = KeyframeSelector(min_interval_s=args.min_interval, min_distance_m=args.min_distance)
    appearance = KeyframeSelector(max_similarity=args.max_similarity)
    counts = {"read": 0}
    kept_before = len(keyframe_map)
    started = time.perf_counter()

    batch: list[Frame] = []

    def describe_and_add(frames: list[Frame]) -> None:
        descriptors, maps = builder.describe([f.image for f in frames])
        described_by = builder.describer
        for row, (frame, frame_maps) in enumerate(zip(frames, maps)):
            if builder.describer is not described_by:  # the map fitted its vocabulary on a frame of this batch
                descriptors[row:] = builder.describer.aggregate(maps[row:])
                described_by = builder.describer
            descriptor = descriptors[row]
            position = frame.pose.position if frame.pose is not None else None
            if not appearance.accept(frame.stamp_ns, position, descriptor):
                continue
            meta = KeyframeMeta(stamp_ns=frame.stamp_ns, pose=frame.pose, bag=frame.bag,
                                thumbnail=_thumbnail(frame.image) if args.thumbnails else None,
                                local_features=extract_local_features(frame.image))
            builder.add_described(descriptor[None, :], [frame_maps], [meta])

    for frame in _frames_in_background(readers, args.batch_size, motion, counts):
        batch.append(frame)
        if len(batch) == args.batch_size:
            describe_and_add(batch)
            batch = []
    if batch:
        describe_and_add(batch)
    builder.finish()

    added = len(keyframe_map) - kept_before
    if added == 0:
        raise MapError(f"no keyframes were selected from {', '.join(args.bag)}; nothing written to {args.out}")
    keyframe_map.save(args.out)
    elapsed = time.perf_counter() - started
    for reader in readers:
        print(reader.summary())
    print(f"build_map: read {counts['read']} frames, kept {added} keyframes "
          f"({len(keyframe_map)} in the map) in {elapsed:.1f} s = {counts['read'] / elapsed:.1f} frames/s; "
          f"map {args.out}: {_directory_size(Path(args.out)) / 1e6:.2f} MB, model {builder.describer.model_name}"
          + (f", {keyframe_map.vocabulary.describe()}" if keyframe_map.vocabulary is not None else ""))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(_main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
