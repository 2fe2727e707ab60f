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


# A writer in another process: fills the staging directory (or file), says so, then waits to be killed.
KILLED_WRITER = """
import sys, time
from tscm_ros import atomic
target, where = sys.argv[1], sys.argv[2]

def announce_and_wait(*args, **kwargs):
    print("ready", flush=True)
    time.sleep(600)

if where == "after exchange":  # the new directory is in place; the old one not yet deleted
    atomic._remove_stale = announce_and_wait
if where == "file":
    with atomic.atomic_file(target) as temp:
        temp.write_text("half")
        announce_and_wait()
else:
    with atomic.atomic_directory(target) as staging:
        (staging / "version").write_text("new")
        if where == "staging":
            announce_and_wait()
"""


def _write_and_kill(target, where: str) -> None:
    import signal
    import subprocess
    import sys

    process = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(target), where], stdout=subprocess.PIPE,
                               text=True)
    try:
        assert process.stdout.readline() == "ready\n"
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()


def _leftovers(directory):
    return sorted(p.name for p in directory.iterdir() if ".tmp-" in p.name)


def test_a_writer_killed_at_any_step_leaves_the_old_or_the_new_directory_and_the_next_write_cleans_up(tmp_path):
    target = tmp_path / "map"
    with atomic_directory(target) as staging:
        (staging / "version").write_text("old")

    _write_and_kill(target, "staging")  # kill -9 while the new directory is being written
    assert (target / "version").read_text() == "old"
    assert len(_leftovers(tmp_path)) == 1

    _write_and_kill(target, "after exchange")  # kill -9 once the new one is in place
    assert (target / "version").read_text() == "new"
    assert len(_leftovers(tmp_path)) == 2

    with atomic_directory(target) as staging:  # the next write that succeeds removes both
        (staging / "version").write_text("newer")
    assert (target / "version").read_text() == "newer"
    assert _leftovers(tmp_path) == []


def test_a_killed_file_writer_leaves_the_old_file_and_the_next_write_cleans_up(tmp_path):
    target = tmp_path / "last.pt"
    target.write_text("old")
    _write_and_kill(target, "file")
    assert target.read_text() == "old" and len(_leftovers(tmp_path)) == 1
    with atomic_file(target) as temp:
        temp.write_text("new")
    assert target.read_text() == "new" and _leftovers(tmp_path) == []


def test_a_live_writers_temporary_is_not_removed(tmp_path):
    target = tmp_path / "map"
    with atomic_directory(target) as outer:
        (outer / "version").write_text("outer")
        with atomic_directory(target) as inner:  # another writer of the same target finishes first
            (inner / "version").write_text("inner")
        assert (outer / "version").read_text() == "outer"  # still there: its writer holds its lock
    assert (target / "version").read_text() == "outer" and _leftovers(tmp_path) == []


def test_without_an_atomic_exchange_the_directory_is_still_replaced(tmp_path, monkeypatch, caplog):
    import tscm_ros.atomic

    target = tmp_path / "map"
    with atomic_directory(target) as staging:
        (staging / "version").write_text("old")
    monkeypatch.setattr(tscm_ros.atomic, "exchange", lambda first, second: False)  # e.g. a file system without it
    with atomic_directory(target) as staging:
        (staging / "version").write_text("new")
    assert (target / "version").read_text() == "new" and _leftovers(tmp_path) == []
    assert "refuses an atomic exchange" in caplog.text
