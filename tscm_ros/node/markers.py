"""RViz markers of the node (visualization_msgs/MarkerArray on ``~/loop_markers``): the map's keyframe
trajectory, and one line per published loop closure from the query pose to the keyframe pose, coloured by
score (red 0, yellow 0.5, green 1), in the map's frame. A loop whose query pose is unknown, or in another
frame than the map, is a sphere at the keyframe instead. config/loop_markers.rviz shows them."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from geometry_msgs.msg import Point
from std_msgs.msg import ColorRGBA
from visualization_msgs.msg import Marker

TRAJECTORY_NAMESPACE = "keyframes"
LOOP_NAMESPACE = "loops"
MAX_TRAJECTORY_POINTS = 20_000  # a larger map's trajectory is drawn from every n-th keyframe
MAX_LOOP_MARKERS = 1000  # loop marker ids cycle: RViz then replaces the oldest
DEFAULT_FRAME = "map"


def score_colour(score: float) -> ColorRGBA:
    """Red at 0, yellow at 0.5, green at 1."""
    score = float(np.clip(score, 0.0, 1.0))
    return ColorRGBA(r=float(min(1.0, 2.0 * (1.0 - score))), g=float(min(1.0, 2.0 * score)), b=0.0, a=1.0)


def _point(position) -> Point:
    return Point(x=float(position[0]), y=float(position[1]), z=float(position[2]))


def trajectory_marker(positions: np.ndarray, bags: list[str], frame_id: str, stamp) -> Marker:
    """The keyframes' path as a LINE_LIST between consecutive keyframes of the same recording that have a pose."""
    marker = Marker(ns=TRAJECTORY_NAMESPACE, id=0, type=Marker.LINE_LIST, action=Marker.ADD)
    marker.header.frame_id, marker.header.stamp = frame_id or DEFAULT_FRAME, stamp
    marker.pose.orientation.w = 1.0
    marker.scale.x = 0.15
    marker.color = ColorRGBA(r=0.6, g=0.6, b=0.6, a=0.8)
    step = max(1, -(-len(positions) // MAX_TRAJECTORY_POINTS))
    kept = np.arange(0, len(positions), step)
    for a, b in zip(kept[:-1], kept[1:]):
        if bags[a] == bags[b] and not (np.isnan(positions[a, 0]) or np.isnan(positions[b, 0])):
            marker.points += [_point(positions[a]), _point(positions[b])]
    return marker


def loop_marker(marker_id: int, score: float, keyframe_position, query_position, same_frame: bool, frame_id: str,
                stamp) -> Marker:
    """A loop closure: a line from the query to the keyframe, or a sphere at the keyframe when the query's pose
    is unknown or not in the map's frame."""
    marker = Marker(ns=LOOP_NAMESPACE, id=marker_id % MAX_LOOP_MARKERS, action=Marker.ADD)
    marker.header.frame_id, marker.header.stamp = frame_id or DEFAULT_FRAME, stamp
    marker.pose.orientation.w = 1.0
    marker.color = score_colour(score)
    if query_position is not None and same_frame:
        marker.type = Marker.LINE_LIST
        marker.scale.x = 0.1
        marker.points = [_point(query_position), _point(keyframe_position)]
    else:
        marker.type = Marker.SPHERE
        marker.pose.position = _point(keyframe_position)
        marker.scale.x = marker.scale.y = marker.scale.z = 0.8
    return marker


class LoopMarkerPublisher:
    """``~/loop_markers`` of ``node``: the trajectory of ``keyframe_map`` once, again when the map changed
    (``refresh``) and to each new subscriber, and a marker per published loop closure (``loops``)."""

    def __init__(self, node, keyframe_map_of: Callable[[], object], map_lock) -> None:
        from rclpy.event_handler import PublisherEventCallbacks
        from rclpy.qos import DurabilityPolicy, QoSProfile
        from visualization_msgs.msg import MarkerArray

        self._node, self._map_of, self._map_lock = node, keyframe_map_of, map_lock
        self._array = MarkerArray
        self._published_size = -1
        self._next_id = 0
        # transient local: an RViz started later gets the last array; a new subscriber also gets the trajectory
        qos = QoSProfile(depth=10, durability=DurabilityPolicy.TRANSIENT_LOCAL)
        self._publisher = node.create_publisher(
            MarkerArray, "~/loop_markers", qos,
            event_callbacks=PublisherEventCallbacks(matched=self._on_matched))

    def _on_matched(self, info) -> None:
        if info.current_count_change > 0:
            self._published_size = -1
            self.refresh()

    def refresh(self) -> None:
        """Publish the trajectory when the map changed since it was last published."""
        with self._map_lock:
            keyframe_map = self._map_of()
            if len(keyframe_map) == self._published_size:
                return
            self._published_size = len(keyframe_map)
            positions, bags, frame_id = np.array(keyframe_map.positions), keyframe_map.bags, keyframe_map.frame_id
        marker = trajectory_marker(positions, bags, frame_id, self._node.get_clock().now().to_msg())
        self._publisher.publish(self._array(markers=[marker]))

    def loops(self, candidates, query_pose, query_frame_id: str, map_frame_id: str, stamp) -> None:
        """One marker per published loop closure of an image."""
        markers = []
        same_frame = not (query_frame_id and map_frame_id) or query_frame_id == map_frame_id
        for candidate in candidates:
            if candidate.pose is None:
                continue
            markers.append(loop_marker(self._next_id, candidate.score, candidate.pose.position,
                                       None if query_pose is None else query_pose.position, same_frame,
                                       map_frame_id or query_frame_id, stamp))
            self._next_id += 1
        if markers:
            self._publisher.publish(self._array(markers=markers))
