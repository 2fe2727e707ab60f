"""RTAB-Map's real indoor loop (test/data/rtabmap_loop, 512x384) against a map of the first half of its
references: images of the removed half show places the map does not hold, under the revisit's own light
(what bench/unmapped.py measures on every real set). None may be published; the mapped half's revisits
still are, right."""

from __future__ import annotations

import itertools
from pathlib import Path

from tscm_ros.describe.describer import DEFAULT_MODEL, describer_for
from tscm_ros.detect.detection import MatchingConfig
from tscm_ros.detect.loop_detector import LoopDetector
from tscm_ros.detect.temporal import TemporalConfig
from tscm_ros.evaluate.loop_evaluation import build_descriptor_map
from tscm_ros.io.revisit_set import RevisitSet

RTABMAP_LOOP = Path(__file__).parent / "data" / "rtabmap_loop"


def test_a_half_map_publishes_the_revisits_it_holds_and_none_of_the_places_it_does_not():
    revisit_set = RevisitSet.load(RTABMAP_LOOP)
    kept = len(revisit_set.references) // 2
    keyframe_map, describer = build_descriptor_map(describer_for(DEFAULT_MODEL, device="cpu"),
                                                   itertools.islice(revisit_set.reference_frames(), kept))
    detector = LoopDetector(describer, keyframe_map, MatchingConfig(exclude_recent_s=0.0), temporal=TemporalConfig())
    truth = revisit_set.ground_truth()
    held = truth[:, :kept].any(axis=1)
    unmapped = truth.any(axis=1) & ~held
    assert unmapped.sum() >= 10 and held.sum() >= 10
    published = {frame.index: detector.process(frame.image, frame.stamp_ns).accepted
                 for frame in revisit_set.query_frames()}
    assert not [q for q, accepted in published.items() if accepted and unmapped[q]]
    right = [q for q, accepted in published.items() if accepted and held[q] and truth[q, accepted[0].keyframe_id]]
    wrong = [q for q, accepted in published.items() if accepted and held[q] and not truth[q, accepted[0].keyframe_id]]
    assert len(right) >= 5 and not wrong
