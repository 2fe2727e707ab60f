"""The shared frame reader on real rosbag2 files written here: topics, poses, encodings, damage."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
from rosbags.rosbag1 import Writer as Ros1Writer
from rosbags.rosbag2 import StoragePlugin, Writer
from rosbags.typesys import Stores, get_typestore

from tscm_ros.errors import BagError
from tscm_ros.io.bag import FrameSource
from tscm_ros.io.geometry import Pose, PoseInterpolator, slerp
from tscm_ros.io.image_messages import ImageDecodeError, image_message_to_rgb

TYPESTORE = get_typestore(Stores.ROS2_HUMBLE)
T = TYPESTORE.types
Header, Time = T["std_msgs/msg/Header"], T["builtin_interfaces/msg/Time"]
Image, CompressedImage = T["sensor_msgs/msg/Image"], T["sensor_msgs/msg/CompressedImage"]
Point, Quaternion, PoseMsg = (T["geometry_msgs/msg/Point"], T["geometry_msgs/msg/Quaternion"],
                              T["geometry_msgs/msg/Pose"])
PoseStamped, NavSatFix, NavSatStatus = (T["geometry_msgs/msg/PoseStamped"], T["sensor_msgs/msg/NavSatFix"],
                                         T["sensor_msgs/msg/NavSatStatus"])
START_NS = 1_700_000_000 * 10**9


def header(stamp_ns: int, frame_id: str) -> Header:
    return Header(stamp=Time(sec=stamp_ns // 10**9, nanosec=stamp_ns % 10**9), frame_id=frame_id)


def yaw_quaternion(yaw: float) -> Quaternion:
    return Quaternion(x=0.0, y=0.0, z=math.sin(yaw / 2), w=math.cos(yaw / 2))


def raw_image(rgb: np.ndarray, stamp_ns: int, encoding: str = "rgb8") -> Image:
    return Image(header=header(stamp_ns, "camera"), height=rgb.shape[0], width=rgb.shape[1], encoding=encoding,
                 is_bigendian=0, step=rgb.shape[1] * rgb.shape[2], data=rgb.reshape(-1))


def write_bag(path: Path, messages: list[tuple[str, object]], storage=StoragePlugin.SQLITE3,
              raw: list[tuple[str, int, bytes]] = ()) -> Path:
    """messages: (topic, message) in log order; the log time is the header stamp. ``raw``: (topic, log time,
    bytes) written as they are, on a topic of ``messages``."""
    with Writer(path, version=9, storage_plugin=storage) as writer:
        connections = {}
        for topic, message in messages:
            if topic not in connections:
                connections[topic] = writer.add_connection(topic, message.__msgtype__, typestore=TYPESTORE)
            stamp = message.header.stamp
            writer.write(connections[topic], stamp.sec * 10**9 + stamp.nanosec,
                         TYPESTORE.serialize_cdr(message, message.__msgtype__))
        for topic, log_time, data in raw:
            writer.write(connections[topic], log_time, data)
    return path


def straight_route(n_images: int = 6, with_poses: bool = True) -> list[tuple[str, object]]:
    """Poses at 20 Hz along x at 1 m/s turning at 0.5 rad/s, images at 5 Hz between pose stamps."""
    messages = []
    for i in range(4 * n_images + 2):
        t = START_NS + i * 50_000_000
        if with_poses:
            messages.append(("/pose", PoseStamped(header=header(t, "odom"), pose=PoseMsg(
                position=Point(x=i * 0.05, y=0.0, z=0.0), orientation=yaw_quaternion(i * 0.025)))))
        if i % 4 == 1 and i // 4 < n_images:
            rgb = np.full((6, 8, 3), (i, 2 * i, 3 * i), dtype=np.uint8)
            messages.append(("/camera/image_raw", raw_image(rgb, t + 25_000_000)))
    return messages


@pytest.mark.parametrize("storage", [StoragePlugin.SQLITE3, StoragePlugin.MCAP])
def test_frames_with_interpolated_poses(tmp_path, storage):
    bag = write_bag(tmp_path / "bag", straight_route(), storage)
    reader = FrameSource(bag).open()
    assert (reader.image_topic, reader.pose_topic, len(reader)) == ("/camera/image_raw", "/pose", 6)
    frames = list(reader)
    assert [f.index for f in frames] == list(range(6))
    for k, frame in enumerate(frames):
        i = 4 * k + 1
        assert frame.stamp_ns == START_NS + i * 50_000_000 + 25_000_000
        np.testing.assert_array_equal(frame.image[0, 0], [i, 2 * i, 3 * i])
        # halfway between pose i and i + 1
        np.testing.assert_allclose(frame.pose.position, [(i + 0.5) * 0.05, 0, 0], atol=1e-9)
        yaw = 2 * math.atan2(frame.pose.orientation[2], frame.pose.orientation[3])
        assert yaw == pytest.approx((i + 0.5) * 0.025, abs=1e-9)
    assert reader.pose_frame_id == "odom"
    assert "6 frames" in reader.summary() and "0 frames without pose" in reader.summary()


def test_interpolator_range_gap_and_slerp():
    poses = PoseInterpolator(max_gap_s=1.0)
    q0, q1 = np.array([0, 0, 0, 1.0]), np.array([0, 0, math.sin(math.pi / 4), math.cos(math.pi / 4)])
    poses.add(10**9, Pose(np.zeros(3), q0))
    poses.add(2 * 10**9, Pose(np.array([1.0, 2.0, 0.0]), q1))
    poses.add(5 * 10**9, Pose(np.array([5.0, 2.0, 0.0]), q1))
    mid = poses.at(1_250_000_000)
    np.testing.assert_allclose(mid.position, [0.25, 0.5, 0.0])
    assert 2 * math.atan2(mid.orientation[2], mid.orientation[3]) == pytest.approx(math.pi / 2 * 0.25)
    assert poses.at(10**9 - 1) is None and poses.at(5 * 10**9 + 1) is None  # outside the stream
    assert poses.at(3 * 10**9) is None  # inside a 3 s gap
    np.testing.assert_allclose(poses.at(5 * 10**9).position, [5, 2, 0])  # exactly on a sample
    # slerp takes the short way round: q and -q are the same rotation
    np.testing.assert_allclose(slerp(q0, -q1, 0.5), slerp(q0, q1, 0.5), atol=1e-12)


def test_interpolator_accepts_out_of_order_and_bounds_history():
    poses = PoseInterpolator(max_gap_s=10.0, max_history=5)
    for t in [0, 2, 1, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]:
        poses.add(t * 10**9, Pose(np.array([float(t), 0, 0]), np.array([0, 0, 0, 1.0])))
    assert len(poses) <= 10
    np.testing.assert_allclose(poses.at(11_500_000_000).position, [11.5, 0, 0])


def test_interpolator_bounds_history_by_time():
    poses = PoseInterpolator(max_gap_s=1.0, max_age_s=2.0)  # 2 s of a 100 Hz stream: 201 poses
    held = []
    for i in range(3000):
        stamp = i * 10**7 if i % 50 else (i - 2) * 10**7 + 5 * 10**6  # some arrive late (out of order)
        poses.add(stamp, Pose(np.array([i / 100.0, 0, 0]), np.array([0, 0, 0, 1.0])))
        held.append(len(poses))
    assert max(held) <= 1.5 * 201 + 1 and min(held[-500:]) >= 200
    first, last = poses.time_range_ns
    assert last - first <= 3 * 10**9
    np.testing.assert_allclose(poses.at(2_995 * 10**7 - 5 * 10**6).position, [29.945, 0, 0])
    assert poses.at(10**9) is None  # forgotten


def test_frames_without_poses_are_counted(tmp_path):
    messages = straight_route(n_images=6)
    # pose stream stops after the second image: later frames are outside it
    cut = START_NS + 8 * 50_000_000
    messages = [(t, m) for t, m in messages if t != "/pose" or
                m.header.stamp.sec * 10**9 + m.header.stamp.nanosec <= cut]
    frames = list(reader := FrameSource(write_bag(tmp_path / "bag", messages)).open())
    assert [f.pose is not None for f in frames] == [True, True, False, False, False, False]
    assert "4 frames without pose (4 outside the pose stream, 0 in gaps over 1 s)" in reader.summary()
    # a 2 s hole in the pose stream around the third image
    hole = (START_NS + 8 * 50_000_000, START_NS + 12 * 50_000_000)
    messages = [(t, m) for t, m in straight_route(n_images=6) if t != "/pose" or
                not hole[0] < m.header.stamp.sec * 10**9 + m.header.stamp.nanosec < hole[1]]
    frames = list(reader := FrameSource(write_bag(tmp_path / "gap", messages), max_gap_s=0.15).open())
    assert [f.pose is not None for f in frames] == [True, True, False, True, True, True]
    assert "1 frames without pose (0 outside the pose stream, 1 in gaps over 0.15 s)" in reader.summary()


def test_topic_detection_errors(tmp_path):
    messages = straight_route(n_images=2)
    messages.append(("/other_camera", raw_image(np.zeros((2, 2, 3), np.uint8), START_NS + 7)))
    bag = write_bag(tmp_path / "two_cameras", messages)
    with pytest.raises(BagError, match=r"several image topics.*/camera/image_raw.*/other_camera"):
        FrameSource(bag).open()
    assert len(FrameSource(bag, image_topic="/other_camera").open()) == 1
    with pytest.raises(BagError, match="no image topic '/nope'"):
        FrameSource(bag, image_topic="/nope").open()

    only_poses = write_bag(tmp_path / "no_images", [m for m in straight_route() if m[0] == "/pose"])
    with pytest.raises(BagError, match=r"no_images: no image topic"):
        FrameSource(only_poses).open()
    no_poses = write_bag(tmp_path / "no_poses", straight_route(with_poses=False))
    assert FrameSource(no_poses).open().pose_topic is None
    with pytest.raises(BagError, match="no pose topic '/odom'"):
        FrameSource(no_poses, pose_topic="/odom").open()


def test_ros1_bag_with_two_publishers_on_one_topic(tmp_path):
    ros1 = get_typestore(Stores.ROS1_NOETIC)
    R = ros1.types
    path = tmp_path / "old.bag"
    with Ros1Writer(path) as writer:
        cameras = [writer.add_connection("/camera/image_raw", "sensor_msgs/msg/Image", typestore=ros1,
                                         callerid=f"/driver{k}") for k in range(2)]
        odom = writer.add_connection("/odom", "nav_msgs/msg/Odometry", typestore=ros1)
        for i in range(8):
            t = START_NS + i * 100_000_000
            stamp = R["builtin_interfaces/msg/Time"](sec=t // 10**9, nanosec=t % 10**9)
            head = R["std_msgs/msg/Header"](seq=i, stamp=stamp, frame_id="odom")
            position = R["geometry_msgs/msg/Point"](x=float(i), y=0.0, z=0.0)
            orientation = R["geometry_msgs/msg/Quaternion"](x=0.0, y=0.0, z=0.0, w=1.0)
            pose = R["geometry_msgs/msg/PoseWithCovariance"](
                pose=R["geometry_msgs/msg/Pose"](position=position, orientation=orientation),
                covariance=np.zeros(36))
            zero = R["geometry_msgs/msg/Vector3"](x=0.0, y=0.0, z=0.0)
            twist = R["geometry_msgs/msg/TwistWithCovariance"](
                twist=R["geometry_msgs/msg/Twist"](linear=zero, angular=zero), covariance=np.zeros(36))
            message = R["nav_msgs/msg/Odometry"](header=head, child_frame_id="base_link", pose=pose, twist=twist)
            writer.write(odom, t, ros1.serialize_ros1(message, "nav_msgs/msg/Odometry"))
            if i in (2, 5):
                t += 50_000_000
                stamp = R["builtin_interfaces/msg/Time"](sec=t // 10**9, nanosec=t % 10**9)
                image = R["sensor_msgs/msg/Image"](
                    header=R["std_msgs/msg/Header"](seq=i, stamp=stamp, frame_id="camera"), height=2, width=2,
                    encoding="bgr8", is_bigendian=0, step=6, data=np.tile(np.uint8([1, 2, 3]), 4))
                writer.write(cameras[i == 5], t, ros1.serialize_ros1(image, "sensor_msgs/msg/Image"))
    reader = FrameSource(path).open()
    frames = list(reader)
    assert (len(reader), reader.pose_topic) == (2, "/odom")
    assert [f.pose.position[0] for f in frames] == pytest.approx([2.5, 5.5])
    np.testing.assert_array_equal(frames[0].image[0, 0], [3, 2, 1])


def test_missing_and_damaged_bags(tmp_path):
    with pytest.raises(BagError, match="nowhere: no such bag"):
        FrameSource(tmp_path / "nowhere").open()
    bag = write_bag(tmp_path / "bag", straight_route(n_images=20))
    db = next(bag.glob("*.db3"))
    db.write_bytes(db.read_bytes()[: db.stat().st_size // 3])
    with pytest.raises(BagError, match=str(bag)):
        list(FrameSource(bag).open())
    mcap = write_bag(tmp_path / "mcap", straight_route(n_images=20), StoragePlugin.MCAP)
    data_file = next(mcap.glob("*.mcap"))
    data_file.write_bytes(data_file.read_bytes()[: data_file.stat().st_size // 2])
    with pytest.raises(BagError, match=str(mcap)):
        list(FrameSource(mcap).open())
    not_a_bag = tmp_path / "garbage"
    not_a_bag.mkdir()
    (not_a_bag / "metadata.yaml").write_text("this: is not [a rosbag2 metadata")
    with pytest.raises(BagError, match="garbage: cannot open the bag"):
        FrameSource(not_a_bag).open()


def test_navsatfix_becomes_local_metres(tmp_path):
    messages = []
    lat0, lon0 = 45.0, 11.0
    for i in range(10):
        t = START_NS + i * 100_000_000
        status = NavSatStatus(status=-1 if i == 0 else 0, service=1)  # the first message has no fix
        altitude = math.nan if i == 7 else 500.0 + i
        messages.append(("/fix", NavSatFix(header=header(t, "gps"), status=status, latitude=lat0 + i * 1e-4,
                                           longitude=lon0 + i * 1e-4, altitude=altitude,
                                           position_covariance=np.zeros(9), position_covariance_type=0)))
        if i in (5, 7):
            messages.append(("/camera/image_raw", raw_image(np.zeros((2, 2, 3), np.uint8), t)))
    frames = list(FrameSource(write_bag(tmp_path / "gps", messages)).open())
    # On WGS84 at 45 degrees a degree of latitude is 111132.95 m and of longitude 78847 m; origin = fix 1.
    east, north, up = frames[0].pose.position
    assert north == pytest.approx(4 * 11.113295, rel=1e-4)
    assert east == pytest.approx(4 * 7.8847, rel=1e-4)
    assert up == pytest.approx(4.0, abs=1e-3)
    assert frames[1].pose.position[2] == pytest.approx(0.0, abs=1e-2)  # unknown altitude: the origin's


# ----- image conversion ------------------------------------------------------------------------------

RGB = np.random.default_rng(1).integers(0, 256, size=(5, 7, 3), dtype=np.uint8)


@pytest.mark.parametrize("encoding,pixels", [
    ("rgb8", RGB), ("bgr8", RGB[:, :, ::-1]),
    ("rgba8", np.dstack([RGB, np.full(RGB.shape[:2], 9, np.uint8)])),
    ("bgra8", np.dstack([RGB[:, :, ::-1], np.full(RGB.shape[:2], 9, np.uint8)])),
])
def test_colour_encodings(encoding, pixels):
    message = raw_image(np.ascontiguousarray(pixels), 0, encoding)
    np.testing.assert_array_equal(image_message_to_rgb(message), RGB)


def test_mono_bayer_and_padded_rows():
    mono = RGB[:, :, 0]
    gray = image_message_to_rgb(Image(header=header(0, "c"), height=5, width=7, encoding="mono8", is_bigendian=0,
                                      step=7, data=mono.reshape(-1)))
    np.testing.assert_array_equal(gray, np.dstack([mono] * 3))
    mono16 = (mono.astype(np.uint16) * 257)
    gray16 = image_message_to_rgb(Image(header=header(0, "c"), height=5, width=7, encoding="mono16",
                                        is_bigendian=0, step=14, data=mono16.view(np.uint8).reshape(-1)))
    np.testing.assert_array_equal(gray16[:, :, 0], mono)
    padded = np.zeros((5, 7 * 3 + 3), np.uint8)
    padded[:, :21] = RGB.reshape(5, 21)
    message = Image(header=header(0, "c"), height=5, width=7, encoding="rgb8", is_bigendian=0, step=24,
                    data=padded.reshape(-1))
    np.testing.assert_array_equal(image_message_to_rgb(message), RGB)


@pytest.mark.parametrize("pattern", ["rggb", "bggr", "gbrg", "grbg"])
def test_bayer_patterns_demosaic_to_the_right_colours(pattern):
    colour = {"r": 200, "g": 100, "b": 30}
    mosaic = np.empty((8, 8), np.uint8)
    for k, channel in enumerate(pattern):  # 2x2 cells: top-left, top-right, bottom-left, bottom-right
        mosaic[k // 2::2, k % 2::2] = colour[channel]
    rgb = image_message_to_rgb(Image(header=header(0, "c"), height=8, width=8, encoding=f"bayer_{pattern}8",
                                     is_bigendian=0, step=8, data=mosaic.reshape(-1)))
    np.testing.assert_array_equal(rgb[2:6, 2:6].reshape(-1, 3), np.tile([200, 100, 30], (16, 1)))


def test_compressed_images():
    ok, png = cv2.imencode(".png", RGB[:, :, ::-1])
    message = CompressedImage(header=header(0, "c"), format="png", data=png.reshape(-1))
    np.testing.assert_array_equal(image_message_to_rgb(message), RGB)
    smooth = np.tile(np.linspace(0, 255, 32, dtype=np.uint8)[None, :, None], (24, 1, 3))
    ok, jpeg = cv2.imencode(".jpg", smooth, [cv2.IMWRITE_JPEG_QUALITY, 95])
    decoded = image_message_to_rgb(CompressedImage(header=header(0, "c"), format="jpeg", data=jpeg.reshape(-1)))
    assert np.abs(decoded.astype(int) - smooth).max() <= 4


@pytest.mark.parametrize("fields,problem", [
    (dict(height=0, width=0, encoding="rgb8", step=0, data=np.zeros(0, np.uint8)), "zero size"),
    (dict(height=4, width=4, encoding="rgb8", step=5, data=np.zeros(20, np.uint8)), "step 5 is smaller"),
    (dict(height=4, width=4, encoding="rgb8", step=12, data=np.zeros(20, np.uint8)), "20 bytes, expected"),
    (dict(height=4, width=4, encoding="yuv_fancy9", step=12, data=np.zeros(48, np.uint8)), "unknown image encoding"),
    (dict(height=1, width=1, encoding="rgb8", step=3, data=np.zeros(3, np.uint8)), "1x1 is too small"),
    (dict(height=4, width=1, encoding="rgb8", step=3, data=np.zeros(12, np.uint8)), "1x4 is too small"),
    (dict(height=4, width=5, encoding="yuv422", step=10, data=np.zeros(40, np.uint8)),
     r"cannot convert 'yuv422' \(5x4\) to RGB"),  # OpenCV needs an even width for yuv422
])
def test_malformed_raw_images(fields, problem):
    with pytest.raises(ImageDecodeError, match=problem):
        image_message_to_rgb(Image(header=header(0, "c"), is_bigendian=0, **fields))


def test_malformed_compressed_images():
    with pytest.raises(ImageDecodeError, match="does not decode"):
        image_message_to_rgb(CompressedImage(header=header(0, "c"), format="jpeg",
                                             data=np.frombuffer(b"\xff\xd8\xffnot a jpeg", np.uint8)))
    with pytest.raises(ImageDecodeError, match="no data"):
        image_message_to_rgb(CompressedImage(header=header(0, "c"), format="jpeg", data=np.zeros(0, np.uint8)))


def test_malformed_image_in_a_bag_is_skipped_and_counted(tmp_path):
    messages = straight_route(n_images=4)
    broken = raw_image(np.zeros((4, 4, 3), np.uint8), START_NS + 3)
    broken.step = 5
    messages.insert(3, ("/camera/image_raw", broken))
    messages.insert(4, ("/camera/image_raw", raw_image(np.zeros((1, 1, 3), np.uint8), START_NS + 5)))  # too small
    bag = write_bag(tmp_path / "bag", messages)
    # the same bag plus one message of garbage bytes
    write_bag(tmp_path / "garbled", messages,
              raw=[("/camera/image_raw", START_NS + 4, b"\x00\x01\x00\x00\xff\xff\xff\x7f")])
    for path, malformed in [(bag, 2), (tmp_path / "garbled", 3)]:
        reader = FrameSource(path).open()
        assert len(list(reader)) == 4
        assert f"{malformed} malformed images skipped" in reader.summary()
        assert len(list(reader)) == 4 and reader.frames_malformed == malformed  # counts restart per pass


@pytest.mark.skipif(importlib.util.find_spec("sensor_msgs") is None, reason="needs the ROS 2 sensor_msgs wheel")
def test_live_rclpy_messages_convert_like_bag_messages():
    from sensor_msgs.msg import CompressedImage as LiveCompressedImage
    from sensor_msgs.msg import Image as LiveImage

    live = LiveImage(height=5, width=7, encoding="bgr8", is_bigendian=0, step=21,
                     data=np.ascontiguousarray(RGB[:, :, ::-1]).tobytes())
    np.testing.assert_array_equal(image_message_to_rgb(live), RGB)
    ok, png = cv2.imencode(".png", RGB[:, :, ::-1])
    np.testing.assert_array_equal(image_message_to_rgb(LiveCompressedImage(format="png", data=png.tobytes())), RGB)
    live.step = 20
    with pytest.raises(ImageDecodeError, match="step 20 is smaller"):
        image_message_to_rgb(live)


def test_an_empty_directory_given_as_a_bag_is_one_error_line_in_every_tool(tmp_path, capsys):
    from tscm_ros.cli import build_map, evaluate, extract_dataset

    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "out"
    for tool, argv in ((build_map, ["--bag", str(empty), "--out", str(out)]),
                       (extract_dataset, ["--bag", str(empty), "--out", str(out), "--no-progress"]),
                       (evaluate, ["--bag", str(empty), "--query-bag", str(empty), "--out", str(out)])):
        assert tool.main(argv) == 2, tool.__name__
        error = capsys.readouterr().err
        assert error == f"error: {empty}: not a rosbag2 recording (an empty directory)\n", (tool.__name__, error)
        assert not out.exists()


def test_odometry_with_nan_infinity_or_a_zero_quaternion_is_skipped_and_counted(tmp_path, caplog):
    from bag_support import BAD_POSES, write_drive

    reader = FrameSource(write_drive(tmp_path / "bag", images=6, bad_poses=BAD_POSES)).open()
    frames = list(reader)
    assert len(frames) == 6 and all(f.pose is not None for f in frames)
    for frame in frames:  # the poses around a skipped message interpolate across it
        assert np.isfinite(frame.pose.position).all() and np.isfinite(frame.pose.orientation).all()
        assert abs(np.linalg.norm(frame.pose.orientation) - 1) < 1e-9
    assert reader.poses_invalid == 4 and len(reader.poses) == 26 - 4
    summary = reader.summary()
    assert summary.startswith(f"{tmp_path / 'bag'}: ")
    assert "poses from /odom (22 messages (4 more skipped: a NaN" in summary
    assert "0 frames without pose" in summary
    assert "/odom" in caplog.text and "zero quaternion" in caplog.text
    # only bad odometry: one error naming the bag, the topic and why
    every = {i: ((math.nan, 0.0, 0.0), (0, 0, 0, 1.0)) for i in range(30)}
    with pytest.raises(BagError, match=r"bad: pose topic /odom has no usable message \(26 with a NaN or infinite"):
        FrameSource(write_drive(tmp_path / "bad", images=6, bad_poses=every)).open()


def test_positions_too_large_to_interpolate_give_frames_without_pose(tmp_path):
    from bag_support import write_drive

    huge = {i: ((1.7e308 * (-1) ** i, 0.0, 0.0), (0, 0, 0, 1.0)) for i in range(30)}  # finite, differences are not
    reader = FrameSource(write_drive(tmp_path / "bag", images=3, bad_poses=huge)).open()
    assert [f.pose for f in reader] == [None] * 3
    assert "3 frames without pose" in reader.summary() and "3 interpolated to a non-finite pose" in reader.summary()
