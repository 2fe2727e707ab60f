"""The atomic-write helper: complete content under the name, or the old content and no leftovers."""

from __future__ import annotations

import pytest

from tscm_ros.atomic import atomic_directory, atomic_file


def test_atomic_file_replaces_on_success_and_keeps_the_old_file_on_error(tmp_path):
    path = tmp_path / "sub" / "report.json"
    with atomic_file(path) as temp:
        assert temp.suffix == ".json" and temp.parent == path.parent
        temp.write_text("new")
    assert path.read_text() == "new"

    with pytest.raises(RuntimeError), atomic_file(path) as temp:
        temp.write_text("half")
        raise RuntimeError("crash while writing")
    assert path.read_text() == "new"
    assert [p.name for p in path.parent.iterdir()] == ["report.json"]


def test_atomic_directory_replaces_a_whole_directory_or_nothing(tmp_path):
    target = tmp_path / "map"
    with atomic_directory(target) as staging:
        (staging / "a").write_text("1")
    with atomic_directory(target) as staging:
        (staging / "b").mkdir()
        (staging / "b" / "c").write_text("2")
    assert sorted(p.relative_to(target).as_posix() for p in target.rglob("*")) == ["b", "b/c"]

    with pytest.raises(KeyboardInterrupt), atomic_directory(target) as staging:
        (staging / "d").write_text("3")
        raise KeyboardInterrupt
    assert sorted(p.relative_to(target).as_posix() for p in target.rglob("*")) == ["b", "b/c"]
    assert [p.name for p in tmp_path.iterdir()] == ["map"]


def test_what_is_written_is_readable_like_a_plain_file_and_keeps_its_name_while_staged(tmp_path):
    reference = tmp_path / "plain"
    reference.write_text("x")
    with atomic_file(tmp_path / "model.onnx") as temp:
        temp.write_text("y")
    assert (tmp_path / "model.onnx").stat().st_mode == reference.stat().st_mode
    with atomic_directory(tmp_path / "bag") as staging:
        assert staging.name == "bag"  # rosbag2 names its files after the directory
        (staging / "bag_0.db3").write_text("z")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bag", "model.onnx", "plain"]
