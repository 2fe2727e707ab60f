"""The route simulator: deterministic, and its bags have the promised topics, types, counts and stamps."""

from __future__ import annotations

import numpy as np
import pytest
from rosbags.highlevel import AnyReader

from tscm_ros.bag import open_frames
from tscm_ros.cli import simulate_route as cli
from tscm_ros.errors import ConfigError
from tscm_ros.simulate import Route, simulate_route

SMALL = dict(frames=6, width=64, height=48, route_length_m=120.0, progress=False)


def _messages(bag):
    with AnyReader([bag]) as reader:
        topics = {c.topic: (c.msgtype, c.msgcount) for c in reader.connections}
        stamps = {}
        for conn, log_time, raw in reader.messages():
            msg = reader.deserialize(raw, conn.msgtype)
            stamp = msg.header.stamp.sec * 10**9 + msg.header.stamp.nanosec
            assert stamp == log_time
            stamps.setdefault(conn.topic, []).append((stamp, msg.header.frame_id))
    return topics, stamps


@pytest.mark.parametrize("storage", ["sqlite3", "mcap"])
def test_bag_has_the_promised_topics_counts_and_stamps(tmp_path, storage):
    bag = simulate_route(tmp_path / "bag", laps=2, storage=storage, compressed=True, **SMALL)
    topics, stamps = _messages(bag)
    # 6 images per 120 m lap at 5 m/s: one every 4 s, so odometry at 10 Hz is 40 messages per image
    assert topics == {"/camera/image_raw": ("sensor_msgs/msg/Image", 12),
                      "/camera/image_raw/compressed": ("sensor_msgs/msg/CompressedImage", 12),
                      "/odom": ("nav_msgs/msg/Odometry", 12 * 40)}
    for topic, frame_id in [("/camera/image_raw", "camera"), ("/odom", "odom")]:
        times = [t for t, _ in stamps[topic]]
        assert np.all(np.diff(times) > 0), f"{topic} stamps not increasing"
        assert {f for _, f in stamps[topic]} == {frame_id}
    image_times = np.array([t for t, _ in stamps["/camera/image_raw"]])
    odom_times = np.array([t for t, _ in stamps["/odom"]])
    assert np.diff(odom_times).max() <= 100_000_000
    # every image falls strictly between two odometry messages, so its pose is interpolated
    assert odom_times[0] < image_times[0] and odom_times[-1] > image_times[-1]
    assert not set(image_times) & set(odom_times)
    frames = list(open_frames(bag, image_topic="/camera/image_raw"))
    assert all(f.pose is not None and f.image.shape == (48, 64, 3) for f in frames)
    jpeg_frames = list(open_frames(bag, image_topic="/camera/image_raw/compressed"))
    assert [f.stamp_ns for f in jpeg_frames] == [f.stamp_ns for f in frames]
    assert all(np.abs(j.image.astype(int) - f.image).mean() < 8 for j, f in zip(jpeg_frames, frames))
    # the second lap revisits the first lap's positions
    np.testing.assert_allclose(frames[0].pose.position, frames[6].pose.position, atol=1e-6)


def test_later_traversals_revisit_the_places_along_other_points_of_the_road(tmp_path):
    route = Route(120.0)
    centre_line = np.array([route.at(s)[0] for s in np.arange(0, 120, 0.05)])
    poses = {}
    for traversal in (0, 1):
        bag = simulate_route(tmp_path / f"t{traversal}", traversal=traversal, appearance_change=1.0,
                             **{**SMALL, "frames": 12, "width": 32, "height": 24})
        poses[traversal] = np.array([f.pose.position[:2] for f in open_frames(bag)])
    off_line = {t: np.linalg.norm(p[:, None] - centre_line[None], axis=2).min(axis=1) for t, p in poses.items()}
    assert off_line[0].max() < 0.01  # the reference drives the centre line
    assert 0.1 < off_line[1].max() < 2.0  # the revisit keeps to one side, weaving a little
    nearest = np.linalg.norm(poses[1][:, None] - poses[0][None], axis=2).min(axis=1)
    assert np.all(nearest > 0.5) and np.all(nearest < 10.0 / 2 + 2.0)  # images 10 m apart on each drive


def test_same_seed_same_bytes_other_traversal_other_look(tmp_path):
    a = [f.image for f in open_frames(simulate_route(tmp_path / "a", seed=3, **SMALL))]
    b = [f.image for f in open_frames(simulate_route(tmp_path / "b", seed=3, **SMALL))]
    c = [f.image for f in open_frames(simulate_route(tmp_path / "c", seed=3, traversal=1, **SMALL))]
    d = [f.image for f in open_frames(simulate_route(tmp_path / "d", seed=4, **SMALL))]
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert all(not np.array_equal(x, y) for x, y in zip(a, c))
    assert all(not np.array_equal(x, y) for x, y in zip(a, d))


def test_route_is_closed_and_has_the_requested_length():
    route = Route(300.0)
    start, heading = route.at(0.0)
    end, end_heading = route.at(299.999)
    assert np.linalg.norm(start - end) < 0.01
    steps = np.array([route.at(s)[0] for s in np.linspace(0, 300, 3001)])
    assert np.sum(np.linalg.norm(np.diff(steps, axis=0), axis=1)) == pytest.approx(300.0, rel=1e-3)


def test_refuses_to_overwrite_and_bad_values(tmp_path):
    simulate_route(tmp_path / "bag", **SMALL)
    with pytest.raises(ConfigError, match="already exists"):
        simulate_route(tmp_path / "bag", **SMALL)
    assert cli.main(["--out", str(tmp_path / "bag"), "--frames", "6", "--width", "64", "--height", "48"]) == 2
    assert cli.main(["--out", str(tmp_path / "x"), "--appearance-change", "2"]) == 2
    assert not (tmp_path / "x").exists()


def test_command_line_writes_a_bag_and_says_what_it_wrote(tmp_path, capsys):
    out = tmp_path / "cli_bag"
    argv = ["--out", str(out), "--frames", "4", "--width", "32", "--height", "24", "--route-length", "100",
            "--storage", "mcap", "--laps", "2", "--seed", "5", "--traversal", "1", "--appearance-change", "0.5"]
    assert cli.main(argv) == 0
    assert "wrote 8 frames (32x24) of traversal 1, seed 5" in capsys.readouterr().out
    assert len(list(out.glob("*.mcap"))) == 1 and len(open_frames(out)) == 8
    assert cli.main(argv + ["--force"]) == 0  # replaces the bag
    assert len(open_frames(out)) == 8 and [p.name for p in tmp_path.iterdir()] == ["cli_bag"]
