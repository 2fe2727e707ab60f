"""extract_dataset -> train teacher -> train student -> evaluate, end to end on real rosbag2 routes
(tiny models, CPU), plus resume after kill -9, a 2-process DDP run and bad input."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from tscm_ros.cli import evaluate, extract_dataset, train
from tscm_ros.describe.checkpoint import load_checkpoint, load_model_config, save_checkpoint
from tscm_ros.describe.describer import describer_for
from tscm_ros.describe.models import build_model
from tscm_ros.errors import ConfigError
from tscm_ros.evaluate.recall import evaluate_split
from tscm_ros.io.dataset import load_dataset
from tscm_ros.sim.simulate import simulate_route
from tscm_ros.train.config import default_config_path, load_train_config, resolve_model_config
from tscm_ros.train.mining import MiningConfig

REPO = Path(__file__).resolve().parent.parent
TINY = str(REPO / "config" / "train_tiny.yaml")
RADIUS_M = 10.0  # the tiny town's frames are 5 m apart: 25 m would count most of a split as correct

torch.set_num_threads(1)  # tiny tensors: a second thread only adds waiting on a busy machine


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    env.pop("WORLD_SIZE", None)
    return env


def _metrics(run: Path) -> list[dict]:
    with open(run / "metrics.csv", newline="") as stream:
        return list(csv.DictReader(stream))


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory) -> Path:
    """Two traversals of a 1 km rendered loop, 200 frames each (5 m apart), as a dataset."""
    root = tmp_path_factory.mktemp("training")
    route = dict(seed=0, frames=200, width=96, height=72, route_length_m=1000.0, progress=False)
    bags = [simulate_route(root / f"traversal{t}", traversal=t, **route) for t in (0, 1)]
    out = root / "dataset"
    argv = ["--bag", str(bags[0]), "--bag", str(bags[1]), "--out", str(out), "--no-progress",
            "--cell-m", "40", "--val-fraction", "0.2", "--test-fraction", "0.25"]
    assert extract_dataset.main(argv) == 0
    return out


@pytest.fixture(scope="module")
def teacher_run(dataset_dir: Path) -> Path:
    run = dataset_dir.parent / "teacher"
    argv = ["teacher", "--data", str(dataset_dir), "--out", str(run), "--config", TINY, "--set", "epochs=6",
            "--no-progress"]
    assert train.main(argv) == 0
    return run


@pytest.fixture(scope="module")
def student_run(dataset_dir: Path, teacher_run: Path) -> Path:
    run = dataset_dir.parent / "student"
    argv = ["student", "--data", str(dataset_dir), "--teacher", str(teacher_run / "best.pt"), "--out", str(run),
            "--config", TINY, "--no-progress"]
    assert train.main(argv) == 0
    return run


def test_distilled_student_beats_an_untrained_student_on_the_test_split(dataset_dir: Path, student_run: Path,
                                                                         tmp_path: Path):
    dataset = load_dataset(dataset_dir)
    distilled = describer_for(student_run / "best.pt", device="cpu")
    config, preprocess_config = load_model_config("tiny", kind="student")
    save_checkpoint(tmp_path / "untrained.pt", build_model(config), config, preprocess_config)
    untrained = describer_for(tmp_path / "untrained.pt", device="cpu")
    assert distilled.model_name == untrained.model_name  # same architecture
    distilled_recall = evaluate_split(dataset, "test", distilled, RADIUS_M, (1, 5, 10))
    untrained_recall = evaluate_split(dataset, "test", untrained, RADIUS_M, (1, 5, 10))
    print(f"test recall@1: distilled {distilled_recall.recall[1]:.3f}, untrained {untrained_recall.recall[1]:.3f} "
          f"on {distilled_recall.num_queries} queries")
    assert distilled_recall.num_queries >= 5
    assert distilled_recall.recall[1] > untrained_recall.recall[1]


def test_run_directories_hold_config_metrics_curves_and_checkpoints(teacher_run: Path, student_run: Path):
    for run, kind in ((teacher_run, "teacher"), (student_run, "student")):
        config = yaml.safe_load((run / "config.yaml").read_text())
        assert config["model"]["kind"] == kind and "preprocess" in config["model"]  # model config inline
        rows = _metrics(run)
        assert [int(row["epoch"]) for row in rows] == list(range(1, config["epochs"] + 1))
        assert all(0.0 <= float(row["val_recall@1"]) <= 1.0 for row in rows)
        assert (run / "learning_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        best = load_checkpoint(run / "best.pt", expected_kind=kind)
        columns = ("val_recall@1", "val_max_recall_p100", "val_recall@5", "val_recall@10")  # the selection order
        best_row = max(rows, key=lambda row: tuple(float(row[c]) for c in columns))
        assert best.extra["epoch"] == int(best_row["epoch"])
        state = torch.load(run / "last.pt", map_location="cpu", weights_only=True)
        assert state["epoch"] == config["epochs"] and state["progress"]["epoch"] == config["epochs"]
    student_rows = _metrics(student_run)
    # the student moves to the teacher
    assert float(student_rows[-1]["loss_soft"]) < float(student_rows[0]["loss_soft"])
    student = load_checkpoint(student_run / "best.pt")
    assert student.extra["teacher_fingerprint"] == load_checkpoint(teacher_run / "best.pt").fingerprint


def test_evaluate_puts_models_side_by_side(
    dataset_dir: Path, teacher_run: Path, student_run: Path, tmp_path: Path, capsys
):
    out = tmp_path / "eval"
    argv = ["--data", str(dataset_dir), "--model", str(teacher_run / "best.pt"),
            "--model", str(student_run / "best.pt"),
            "--model", "pretrained", "--out", str(out), "--device", "cpu", "--radius-m", str(RADIUS_M)]
    assert evaluate.main(argv) == 0
    table = (out / "recall.md").read_text()
    assert "| model | R@1 | R@5 | R@10 | R@20 |" in table
    assert "tscm_teacher_tiny" in table and "tscm_student_tiny" in table and "gem_baseline_offline" in table
    assert (out / "recall.png").read_bytes()[:4] == b"\x89PNG"
    summary = json.loads((out / "recall.json").read_text())
    student = describer_for(student_run / "best.pt", device="cpu")
    expected = evaluate_split(load_dataset(dataset_dir), "test", student, RADIUS_M, (1, 5, 10, 20))
    assert summary["models"][1]["recall"]["1"] == pytest.approx(expected.recall[1])
    assert evaluate.main(argv) == 2  # refuses to overwrite
    assert "already exists" in capsys.readouterr().err


def test_resume_after_kill_9_continues_exactly_where_it_stopped(dataset_dir: Path, teacher_run: Path, tmp_path: Path):
    common = ["student", "--data", str(dataset_dir), "--teacher", str(teacher_run / "best.pt")]
    small = ["--config", TINY, "--set", "epochs=4", "--set", "triplets_per_epoch=32", "--no-progress"]
    reference = tmp_path / "reference"
    assert train.main([*common, "--out", str(reference), *small]) == 0

    run = tmp_path / "killed"
    command = [sys.executable, "-m", "tscm_ros.cli.train", *common, "--out", str(run), *small]
    process = subprocess.Popen(command, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while not (run / "last.pt").exists() and process.poll() is None:
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
    state = torch.load(run / "last.pt", map_location="cpu", weights_only=True)
    assert 1 <= state["epoch"] < 4  # killed during training, after at least one saved epoch

    assert train.main([*common, "--out", str(run), "--resume", "--no-progress"]) == 0
    resumed, uninterrupted = _metrics(run), _metrics(reference)
    assert [row["epoch"] for row in resumed] == ["1", "2", "3", "4"]
    for got, want in zip(resumed, uninterrupted):  # the same numbers: no epoch lost, none trained twice
        assert got.keys() == want.keys()
        for key in got.keys() - {"seconds"}:
            assert float(got[key]) == pytest.approx(float(want[key]), rel=1e-4, abs=1e-6), key


def test_a_teacher_stops_after_an_epoch_without_a_triplet_inside_the_margin(dataset_dir: Path, tmp_path: Path,
                                                                             capsys, monkeypatch):
    # When the hard loss reaches exactly 0 depends on the data; here it does in epoch 2 (the real epoch runs,
    # its reported hard loss is set to 0), and the run stops there unless patience is 0 ("never stop").
    from tscm_ros.train import training

    real_train_epoch, epochs = training._train_epoch, []

    def hard_loss_zero_from_epoch_2(*args, **kwargs):
        losses = real_train_epoch(*args, **kwargs)
        epochs.append(losses)
        return {**losses, "loss": 0.0, "loss_hard": 0.0} if len(epochs) >= 2 else losses

    monkeypatch.setattr(training, "_train_epoch", hard_loss_zero_from_epoch_2)
    run = tmp_path / "teacher"
    argv = ["teacher", "--data", str(dataset_dir), "--out", str(run), "--config", TINY, "--set", "epochs=6",
            "--set", "patience=5", "--no-progress"]
    assert train.main(argv) == 0
    assert "2 epoch(s) (stopped early: no triplet came inside the margin in a whole epoch)" in capsys.readouterr().out
    assert len(_metrics(run)) == 2 and (run / "best.pt").is_file()
    # the stop is kept in last.pt: resuming trains nothing more
    assert train.main(argv + ["--resume"]) == 0
    assert "2 epoch(s) (stopped early" in capsys.readouterr().out and len(_metrics(run)) == 2
    # patience 0: never stop early
    epochs.clear()
    assert train.main(["teacher", "--data", str(dataset_dir), "--out", str(tmp_path / "on"), "--config", TINY,
                       "--set", "epochs=3", "--set", "patience=0", "--no-progress"]) == 0
    assert "3 epoch(s);" in capsys.readouterr().out


def test_a_run_directory_in_use_is_refused_to_a_second_trainer(dataset_dir: Path, tmp_path: Path, capsys):
    """Two trainers in one run folder would both write last.pt, best.pt and metrics.csv."""
    run = tmp_path / "busy"
    argv = ["teacher", "--data", str(dataset_dir), "--out", str(run), "--config", TINY, "--set", "epochs=50",
            "--set", "triplets_per_epoch=16", "--no-progress"]
    process = subprocess.Popen([sys.executable, "-m", "tscm_ros.cli.train", *argv], env=_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while not (run / "metrics.csv").exists() and process.poll() is None:
            time.sleep(0.05)
        assert process.poll() is None, "the first trainer ended before the second one started"
        assert train.main([*argv, "--resume"]) == 2
        error = capsys.readouterr().err
        assert error == (f"error: run directory {run} is in use: train process {process.pid} on {os.uname().nodename} "
                         "is training in it (wait for it to end, or stop it, before resuming)\n"), error
        assert train.main(argv) == 2  # nor can a new run start there
        assert "already exists" in capsys.readouterr().err
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    done = len(_metrics(run))
    # kill -9 released the lock with the process: the run resumes (no epoch left to train at epochs=1)
    assert train.main([*argv, "--resume", "--set", "epochs=1"]) == 0
    assert len(_metrics(run)) == done


def test_two_process_ddp_run_trains_and_writes_a_checkpoint(dataset_dir: Path, tmp_path: Path):
    run = tmp_path / "ddp"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--rdzv-backend=c10d",
        "--rdzv-endpoint=127.0.0.1:0", "--nnodes=1", "-m", "tscm_ros.cli.train", "teacher", "--data", str(dataset_dir),
        "--out", str(run), "--config", TINY, "--set", "epochs=1", "--set", "triplets_per_epoch=16", "--no-progress",
    ]
    result = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("train teacher: 1 epoch(s)") == 1  # only rank 0 reports
    assert load_checkpoint(run / "best.pt", expected_kind="teacher").kind == "teacher"
    rows = _metrics(run)
    assert len(rows) == 1 and rows[0]["triplets"] == "16"


def test_a_student_checkpoint_is_refused_as_teacher_and_nothing_is_written(dataset_dir: Path, tmp_path: Path, capsys):
    model_config, preprocess = load_model_config("tiny", kind="student")
    not_a_teacher = tmp_path / "student.pt"
    save_checkpoint(not_a_teacher, build_model(model_config), model_config, preprocess)
    run = tmp_path / "run"
    argv = ["student", "--data", str(dataset_dir), "--teacher", str(not_a_teacher), "--out", str(run), "--config", TINY]
    assert train.main(argv) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and str(not_a_teacher) in error and "teacher" in error
    assert not run.exists()


def test_bad_settings_datasets_and_run_directories_are_refused(
    dataset_dir: Path, teacher_run: Path, tmp_path: Path, capsys
):
    base = ["teacher", "--data", str(dataset_dir), "--config", TINY, "--no-progress"]
    assert train.main([*base, "--out", str(tmp_path / "a"), "--set", "learning_rate=1"]) == 2
    assert "learning_rate" in capsys.readouterr().err
    assert train.main([*base, "--out", str(teacher_run)]) == 2
    assert "--resume" in capsys.readouterr().err
    nothing = ["teacher", "--data", str(tmp_path / "nothing"), "--out", str(tmp_path / "b"), "--config", TINY]
    assert train.main(nothing) == 2
    assert "nothing" in capsys.readouterr().err
    single = tmp_path / "single"  # one traversal only: no query frames to validate with
    (single / "images").mkdir(parents=True)
    with open(dataset_dir / "frames.csv", newline="") as stream:
        rows = [row for row in csv.DictReader(stream) if row["role"] == "database"]
    for row in rows:
        (single / row["image"]).write_bytes((dataset_dir / row["image"]).read_bytes())
    with open(single / "frames.csv", "w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (single / "manifest.json").write_text((dataset_dir / "manifest.json").read_text())
    assert train.main(["teacher", "--data", str(single), "--out", str(tmp_path / "c"), "--config", TINY]) == 2
    assert "record the route again" in capsys.readouterr().err
    assert not any((tmp_path / name).exists() for name in ("a", "b", "c"))


def test_shipped_training_configs_parse_and_name_models_of_their_kind():
    for kind in ("teacher", "student"):
        config = load_train_config(default_config_path(kind))
        model_config, preprocess = resolve_model_config(config, kind)
        assert model_config["kind"] == kind and preprocess.height > 0
    config = load_train_config(TINY, ["lr=1e-4", "heading_deg=45", "epochs=2"])
    assert (config.lr, config.mining.heading_deg, config.epochs) == (1e-4, 45, 2)
    with pytest.raises(ConfigError, match="epochs"):
        load_train_config(TINY, ["epochs=0"])
    with pytest.raises(ConfigError, match="wrong type"):
        load_train_config(TINY, ["batch_size=many"])


def test_mining_settings_are_flat_keys_in_the_files_and_one_value_in_the_config(tmp_path: Path):
    config = load_train_config(TINY, ["positive_radius_m=5", "negative_radius_m=12", "heading_deg=30"])
    assert config.mining == MiningConfig(5.0, 12.0, 30, config.mining.negatives_per_triplet,
                                         config.mining.negative_candidates)
    flat = config.to_dict()
    assert "mining" not in flat and (flat["positive_radius_m"], flat["heading_deg"]) == (5.0, 30)
    written = tmp_path / "config.yaml"
    written.write_text(yaml.safe_dump(flat, sort_keys=False))
    assert load_train_config(written) == config
    assert load_train_config(default_config_path("teacher")).mining.positive_radius_m == "auto"
    with pytest.raises(ConfigError, match="positive_radius_m <= negative_radius_m"):
        load_train_config(TINY, ["positive_radius_m=30", "negative_radius_m=25"])
    with pytest.raises(ConfigError, match="unknown training setting"):
        load_train_config(TINY, ["mining={}"])
