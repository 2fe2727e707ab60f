"""Benchmark: images of places the map does not hold, under the revisit's own light.

Each real revisit set's map is built as build_map builds one (its own vocabulary) from the first half of its
references only. All its queries then go, in order, through the node's detector at its shipped defaults
(``LoopDetector``: min_score 0.99, sequence evidence, verification evidence for camera-sized images). A query
whose true places all lie in the removed half shows a place the map does not hold, seen under the same light
as the revisit: anything published for it is a false loop. Per set: those queries and how many were
published, and for the queries whose place the half map holds, published precision and recall.

    . ./env.sh && python -m bench.unmapped --real ../shared/realdata [--real MORE_SETS]
"""

from __future__ import annotations

import argparse
import itertools
import time

import numpy as np

from tscm_ros.describe.describer import DEFAULT_MODEL, describer_for
from tscm_ros.detect.detection import MatchingConfig
from tscm_ros.detect.loop_detector import LoopDetector
from tscm_ros.detect.temporal import TemporalConfig
from tscm_ros.evaluate.loop_evaluation import build_descriptor_map
from tscm_ros.io.revisit_set import RevisitSet, find_revisit_sets


def half_map_run(revisit_set: RevisitSet, base) -> dict:
    """Published loops of every query against a map of the first half of the references."""
    kept = len(revisit_set.references) // 2
    keyframe_map, describer = build_descriptor_map(base, itertools.islice(revisit_set.reference_frames(), kept))
    detector = LoopDetector(describer, keyframe_map, MatchingConfig(exclude_recent_s=0.0, exclude_within_m=0.0),
                            temporal=TemporalConfig())
    truth = revisit_set.ground_truth()
    held, unmapped = truth[:, :kept].any(axis=1), truth.any(axis=1) & ~truth[:, :kept].any(axis=1)
    published = np.full(len(truth), -1)
    for frame in revisit_set.query_frames():
        accepted = detector.process(frame.image, frame.stamp_ns).accepted
        if accepted:
            published[frame.index] = accepted[0].keyframe_id
    right = np.array([truth[q, k] for q, k in enumerate(published) if k >= 0 and held[q]], dtype=bool)
    return {"set": revisit_set.name, "keyframes": kept, "unmapped": int(unmapped.sum()),
            "unmapped_published": int(((published >= 0) & unmapped).sum()), "held": int(held.sum()),
            "precision": float(right.mean()) if len(right) else float("nan"),
            "recall": float(right.sum() / max(1, held.sum()))}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--real", action="append", required=True, metavar="DIR",
                        help="a folder of revisit sets (ref/, query/, gt.csv), or one set; repeatable")
    args = parser.parse_args(argv)
    base = describer_for(DEFAULT_MODEL, device="cpu")
    sets = [revisit_set for directory in args.real for revisit_set in find_revisit_sets(directory)]
    print("| set | map (first half) | queries of unmapped places | of them published | queries of mapped places "
          "| published precision % | published recall % |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for revisit_set in sets:
        started = time.perf_counter()
        row = half_map_run(revisit_set, base)
        precision = "n/a" if np.isnan(row["precision"]) else f"{100 * row['precision']:.1f}"
        print(f"| {row['set']} | {row['keyframes']} | {row['unmapped']} | {row['unmapped_published']} | {row['held']} "
              f"| {precision} | {100 * row['recall']:.1f} |", flush=True)
        print(f"  ({row['set']}: {time.perf_counter() - started:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
