"""build_map end to end on a rendered bag: keyframe selection, append, refusals, damaged inputs."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from tscm_ros.cli import build_map
from tscm_ros.describe.describer import DEFAULT_MODEL, describer_for
from tscm_ros.map.building import describer_for_map
from tscm_ros.map.keyframe_map import KeyframeMap


@pytest.fixture(scope="module")
def built_map(route_reference, tmp_path_factory):
    out = tmp_path_factory.mktemp("build_map") / "map"
    assert build_map.main(["--bag", str(route_reference), "--out", str(out), "--min-distance", "15",
                           "--thumbnails"]) == 0
    return out


def test_map_holds_spaced_keyframes_with_poses_and_the_model(built_map, route_reference):
    keyframe_map = KeyframeMap.load(built_map, expected_fingerprint=describer_for(DEFAULT_MODEL).fingerprint)
    positions = keyframe_map.positions
    # 300 m lap, 40 frames (7.5 m apart), keyframes 15 to 22.5 m apart
    assert 13 <= len(keyframe_map) <= 20
    steps = np.linalg.norm(np.diff(positions[:, :2], axis=0), axis=1)
    assert steps.min() >= 15.0 - 1e-6
    assert keyframe_map.keyframe(0).thumbnail.shape[1] == build_map.THUMBNAIL_WIDTH
    assert set(keyframe_map.bags) == {str(route_reference)}
    assert keyframe_map.frame_id == "odom"  # the recording's odometry frame, for the candidates' poses


def test_the_map_fits_its_own_vocabulary_and_keeps_it(tmp_path, route_reference, capsys):
    out = tmp_path / "map"
    assert build_map.main(["--bag", str(route_reference), "--out", str(out), "--min-distance", "0",
                           "--vocabulary-keyframes", "25"]) == 0
    assert "vocabulary of 32 words (fitted on 25 images of the map)" in capsys.readouterr().out
    default = describer_for(DEFAULT_MODEL, device="cpu")
    keyframe_map = KeyframeMap.load(out, expected_fingerprint=default.fingerprint)
    assert len(keyframe_map) == 40 and keyframe_map.vocabulary.images == 25
    assert keyframe_map.model_fingerprint == describer_for_map(default, keyframe_map).fingerprint != default.fingerprint
    # The named baseline builds too; a map small enough keeps the generic vocabulary (fewer than 20 keyframes).
    assert build_map.main(["--bag", str(route_reference), "--out", str(tmp_path / "gem"), "--model", "pretrained"]) == 0
    assert KeyframeMap.load(tmp_path / "gem").vocabulary is None
    small = ["--bag", str(route_reference), "--out", str(tmp_path / "small"), "--min-distance", "30"]
    assert build_map.main(small) == 0
    assert KeyframeMap.load(tmp_path / "small").vocabulary.source == "generic"
    assert build_map.main(["--bag", str(route_reference), "--out", str(tmp_path / "x"), "--vocabulary-keyframes",
                           "5"]) == 2
    assert "at least 20 keyframes" in capsys.readouterr().err


def test_keyframes_after_the_vocabulary_fit_in_the_same_batch_are_described_with_it(tmp_path, route_reference):
    """The fit comes on the 20th keyframe, in the middle of a batch of 7: the keyframes after it in that batch hold
    descriptors of the map's own vocabulary, like every other keyframe."""
    out = tmp_path / "map"
    assert build_map.main(["--bag", str(route_reference), "--out", str(out), "--min-distance", "0",
                           "--vocabulary-keyframes", "20", "--batch-size", "7"]) == 0
    default = describer_for(DEFAULT_MODEL, device="cpu")
    keyframe_map = KeyframeMap.load(out, expected_fingerprint=default.fingerprint)
    assert len(keyframe_map) == 40 and keyframe_map.vocabulary.images == 20
    from tscm_ros.io.bag import FrameSource

    images = [frame.image for frame in FrameSource(route_reference).open()]
    expected = describer_for_map(default, keyframe_map).describe(images)
    stored = keyframe_map.contents().index.faiss_index.reconstruct_n(0, len(keyframe_map))
    assert ((expected * stored).sum(axis=1) > 0.999).all()


def test_existing_map_is_refused_unless_force_or_append(built_map, route_query, tmp_path, capsys):
    before = sorted(p.name for p in built_map.iterdir())
    assert build_map.main(["--bag", str(route_query), "--out", str(built_map)]) == 2
    assert "--force" in capsys.readouterr().err
    assert sorted(p.name for p in built_map.iterdir()) == before

    appended = tmp_path / "appended"
    shutil.copytree(built_map, appended)
    count = len(KeyframeMap.load(appended))
    assert build_map.main(["--bag", str(route_query), "--out", str(appended), "--append",
                           "--min-distance", "15"]) == 0
    grown = KeyframeMap.load(appended)
    assert len(grown) > count and len(set(grown.bags)) == 2


def test_append_with_another_model_is_refused(built_map, tmp_path, capsys, route_query):
    tiny = tmp_path / "tiny.pt"
    from tscm_ros.describe.checkpoint import load_model_config, save_checkpoint
    from tscm_ros.describe.models import build_model

    config, preprocess = load_model_config("tiny", kind="student")
    save_checkpoint(tiny, build_model(config), config, preprocess)
    target = tmp_path / "map"
    shutil.copytree(built_map, target)
    assert build_map.main(["--bag", str(route_query), "--out", str(target), "--append", "--model", str(tiny)]) == 2
    assert "tscm_vlad_default" in capsys.readouterr().err  # says which model the map needs


def test_bad_bags_and_damaged_maps(built_map, tmp_path, capsys):
    assert build_map.main(["--bag", str(tmp_path / "missing"), "--out", str(tmp_path / "m")]) == 2
    assert "missing: no such bag" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()

    damaged = tmp_path / "damaged"
    shutil.copytree(built_map, damaged)
    index = damaged / "index.faiss"
    index.write_bytes(index.read_bytes()[:100])
    with pytest.raises(Exception, match="index.faiss"):
        KeyframeMap.load(damaged)


# build_map --force in another process, stopped inside the map's staging directory or once the new map is in
# place, where the test kills it.
FORCE_KILLED = """
import sys, time
from tscm_ros import atomic
from tscm_ros.map import storage as map_storage
from tscm_ros.cli import build_map

def announce_and_wait(*args, **kwargs):
    print("ready", flush=True)
    time.sleep(600)

write_files = map_storage._write_files
if sys.argv[1] == "staging":
    map_storage._write_files = lambda contents, directory: (write_files(contents, directory), announce_and_wait())
else:
    atomic._remove_stale = announce_and_wait
build_map.main(sys.argv[2:])
"""


def test_force_killed_while_writing_leaves_a_whole_map_and_the_next_run_cleans_up(built_map, route_reference,
                                                                                  tmp_path):
    import signal
    import subprocess
    import sys

    target = tmp_path / "map"
    shutil.copytree(built_map, target)
    old_count = len(KeyframeMap.load(target))
    argv = ["--bag", str(route_reference), "--out", str(target), "--force", "--min-distance", "30"]
    counts = []
    for where in ("staging", "in place"):
        process = subprocess.Popen([sys.executable, "-c", FORCE_KILLED, where, *argv], stdout=subprocess.PIPE,
                                   text=True)
        try:
            assert process.stdout.readline() == "ready\n"
            process.send_signal(signal.SIGKILL)  # kill -9 mid-write
        finally:
            process.wait()
        counts.append(len(KeyframeMap.load(target)))  # a whole map at the path, every time
    assert counts[0] == old_count  # killed while staging: the old map
    assert counts[1] < old_count  # killed once the new map (fewer keyframes, 30 m apart) was in place
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".map.tmp-")]
    assert len(leftovers) == 2  # each as large as a map

    assert build_map.main(["--bag", str(route_reference), "--out", str(target), "--force", "--min-distance", "20"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["map"]
    assert counts[1] < len(KeyframeMap.load(target)) < old_count


def test_odometry_with_nan_or_infinity_is_skipped_and_counted_naming_the_bag_and_topic(tmp_path, capsys):
    from bag_support import BAD_POSES, write_drive

    bag = write_drive(tmp_path / "bag", images=6, bad_poses=BAD_POSES)
    assert build_map.main(["--bag", str(bag), "--out", str(tmp_path / "map"), "--min-distance", "0"]) == 0
    out = capsys.readouterr().out
    assert f"{bag}: 6 frames from /camera/image_raw, poses from /odom (22 messages (4 more skipped" in out
    keyframe_map = KeyframeMap.load(tmp_path / "map")
    assert len(keyframe_map) == 6
    assert np.isfinite(keyframe_map.positions).all()
    assert all(np.isfinite(keyframe_map.keyframe(i).pose.orientation).all() for i in range(6))
    every = {i: ((np.inf, 0.0, 0.0), (0, 0, 0, 1.0)) for i in range(30)}
    bad = write_drive(tmp_path / "bad", images=6, bad_poses=every)
    assert build_map.main(["--bag", str(bad), "--out", str(tmp_path / "bad_map")]) == 2
    assert capsys.readouterr().err == (f"error: {bad}: pose topic /odom has no usable message (26 with a NaN or "
                                       "infinite position or orientation, or a zero quaternion)\n")
    assert not (tmp_path / "bad_map").exists()


def test_force_onto_a_folder_that_is_not_a_map_is_refused_before_the_work(tmp_path, capsys):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "todo.txt").write_text("keep me")
    from bag_support import write_drive

    bag = write_drive(tmp_path / "bag", images=4)
    assert build_map.main(["--bag", str(bag), "--out", str(folder), "--force"]) == 2
    # one line, before a frame is read (was: after the whole map was built)
    assert capsys.readouterr().err == (f"error: cannot save the map to {folder}: it exists and is not a keyframe map; "
                                       "refusing to replace it\n")
    assert (folder / "todo.txt").read_text() == "keep me"


def test_the_same_recording_twice_is_refused_and_the_map_is_left_as_it_was(tmp_path, capsys):
    """--append rerun after a kill that struck just after the save added every keyframe a second time."""
    from bag_support import write_drive

    from tscm_ros.describe.checkpoint import load_model_config, save_checkpoint
    from tscm_ros.describe.models import build_model

    config, preprocess = load_model_config("tiny", kind="student")  # quick to load, as every build here does
    tiny = tmp_path / "tiny.pt"
    save_checkpoint(tiny, build_model(config), config, preprocess)
    bag = write_drive(tmp_path / "bag", images=5, image_size=(120, 160))  # large enough for ORB features
    other = write_drive(tmp_path / "other", images=5, start_ns=1_800_000_000 * 10**9)
    out = tmp_path / "map"
    assert build_map.main(["--bag", str(bag), "--out", str(out), "--min-distance", "0", "--model", str(tiny)]) == 0
    saved = sorted((p.name, p.stat().st_mtime_ns) for p in out.iterdir())
    capsys.readouterr()
    for argv in (["--bag", str(bag), "--out", str(out), "--append"],
                 ["--bag", str(other), "--bag", str(bag), "--out", str(out), "--append"]):
        assert build_map.main([*argv, "--min-distance", "0", "--model", str(tiny)]) == 2
        error = capsys.readouterr().err.splitlines()[-1]
        assert error.startswith(f"error: {bag}: its image stamped ") and error.endswith(
            f"is keyframe 0 of the map already (from {bag}): this recording is in the map; nothing written")
        assert sorted((p.name, p.stat().st_mtime_ns) for p in out.iterdir()) == saved
    # the same recording given twice in one build
    assert build_map.main(["--bag", str(bag), "--bag", f"{bag}/", "--out", str(tmp_path / "twice"), "--model",
                           str(tiny)]) == 2
    assert capsys.readouterr().err.endswith(" is given more than once: its keyframes would be in the map twice\n")
    assert not (tmp_path / "twice").exists()
    # another recording appends as before, also one whose stamps are the map's (simulation time) but not its images
    same_stamps = write_drive(tmp_path / "same_stamps", images=5, image_seed=100, image_size=(120, 160))
    for recording in (other, same_stamps):
        assert build_map.main(["--bag", str(recording), "--out", str(out), "--append", "--min-distance", "0",
                               "--model", str(tiny)]) == 0
    assert len(KeyframeMap.load(out)) == 15
