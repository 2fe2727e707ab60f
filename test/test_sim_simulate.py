"""The route simulator: deterministic, and its bags have the promised topics, types, counts and stamps."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
from rosbags.highlevel import AnyReader

from tscm_ros.cli import simulate_route as cli
from tscm_ros.errors import ConfigError
from tscm_ros.io.bag import FrameSource
from tscm_ros.sim.appearance import CONDITIONS, Appearance
from tscm_ros.sim.garden import Garden
from tscm_ros.sim.garden_layout import layout
from tscm_ros.sim.route import Route
from tscm_ros.sim.simulate import simulate_route
from tscm_ros.sim.world import BLOCK_M, World

SMALL = dict(frames=6, width=64, height=48, route_length_m=120.0, progress=False)
GARDEN = {**SMALL, "world": "garden"}


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
    frames = list(FrameSource(bag, image_topic="/camera/image_raw").open())
    assert all(f.pose is not None and f.image.shape == (48, 64, 3) for f in frames)
    jpeg_frames = list(FrameSource(bag, image_topic="/camera/image_raw/compressed").open())
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
        poses[traversal] = np.array([f.pose.position[:2] for f in FrameSource(bag).open()])
    off_line = {t: np.linalg.norm(p[:, None] - centre_line[None], axis=2).min(axis=1) for t, p in poses.items()}
    assert off_line[0].max() < 0.01  # the reference drives the centre line
    assert 0.1 < off_line[1].max() < 2.0  # the revisit keeps to one side, weaving a little
    nearest = np.linalg.norm(poses[1][:, None] - poses[0][None], axis=2).min(axis=1)
    assert np.all(nearest > 0.5) and np.all(nearest < 10.0 / 2 + 2.0)  # images 10 m apart on each drive


def test_same_seed_same_bytes_other_traversal_other_look(tmp_path):
    a = [f.image for f in FrameSource(simulate_route(tmp_path / "a", seed=3, **SMALL)).open()]
    b = [f.image for f in FrameSource(simulate_route(tmp_path / "b", seed=3, **SMALL)).open()]
    c = [f.image for f in FrameSource(simulate_route(tmp_path / "c", seed=3, traversal=1, **SMALL)).open()]
    d = [f.image for f in FrameSource(simulate_route(tmp_path / "d", seed=4, **SMALL)).open()]
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
    assert len(list(out.glob("*.mcap"))) == 1 and len(FrameSource(out).open()) == 8
    assert cli.main(argv + ["--force"]) == 0  # replaces the bag
    assert len(FrameSource(out).open()) == 8 and [p.name for p in tmp_path.iterdir()] == ["cli_bag"]


def _frames(bag):
    return list(FrameSource(bag).open())


def _bag_bytes(bag):
    with AnyReader([bag]) as reader:
        return [(conn.topic, log_time, bytes(raw)) for conn, log_time, raw in reader.messages()]


def test_default_options_change_nothing(tmp_path):
    for traversal in (0, 1):
        plain = simulate_route(tmp_path / f"plain{traversal}", traversal=traversal, **SMALL)
        explicit = simulate_route(tmp_path / f"explicit{traversal}", traversal=traversal, condition="auto",
                                  aliasing=0.0, skip_arc=None, **SMALL)
        assert _bag_bytes(plain) == _bag_bytes(explicit)


def test_hard_conditions_change_the_look_and_the_drive(tmp_path):
    small = {**SMALL, "frames": 4}
    reference = _frames(simulate_route(tmp_path / "reference", **small))
    route = Route(small["route_length_m"])
    centre_line = np.array([route.at(s)[0] for s in np.arange(0, route.length_m, 0.05)])
    frames, poses = {}, {}
    for condition in [c for c in CONDITIONS if c != "auto"]:
        frames[condition] = _frames(simulate_route(tmp_path / condition, traversal=1, condition=condition, **small))
        poses[condition] = np.array([f.pose.position for f in frames[condition]])
        assert all(not np.array_equal(f.image, r.image) for f, r in zip(frames[condition], reference))
    for condition in poses:  # the drive depends on seed and traversal only: the same under every condition
        np.testing.assert_array_equal(poses[condition], poses["day"])
    off_line = np.linalg.norm(poses["day"][:, None, :2] - centre_line[None], axis=2).min(axis=1)
    assert np.all(off_line > 0.7) and np.all(off_line < 2.4)  # 1-2 m to one side, weaving
    day, night, haze = (np.array([f.image for f in frames[c]], np.float32) for c in ("day", "night", "haze"))
    assert night.mean() < 0.5 * day.mean()
    assert night[..., 2].mean() > night[..., 0].mean()  # bluish
    assert haze.mean() > day.mean()  # towards a light grey

    def contrast(images):  # RMS contrast, and the mean gradient
        grey = images.mean(axis=3)
        return ((grey.std(axis=(1, 2)) / grey.mean(axis=(1, 2))).mean(),
                np.abs(np.diff(grey, axis=1)).mean() + np.abs(np.diff(grey, axis=2)).mean())

    assert np.all(np.array(contrast(haze)) < 0.9 * np.array(contrast(day)))
    # the season repaints the facades and the clutter condition puts more objects in view
    for condition in ("season", "clutter"):
        assert all(not np.array_equal(f.image, d.image) for f, d in zip(frames[condition], frames["day"]))


def test_a_condition_on_traversal_zero_is_a_reference_under_that_condition(tmp_path):
    reference = _frames(simulate_route(tmp_path / "reference", **SMALL))
    night = _frames(simulate_route(tmp_path / "night", condition="night", **SMALL))
    np.testing.assert_array_equal([f.pose.position for f in night], [f.pose.position for f in reference])
    assert np.mean([f.image.mean() for f in night]) < 0.5 * np.mean([f.image.mean() for f in reference])


def _layout(world, block):
    """The buildings and poles of one street block, placed relative to the block's start."""
    return [(round(p.s - block * BLOCK_M, 9), p.side, p.distance, p.half_extents, p.turn, p.colour, p.texture)
            for p in world.pieces if p.s // BLOCK_M == block]


def test_aliasing_copies_street_blocks_the_same_way_for_every_traversal():
    route = Route(300.0)
    reference = Appearance.for_traversal(0, 0, 0.6)
    worlds = {"plain": World(route, 0, 0, reference, 0.0),
              "aliased": World(route, 0, 0, reference, 0.4),
              "again": World(route, 0, 0, reference, 0.4),
              "season": World(route, 0, 2, Appearance.for_traversal(0, 2, 0.6, "season"), 0.4)}
    try:
        plain, aliased = worlds["plain"], worlds["aliased"]
        assert plain.copies == {} and len(aliased.copies) == round(0.4 * 15)
        for other in ("again", "season"):  # deterministic, and a property of the world, not of the traversal
            assert worlds[other].copies == aliased.copies and worlds[other].pieces == aliased.pieces
            assert all(all(np.array_equal(a[k], b[k]) for k in a) for a, b in zip(worlds[other].paint, aliased.paint))
        per_block = round(BLOCK_M / 4.0)
        for block in range(15):
            source = aliased.copies.get(block, block)
            assert source <= block and source not in aliased.copies
            assert _layout(aliased, block) == _layout(plain, source)  # a copy, or left as it was
            for j in range(per_block):
                painted = aliased.paint[block * per_block + j]
                assert all(np.array_equal(painted[k], plain.paint[source * per_block + j][k]) for k in (-1, 1))
        assert any(_layout(aliased, block) != _layout(plain, block) for block in aliased.copies)
    finally:
        for world in worlds.values():
            world.close()


def test_aliased_places_look_alike():
    """Looking sideways at the facades from the middle of blocks on one straight: a copied block looks like
    its original (only the clutter, which is placed at random, differs), two original blocks do not."""
    route = Route(1000.0)  # the first straight holds blocks 0 to 8
    look = Appearance.for_traversal(0, 0, 0.6)
    world = World(route, 0, 0, look, 0.5)
    try:
        def view(block):
            centre, heading = route.at((block + 0.5) * BLOCK_M)
            assert heading == 0.0
            normal = np.array([-math.sin(heading), math.cos(heading)])
            rgb, _, _ = world.render([*centre, 1.6], [*(centre + 10 * normal), 4.6], 64, 48, look.light_direction,
                                     look.light_color, look.ambient)
            return rgb

        def same(a, b):
            return np.mean(np.all(view(a) == view(b), axis=2))

        pairs = [(block, source) for block, source in world.copies.items() if block <= 8]
        originals = [block for block in range(9) if block not in world.copies]
        assert pairs and len(originals) >= 2
        assert all(same(block, source) > 0.85 for block, source in pairs)
        assert all(same(a, b) < 0.3 for a, b in zip(originals, originals[1:]))
    finally:
        world.close()


def test_skip_arc_leaves_out_the_images_of_a_stretch(tmp_path):
    small = {**SMALL, "frames": 10}  # images at 0, 0.1, ..., 0.9 of the lap
    full = simulate_route(tmp_path / "full", **small)
    skipped = simulate_route(tmp_path / "skipped", skip_arc=(0.25, 0.55), **small)
    full_frames, kept = _frames(full), _frames(skipped)
    assert [f.stamp_ns for f in kept] == [f.stamp_ns for i, f in enumerate(full_frames) if i not in (3, 4, 5)]
    full_by_stamp = {f.stamp_ns: f.image for f in full_frames}
    assert all(np.array_equal(f.image, full_by_stamp[f.stamp_ns]) for f in kept)  # otherwise the same images
    topics, stamps = _messages(skipped)  # odometry goes on through the gap, at 10 Hz, as without skip_arc
    assert topics["/camera/image_raw"][1] == 7 and topics["/odom"] == _messages(full)[0]["/odom"]
    odom_times = np.array([t for t, _ in stamps["/odom"]])
    assert np.all(np.diff(odom_times) > 0) and np.diff(odom_times).max() <= 100_000_000


@pytest.mark.parametrize("options, message", [
    ({"condition": "fog"}, "condition must be one of auto, day, night, haze, season, clutter"),
    ({"aliasing": 1.5}, r"aliasing must be in \[0, 1\]"),
    ({"aliasing": -0.1}, r"aliasing must be in \[0, 1\]"),
    ({"skip_arc": (0.5, 0.2)}, "skip_arc must be"),
    ({"skip_arc": (-0.1, 0.2)}, "skip_arc must be"),
    ({"skip_arc": (0.2, 1.5)}, "skip_arc must be"),
    ({"skip_arc": (0.0, 1.0)}, "leaves no image"),
    ({"world": "forest"}, "world must be one of town, garden, got 'forest'"),
])
def test_bad_new_options_are_refused(tmp_path, options, message):
    with pytest.raises(ConfigError, match=message):
        simulate_route(tmp_path / "bag", **SMALL, **options)
    assert not (tmp_path / "bag").exists()


def test_command_line_takes_the_new_options(tmp_path, capsys):
    out = tmp_path / "bag"
    argv = ["--out", str(out), "--frames", "10", "--width", "32", "--height", "24", "--route-length", "100",
            "--traversal", "1", "--condition", "haze", "--aliasing", "0.3", "--skip-arc", "0.25,0.55"]
    assert cli.main(argv) == 0
    assert "wrote 7 frames (32x24) of traversal 1, seed 0" in capsys.readouterr().out
    assert len(FrameSource(out).open()) == 7
    assert cli.main(["--out", str(tmp_path / "x"), "--skip-arc", "0.2"]) == 2
    assert "--skip-arc must be START,END" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["--out", str(tmp_path / "x"), "--condition", "fog"])
    assert not (tmp_path / "x").exists()


def _histogram(image):
    """The image's colours: an 8 x 8 x 8 RGB histogram, summing to 1."""
    counts = np.histogramdd(image.reshape(-1, 3), bins=8, range=[(0, 256)] * 3)[0].ravel()
    return counts / counts.sum()


def test_the_garden_is_deterministic_and_unlike_the_town(tmp_path):
    garden = simulate_route(tmp_path / "garden", seed=3, traversal=1, **GARDEN)
    town = simulate_route(tmp_path / "town", seed=3, traversal=1, **SMALL)
    assert _bag_bytes(garden) == _bag_bytes(simulate_route(tmp_path / "again", seed=3, traversal=1, **GARDEN))
    garden_frames, town_frames = _frames(garden), _frames(town)
    # the same route and drive, other things to see
    np.testing.assert_array_equal([f.pose.position for f in garden_frames], [f.pose.position for f in town_frames])
    for g, t in zip(garden_frames, town_frames):
        assert np.abs(_histogram(g.image) - _histogram(t.image)).sum() > 0.5  # a quarter of the pixels in other colours
    assert layout(Route(120.0), 3) != layout(Route(120.0), 4)  # another seed, another garden


def test_a_day_revisit_of_the_garden_looks_like_its_own_place(tmp_path):
    """Each image of a day revisit (1-2 m to the side, turned a few degrees, between the reference's
    images) has colours closer to the nearest reference image than to the one half a lap away."""
    reference = _frames(simulate_route(tmp_path / "reference", condition="day", **{**GARDEN, "frames": 48}))
    revisit = _frames(simulate_route(tmp_path / "revisit", traversal=1, condition="day", **GARDEN))
    positions = np.array([f.pose.position[:2] for f in reference])
    for frame in revisit:
        distance = np.linalg.norm(positions - frame.pose.position[:2], axis=1)
        assert distance.min() < 3.0 and distance.max() > 30.0
        own, far = _histogram(reference[distance.argmin()].image), _histogram(reference[distance.argmax()].image)
        query = _histogram(frame.image)
        assert np.abs(query - own).sum() < np.abs(query - far).sum()


def test_the_conditions_change_the_garden(tmp_path):
    small = {**GARDEN, "frames": 4}
    images = {condition: np.array([f.image for f in _frames(simulate_route(tmp_path / condition, traversal=1,
                                                                            condition=condition, **small))],
                                  np.float32)
              for condition in ("day", "night", "haze", "season", "clutter")}
    day, night, haze = images["day"], images["night"], images["haze"]
    assert night.mean() < 0.5 * day.mean() and night[..., 2].mean() > night[..., 0].mean()  # dark and bluish
    assert haze.mean() > day.mean() and haze.std() < 0.8 * day.std()  # fading to a light grey

    def green(images):  # how much greener than red the lower half (lawn, path, hedges) is
        lower = images[:, images.shape[1] // 2:]
        return (lower[..., 1] - lower[..., 0]).mean()

    assert green(images["season"]) < green(day) - 10  # the lawn browned or under snow
    assert all(not np.array_equal(c, d) for c, d in zip(images["clutter"], day))  # other things by the path


def _features(garden, block):
    """The garden's features in one block, placed relative to the block's start."""
    return [replace(f, s=round(f.s - block * BLOCK_M, 9)) for f in garden.features if f.s // BLOCK_M == block]


def test_aliasing_copies_the_gardens_blocks():
    route = Route(200.0)
    look = Appearance.for_traversal(0, 0, 0.6)
    plain, aliased = Garden(route, 0, 0, look, 0.0), Garden(route, 0, 0, look, 0.4)
    try:
        assert plain.copies == {} and len(aliased.copies) == round(0.4 * 10)
        for block in range(10):
            assert _features(aliased, block) == _features(plain, aliased.copies.get(block, block))
        assert any(_features(aliased, block) != _features(plain, block) for block in aliased.copies)
    finally:
        plain.close()
        aliased.close()


def test_command_line_renders_the_garden_and_refuses_an_unknown_world(tmp_path, capsys):
    out = tmp_path / "bag"
    argv = ["--out", str(out), "--frames", "10", "--width", "32", "--height", "24", "--route-length", "100",
            "--world", "garden", "--traversal", "1", "--condition", "night", "--skip-arc", "0.25,0.55"]
    assert cli.main(argv) == 0
    assert "wrote 7 frames (32x24) of traversal 1, seed 0, 1 x 100 m, world garden" in capsys.readouterr().out
    assert cli.main(["--out", str(tmp_path / "x"), "--world", "forest"]) == 2
    assert "error: simulate_route: world must be one of town, garden, got 'forest'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
