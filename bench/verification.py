"""Does geometric verification earn its place? Inlier counts of true and false candidate pairs.

For every revisit set under --real (ref/, query/, gt.csv) and for rendered traversals of the box town and
the garden, a map of the references is built the node's way (the default model), each query's five best
candidates are verified against it (tscm_ros/detect/verification.py: ORB, mutual ratio-tested matches, RANSAC
fundamental matrix, or the essential matrix for the renders, whose intrinsics are known), and the pairs
are split by the ground truth into true and false. Reported per set: the inliers of true and false
pairs (10th / 50th / 90th percentile), and for each min_inliers the share of true pairs kept and of false
pairs rejected (the target: keep at least 90 %, reject at least 90 %), for the top-1 candidates alone and
for all five.

    python -m bench.verification --real ../shared/realdata      # a few minutes on 2 cores
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np

from tscm_ros.describe.describer import DEFAULT_MODEL, describer_for
from tscm_ros.describe.local_features import extract_local_features
from tscm_ros.detect.detection import MatchingConfig
from tscm_ros.detect.loop_detector import LoopDetector
from tscm_ros.detect.verification import CameraIntrinsics, VerificationConfig, verify
from tscm_ros.evaluate.loop_evaluation import build_descriptor_map, reference_keyframes
from tscm_ros.evaluate.loop_metrics import within_radius
from tscm_ros.io.bag import FrameSource
from tscm_ros.io.revisit_set import find_revisit_sets
from tscm_ros.sim.simulate import simulate_route

REPO = Path(__file__).resolve().parent.parent

THRESHOLDS = (8, 12, 15, 20, 30)
TOP = 5
RENDERED = [("town", 41, "season"), ("town", 41, "night"), ("garden", 41, "season"), ("garden", 41, "clutter")]
FOCAL_PX = 120.0 / math.tan(math.radians(35.0))


def pairs(describer, keyframes, queries, truth, intrinsics) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(inliers, true, rank) of every query's ``TOP`` best candidates."""
    keyframes = list(keyframes)
    keyframe_map, describer = build_descriptor_map(describer, keyframes)
    detector = LoopDetector(describer, keyframe_map, MatchingConfig(k=TOP, min_score=0.0, exclude_recent_s=0.0))
    inliers, correct, ranks = [], [], []
    for q, frame in enumerate(queries):
        features = extract_local_features(frame.image)
        for rank, candidate in enumerate(detector.process(frame.image, frame.stamp_ns).candidates):
            check = verify(features, keyframe_map.local_features(candidate.keyframe_id), VerificationConfig(),
                           intrinsics)
            inliers.append(check.inliers)
            correct.append(bool(truth[q, candidate.keyframe_id]))
            ranks.append(rank)
    return np.array(inliers), np.array(correct), np.array(ranks)


def rows(name: str, inliers: np.ndarray, correct: np.ndarray, ranks: np.ndarray) -> list[str]:
    out = []
    for label, chosen in (("top-1", ranks == 0), ("top-5", ranks >= 0)):
        true, false = inliers[chosen & correct], inliers[chosen & ~correct]
        cells = [f"{np.percentile(x, [10, 50, 90]).round().astype(int).tolist() if len(x) else '-'}"
                 for x in (true, false)]
        kept = [(true >= t).mean() if len(true) else math.nan for t in THRESHOLDS]
        rejected = [(false < t).mean() if len(false) else math.nan for t in THRESHOLDS]
        shares = [f"{k:.2f} / {r:.2f}" for k, r in zip(kept, rejected)]
        out.append(f"| {name} | {label} | {len(true)} / {len(false)} | {cells[0]} | {cells[1]} | " + " | ".join(shares)
                   + " |")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--real", action="append", default=[], metavar="DIR", help="folder of revisit sets")
    parser.add_argument("--work", default=str(REPO / ".cache" / "bench" / "verification"), help="rendered routes")
    args = parser.parse_args()
    describer = describer_for(DEFAULT_MODEL, device="cpu")
    lines = ["| set | pairs | true / false pairs | true inliers p10 / p50 / p90 | false inliers p10 / p50 / p90 | "
             + " | ".join(f"keep / reject at {t}" for t in THRESHOLDS) + " |",
             "|---|---|---:|---|---|" + "---:|" * len(THRESHOLDS)]
    for real in args.real:
        for revisit_set in find_revisit_sets(real):
            result = pairs(describer, revisit_set.reference_frames(), revisit_set.query_frames(),
                           revisit_set.ground_truth(), None)
            lines += rows(revisit_set.name, *result)
    intrinsics = CameraIntrinsics(FOCAL_PX, FOCAL_PX, 160.0, 120.0)
    for world, seed, condition in RENDERED:
        route = dict(seed=seed, frames=80, route_length_m=160.0, aliasing=0.3, world=world, progress=False)
        reference = Path(args.work) / f"{world}{seed}_day"
        query = Path(args.work) / f"{world}{seed}_{condition}"
        if not reference.exists():
            simulate_route(reference, traversal=0, condition="day", **route)
        if not query.exists():
            simulate_route(query, traversal=1, condition=condition, **route)
        keyframes = list(reference_keyframes(FrameSource(reference), 2.0))
        queries = [f for f in FrameSource(query).open() if f.pose is not None]
        truth = within_radius(np.array([f.pose.position for f in queries]),
                              np.array([f.pose.position for f in keyframes]), 5.0)
        lines += rows(f"{world} {condition} (rendered)", *pairs(describer, keyframes, queries, truth, intrinsics))
    report = "\n".join(lines) + "\n"
    print(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
