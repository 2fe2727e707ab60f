"""A training run's directory and state: progress from epoch to epoch, the run lock, last.pt and --resume."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
import yaml

from tscm_ros.errors import CheckpointError, ConfigError
from tscm_ros.train.config import TrainConfig
from tscm_ros.train.run import Distributed, Progress, RunLock, restore_state, save_state, start_run
from tscm_ros.train.validation import MAX_RECALL_KEY

ALONE = Distributed(rank=0, world_size=1, local_rank=0)


def recall(r1: float, max_recall: float = 0.5, r5: float = 0.9, r10: float = 0.95) -> dict:
    return {1: r1, 5: r5, 10: r10, MAX_RECALL_KEY: max_recall}


def test_progress_keeps_the_best_epoch_and_stops_after_patience_epochs_without_one():
    run = Progress()
    assert run.record({"epoch": 1}, recall(0.5), patience=2)
    assert run.record({"epoch": 2}, recall(0.5, max_recall=0.6), patience=2)  # a tie on recall@1, broken next
    assert not run.record({"epoch": 3}, recall(0.4), patience=2)
    assert not run.stopped_early
    assert not run.record({"epoch": 4}, recall(math.nan), patience=2)  # NaN counts as worse than anything
    assert run.stopped_early
    assert (run.epoch, run.best_epoch, run.stale_epochs, len(run.history)) == (4, 2, 2, 4)
    assert run.best_recall == {1: 0.5, MAX_RECALL_KEY: 0.6, 5: 0.9, 10: 0.95}
    assert Progress().best_recall == {}


def test_progress_stops_after_an_epoch_with_nothing_to_learn_unless_patience_is_0():
    run = Progress()
    assert run.record({"epoch": 1}, recall(0.5), patience=3, learned=False)  # the best so far, and still stops
    assert run.stopped_early and run.stop_reason == "no triplet came inside the margin in a whole epoch"
    never = Progress()
    never.record({"epoch": 1}, recall(0.5), patience=0, learned=False)
    assert not never.stopped_early and never.stop_reason == ""
    stale = Progress()
    for epoch in (1, 2):
        stale.record({"epoch": epoch}, recall(0.5), patience=1)
    assert stale.stopped_early and stale.stop_reason == "no better validation in 1 epoch(s)"


def test_a_new_run_takes_an_empty_directory_and_holds_it(tmp_path):
    run_dir = tmp_path / "run"
    saved, lock = start_run(run_dir, False, TrainConfig(model="tiny"), "teacher", None, ALONE)
    try:
        assert saved is None
        assert yaml.safe_load((run_dir / "config.yaml").read_text())["model"] == "tiny"
        with pytest.raises(ConfigError, match="in use"):
            RunLock(run_dir)
    finally:
        lock.release()
    with pytest.raises(ConfigError, match="already exists and is not empty"):
        start_run(run_dir, False, TrainConfig(model="tiny"), "teacher", None, ALONE)
    with pytest.raises(ConfigError, match="does not exist"):
        start_run(tmp_path / "missing", True, TrainConfig(model="tiny"), "teacher", None, ALONE)


def _training_objects(seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    return model, optimizer, torch.amp.GradScaler("cuda", enabled=False)


def test_resume_restores_the_model_the_optimiser_and_the_progress(tmp_path):
    run_dir = tmp_path / "run"
    _, lock = start_run(run_dir, False, TrainConfig(model="tiny"), "student", "t" * 16, ALONE)
    model, optimizer, scaler = _training_objects(0)
    model(torch.ones(1, 4)).sum().backward()
    optimizer.step()
    run = Progress()
    run.record({"epoch": 1, "loss": 0.5}, recall(0.7), patience=0)
    save_state(run_dir / "last.pt", run, model, optimizer, scaler, "student", "t" * 16)
    lock.release()

    with pytest.raises(CheckpointError, match="another teacher"):
        start_run(run_dir, True, TrainConfig(model="tiny"), "student", "u" * 16, ALONE)
    with pytest.raises(CheckpointError, match="not a teacher run"):
        start_run(run_dir, True, TrainConfig(model="tiny"), "teacher", None, ALONE)
    saved, lock = start_run(run_dir, True, TrainConfig(model="tiny"), "student", "t" * 16, ALONE)
    try:
        fresh, fresh_optimizer, fresh_scaler = _training_objects(1)
        restored = restore_state(saved, fresh, fresh_optimizer, fresh_scaler, run_dir / "last.pt")
    finally:
        lock.release()
    assert restored == run
    assert torch.equal(fresh.weight, model.weight)
    assert fresh_optimizer.state_dict()["state"][0]["step"] == 1


def test_a_damaged_last_pt_is_refused_with_its_name(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "last.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot resume from .*last.pt"):
        start_run(run_dir, True, TrainConfig(model="tiny"), "teacher", None, ALONE)


def test_a_new_run_that_fails_before_a_checkpoint_leaves_no_run_folder(tmp_path, capsys):
    """An image of the dataset is unreadable: train fails once the run folder exists, and removes it, so the
    same command runs again (and fails the same way, not with 'already exists')."""
    from bag_support import write_drive

    from tscm_ros.cli import extract_dataset, train

    bags = [write_drive(tmp_path / f"drive{t}", images=12, speed_m_s=25.0, start_ns=(1_700_000 + 1000 * t) * 10**9)
            for t in range(3)]
    data = tmp_path / "data"
    assert extract_dataset.main([*(arg for bag in bags for arg in ("--bag", str(bag))), "--out", str(data),
                                 "--split", "traversal", "--no-progress"]) == 0
    (data / "images" / "seq00_000003.png").write_bytes(b"not a png")
    run = tmp_path / "run"
    config = Path(__file__).parent.parent / "config" / "train_tiny.yaml"
    argv = ["teacher", "--data", str(data), "--out", str(run), "--config", str(config), "--set", "device=cpu",
            "--no-progress"]
    for _ in range(2):
        assert train.main(argv) == 2
        error = capsys.readouterr().err
        assert error == f"error: dataset {data}: image images/seq00_000003.png is missing or unreadable\n"
        assert not run.exists()
    run.mkdir()  # an empty folder given as the run: left empty
    assert train.main(argv) == 2
    assert run.is_dir() and not any(run.iterdir())


def test_a_failed_run_folder_holding_a_checkpoint_is_never_removed(tmp_path):
    from tscm_ros.train.run import abandon_new_run

    run = tmp_path / "run"
    (run / "sub").mkdir(parents=True)
    (run / "sub" / "best.pt").write_bytes(b"weights")
    (run / "config.yaml").write_text("x: 1")
    assert not abandon_new_run(run, existed=False)
    assert (run / "sub" / "best.pt").read_bytes() == b"weights" and (run / "config.yaml").is_file()
    (run / "sub" / "best.pt").unlink()
    assert abandon_new_run(run, existed=True) and run.is_dir() and not any(run.iterdir())
    assert abandon_new_run(run, existed=False) and not run.exists()


def test_extract_dataset_overwrite_refuses_a_run_folder_a_trainer_holds(tmp_path, capsys):
    """The run lock train --resume checks: held by another process, extract_dataset --overwrite leaves the run."""
    import subprocess
    import sys

    from bag_support import write_drive

    from tscm_ros.cli import extract_dataset

    bag = write_drive(tmp_path / "drive", images=4)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("model: tiny\n")
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from tscm_ros.train.run import RunLock; "
        f"RunLock(Path({str(run)!r})); print('locked', flush=True); sys.stdin.read()")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        argv = ["--bag", str(bag), "--out", str(run), "--overwrite", "--no-progress"]
        assert extract_dataset.main(argv) == 2
        assert capsys.readouterr().err == (f"error: --overwrite: {run} is a training run in use: train process "
                                           f"{holder.pid} on {os.uname().nodename} is training in it; replacing it "
                                           "would pull the run out from under that process (wait for it to end, or "
                                           "stop it)\n")
        assert (run / "config.yaml").read_text() == "model: tiny\n"
    finally:
        holder.stdin.close()
        holder.wait()
    # the holder gone, the lock is free: --overwrite does what it says
    assert extract_dataset.main(argv) == 0
    assert (run / "frames.csv").is_file() and not (run / "config.yaml").exists()
