"""The node's output message: one tscm_ros/LoopCandidates per processed image (see msg/LoopCandidates.msg)."""

from __future__ import annotations

import math

from tscm_ros.detect.detection import Match
from tscm_ros.io.geometry import Pose
from tscm_ros.msg import LoopCandidate, LoopCandidates


def fill_pose(target, pose: Pose) -> None:
    """Set a geometry_msgs/Pose from a ``geometry.Pose``."""
    target.position.x, target.position.y, target.position.z = (float(v) for v in pose.position)
    (target.orientation.x, target.orientation.y,
     target.orientation.z, target.orientation.w) = (float(v) for v in pose.orientation)


def loop_candidates_message(header, pose: Pose | None, pose_frame_id: str, map_frame_id: str, fingerprint: str,
                            candidates: list[Match]) -> LoopCandidates:
    """The message for one image: its header and pose, and ``candidates`` (best first) with every stage's
    result."""
    out = LoopCandidates()
    out.header = header
    out.query_pose_valid = pose is not None
    if pose is not None:
        fill_pose(out.query_pose, pose)
        out.query_pose_frame_id = pose_frame_id
    out.map_frame_id = map_frame_id
    out.model_fingerprint = fingerprint
    for candidate in candidates:
        item = LoopCandidate(keyframe_id=candidate.keyframe_id, distance=candidate.distance,
                             score=candidate.score, consistent=candidate.consistent)
        item.keyframe_stamp.sec, item.keyframe_stamp.nanosec = divmod(candidate.stamp_ns, 1_000_000_000)
        item.keyframe_pose_valid = candidate.pose is not None
        if candidate.pose is not None:
            fill_pose(item.keyframe_pose, candidate.pose)
        if not math.isnan(candidate.sequence_score):
            item.sequence_score = candidate.sequence_score
        check = candidate.verification
        if check is not None:
            item.verified, item.inliers = check.verified, check.inliers
            item.relative_pose_valid = check.rotation is not None
            if check.rotation is not None:
                fill_pose(item.relative_pose, Pose(position=check.translation, orientation=check.rotation))
        out.candidates.append(item)
    return out
