"""Label-free distillation from a recording (train student --bag): end to end on a real rosbag2, its student
serving build_map and the node over DDS, resuming, and the refusals."""

from __future__ import annotations

import csv
import logging

import numpy as np
import pytest
from node_support import RETRIEVAL_ONLY, Harness, image_message

from tscm_ros.cli import build_map, train
from tscm_ros.describe.checkpoint import load_checkpoint
from tscm_ros.describe.describer import describer_for
from tscm_ros.errors import ConfigError, MapError
from tscm_ros.train.distillation import DistillConfig, distil, load_distill_config, student_model_config

QUICK = ["--set", "epochs=2", "--set", "views=2", "--no-progress"]


@pytest.fixture(scope="module")
def student(route_reference, tmp_path_factory):
    """A student distilled on the reference route's 40 frames, as the README's command makes it."""
    out = tmp_path_factory.mktemp("distil") / "run"
    assert train.main(["student", "--bag", str(route_reference), "--out", str(out), *QUICK]) == 0
    return out


def test_distillation_from_a_bag_gives_a_compact_student_that_keeps_its_vocabulary(student, route_reference):
    loaded = load_checkpoint(student / "student.pt")
    assert loaded.extra["distilled_from"]["frames"] == 40
    assert loaded.extra["distilled_from"]["teacher"] == "tscm_vlad_default"
    assert route_reference.name in loaded.model_config["name"]
    describer = describer_for(student / "student.pt", device="cpu")
    assert describer.dim == 512
    assert not describer.adapts_to_map  # a map keeps the student's distilled vocabulary
    assert describer.vocabulary.source == "distilled"
    with (student / "metrics.csv").open() as stream:
        losses = [float(row["loss"]) for row in csv.DictReader(stream)]
    assert len(losses) == 2 and all(np.isfinite(losses))


def test_distilled_student_learns_the_teachers_metric(tmp_path, route_reference, route_query):
    """Distilling brings the student's similarities closer to the teacher's, from its k-means start, on frames it
    never saw (the other traversal): they correlate better, and no fewer queries share the teacher's top-1."""
    from tscm_ros.io.bag import FrameSource

    frames = [frame.image for frame in FrameSource(route_reference).open()]
    unseen = [frame.image for frame in FrameSource(route_query).open()]
    teacher = describer_for("default", device="cpu")
    _, maps = teacher.describe_with_maps(frames)
    teacher = teacher.with_vocabulary(teacher.fit_vocabulary([m[0] for m in maps]))
    target = teacher.describe(unseen) @ teacher.describe(frames).T
    agreement, correlation = [], []
    for epochs in (0, 8):
        distil(lambda: frames, len(frames), tmp_path / "run", DistillConfig(epochs=epochs, views=3), "reference",
               resume=epochs > 0, show_progress=False)
        student = describer_for(tmp_path / "run" / "student.pt", device="cpu")
        similarity = student.describe(unseen) @ student.describe(frames).T
        agreement.append(float(np.mean(similarity.argmax(axis=1) == target.argmax(axis=1))))
        correlation.append(float(np.mean([np.corrcoef(s, t)[0, 1] for s, t in zip(similarity, target)])))
    assert correlation[1] > correlation[0] + 0.02 and agreement[1] >= agreement[0], (agreement, correlation)


def test_a_teacher_without_a_vocabulary_teaches_from_its_descriptors(route_reference, tmp_path):
    """Any model can teach: the pretrained GeM baseline (no vocabulary to fit) gives its descriptors."""
    from tscm_ros.io.bag import FrameSource

    frames = [frame.image for frame in FrameSource(route_reference).open()][:12]
    result = distil(lambda: frames, len(frames), tmp_path / "run", DistillConfig(teacher="pretrained", epochs=1,
                    views=2), "reference", show_progress=False)
    assert result.teacher == "gem_baseline_offline" and result.frames == 12


def test_students_map_serves_the_node_over_dds(student, route_reference, tmp_path, reference_frames):
    out = tmp_path / "map"
    assert build_map.main(["--bag", str(route_reference), "--out", str(out), "--min-distance", "0",
                           "--model", str(student / "student.pt")]) == 0
    harness = Harness({"map_path": str(out), "model_path": str(student / "student.pt"), "min_score": 0.0,
                       "exclude_recent_s": 0.0, "k": 1, **RETRIEVAL_ONLY})
    try:
        frame = reference_frames[7]
        answer = harness.send(image_message(frame.image, stamp_ns=frame.stamp_ns))
        assert answer.candidates and answer.candidates[0].keyframe_stamp == answer.header.stamp
    finally:
        harness.close()


def test_the_student_maps_online_and_its_map_reloads(student, tmp_path, reference_frames):
    """Mapping mode with the student: the map keeps no vocabulary of its own, finds a revisit, and saves."""
    from tscm_ros.map.keyframe_map import KeyframeMap

    map_dir = tmp_path / "online_map"
    harness = Harness({"mapping": True, "map_path": str(map_dir), "model_path": str(student / "student.pt"),
                       "keyframe_min_distance_m": 0.0, "keyframe_min_interval_s": 0.0, "exclude_recent_s": 0.0,
                       "min_score": 0.0, **RETRIEVAL_ONLY})
    try:
        for frame in reference_frames[:6]:
            harness.send(image_message(frame.image, frame.stamp_ns))
        first = reference_frames[0]
        again = harness.send(image_message(first.image, first.stamp_ns + 1))
        assert again.candidates[0].keyframe_id == 0
    finally:
        harness.close()
    saved = KeyframeMap.load(map_dir)
    assert len(saved) == 7 and saved.vocabulary is None and saved.model_name.startswith("tscm_student_distilled")


def test_a_student_from_another_map_is_refused_naming_both(student, route_reference, route_query, tmp_path):
    other = tmp_path / "other"
    assert train.main(["student", "--bag", str(route_query), "--out", str(other), *QUICK]) == 0
    out = tmp_path / "map"
    assert build_map.main(["--bag", str(route_reference), "--out", str(out), "--min-distance", "0",
                           "--model", str(student / "student.pt")]) == 0
    with pytest.raises(MapError) as refused:
        Harness({"map_path": str(out), "model_path": str(other / "student.pt")})
    message = str(refused.value)
    assert f"({route_reference.name})" in message and f"({route_query.name})" in message, message


def test_an_interrupted_distillation_resumes_and_recomputes_nothing(student, route_reference, tmp_path, caplog):
    run = tmp_path / "run"
    assert train.main(["student", "--bag", str(route_reference), "--out", str(run), "--set", "epochs=1",
                       "--set", "views=2", "--no-progress"]) == 0
    features = sorted((run / "features").iterdir())
    written = [path.stat().st_mtime_ns for path in features]
    (run / "student.pt").unlink()  # as if stopped before the end
    with caplog.at_level(logging.INFO, logger="train"):
        assert train.main(["student", "--bag", str(route_reference), "--out", str(run), "--resume",
                           "--set", "epochs=2", "--no-progress"]) == 0
    log = caplog.text
    assert "resuming after epoch 1 of 2" in log and "epoch 1/2" not in log, log
    assert [path.stat().st_mtime_ns for path in features] == written
    with (run / "metrics.csv").open() as stream:
        assert [row["epoch"] for row in csv.DictReader(stream)] == ["1", "2"]
    # the same two epochs in one go give the same student
    assert load_checkpoint(run / "student.pt").fingerprint == load_checkpoint(student / "student.pt").fingerprint


def test_bad_settings_and_runs_are_clear_errors(student, route_reference, route_query, tmp_path, capsys):
    with pytest.raises(ConfigError, match="lr"):
        load_distill_config(None, ["lr=.nan"])
    with pytest.raises(ConfigError, match="vocabulary: model"):
        student_model_config(DistillConfig(model="vlad_default"))  # the default is no student
    with pytest.raises(ConfigError, match="seed"):
        load_distill_config(None, ["seed=-1"])
    assert train.main(["student", "--bag", str(route_reference), "--out", str(student), *QUICK]) == 2
    assert "not empty" in capsys.readouterr().err
    # a bad teacher fails before the run directory exists, so the corrected command starts afresh
    assert train.main(["student", "--bag", str(route_reference), "--out", str(tmp_path / "typo"),
                       "--teacher", str(tmp_path / "no_such.pt"), *QUICK]) == 2
    assert "no_such.pt" in capsys.readouterr().err and not (tmp_path / "typo").exists()
    # resuming on another recording, or with fewer epochs than done, is refused
    assert train.main(["student", "--bag", str(route_query), "--out", str(student), "--resume", *QUICK]) == 2
    assert "another recording" in capsys.readouterr().err
    assert train.main(["student", "--bag", str(route_reference), "--out", str(student), "--resume",
                       "--set", "epochs=1", "--no-progress"]) == 2
    assert "epochs >= 2" in capsys.readouterr().err
    assert train.main(["student", "--bag", str(tmp_path / "missing"), "--out", str(tmp_path / "run")]) == 2
    assert "no such bag" in capsys.readouterr().err
