"""The node's /diagnostics status, and the diagnosis of a pose topic whose publishers deliver no pose."""

from __future__ import annotations

from diagnostic_msgs.msg import DiagnosticStatus, KeyValue
from rclpy.qos import QoSReliabilityPolicy
from rclpy.topic_endpoint_info import TopicEndpointInfo

from tscm_ros.node.parameters import POSE_TYPES

POSE_SILENCE_WARN_S = 3.0  # warn when the pose topic has had publishers this long and no pose arrived


def pose_silence_warning(topic: str, pose_type: str, pose_qos: str, publishers: list[TopicEndpointInfo],
                         silent_s: float) -> str:
    """Why ``publishers`` on the pose topic may deliver nothing: their types and reliability against the
    subscription's ``pose_type`` and ``pose_qos``."""
    kinds = sorted({f"{info.topic_type}, {info.qos_profile.reliability.name.lower().replace('_', ' ')}"
                    for info in publishers})
    hints = []
    if pose_qos == "reliable" and any(
            info.qos_profile.reliability == QoSReliabilityPolicy.BEST_EFFORT for info in publishers):
        hints.append("a best-effort publisher needs pose_qos sensor_data")
    expected = POSE_TYPES[pose_type]
    expected_name = f"{expected.__module__.split('.')[0]}/msg/{expected.__name__}"
    if any(info.topic_type != expected_name for info in publishers):
        hints.append(f"pose_type {pose_type} expects {expected_name}")
    return (f"pose_topic {topic} has {len(publishers)} publisher(s) ({'; '.join(kinds)}) "
            f"but no pose arrived in {silent_s:.0f} s; subscribed as {expected_name} with pose_qos {pose_qos}"
            + (f": {'; '.join(hints)}" if hints else ""))


LOSS_WARN = 0.05  # warn when more than this share of the recent images never arrived


def diagnostic_status(name: str, stats: dict, pose_warning: str, autosave_error: str = "") -> DiagnosticStatus:
    """The node's status from its ``statistics()``: OK, or WARN when images arrive but none is processed,
    when the input stamps show images lost on the way, when ``pose_warning`` says the pose topic is silent,
    or when the last autosave failed."""
    status = DiagnosticStatus(name=name, hardware_id=stats["device"])
    status.level = DiagnosticStatus.OK
    status.message = f"{stats['images processed']} images processed, {stats['images dropped']} dropped"
    lost_share = stats["images lost recently (%)"] / 100.0
    if stats["images received"] and not stats["images processed"]:
        status.level, status.message = DiagnosticStatus.WARN, "receiving images but none processed yet"
    elif lost_share > LOSS_WARN:
        status.level = DiagnosticStatus.WARN
        status.message = (f"images lost before reaching the node: {100 * lost_share:.0f} % of the recent ones "
                          f"(gaps in the input stamps at {stats['input stamp rate (Hz)']:.1f} Hz; "
                          f"{stats['images lost (input stamp gaps)']} in all); large best-effort images need the "
                          "Fast DDS profile config/fastdds_large_images.xml on the publisher too, or qos reliable")
    elif pose_warning:
        status.level, status.message = DiagnosticStatus.WARN, pose_warning
    elif autosave_error:
        status.level, status.message = DiagnosticStatus.WARN, f"the last map autosave failed: {autosave_error}"
    status.values = [KeyValue(key=key, value=f"{value:.2f}" if isinstance(value, float) else str(value))
                     for key, value in stats.items()]
    return status
