"""The README's "train for your environment" commands, run as written (default configs, no --set) on a
small rendered site: three traversals of a 60 m loop, then a fourth under other conditions as the query.
The distilled student must beat the pretrained GeM baseline on that query traversal. (The full figures,
on larger sites and more conditions, come from bench/recognition.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tscm_ros.cli import evaluate, extract_dataset, train
from tscm_ros.errors import DatasetError
from tscm_ros.sim.simulate import simulate_route

ROUTE = dict(seed=21, frames=30, width=128, height=96, route_length_m=60.0, aliasing=0.3, progress=False)
QUERY_CONDITION = "haze"


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("site")
    for traversal, condition in ((0, "day"), (1, "auto"), (2, "day"), (3, QUERY_CONDITION)):
        simulate_route(root / f"run{traversal + 1}", traversal=traversal, condition=condition, **ROUTE)
    return root


@pytest.fixture(scope="module")
def trained(site: Path) -> Path:
    runs = [str(site / f"run{i}") for i in (1, 2, 3)]
    assert extract_dataset.main(["--bag", runs[0], "--bag", runs[1], "--bag", runs[2], "--out", str(site / "data"),
                                 "--every-m", "2", "--no-progress"]) == 0
    assert train.main(["teacher", "--data", str(site / "data"), "--out", str(site / "teacher"), "--no-progress"]) == 0
    assert train.main(["student", "--data", str(site / "data"), "--teacher", str(site / "teacher" / "best.pt"),
                       "--out", str(site / "student"), "--no-progress"]) == 0
    return site


def test_small_site_split_and_radii_come_from_the_data(trained: Path, capsys):
    manifest = json.loads((trained / "data" / "manifest.json").read_text())
    assert manifest["split"]["mode"] == "traversal"
    assert "held-out traversal 2" in manifest["split"]["reason"]
    config = yaml.safe_load((trained / "teacher" / "config.yaml").read_text())
    assert config["positive_radius_m"] == 5.0 and config["negative_radius_m"] == 12.5  # frames 2 m apart
    assert config["augment"]["enabled"] is True


def test_distilled_student_beats_the_gem_baseline_on_a_traversal_nobody_trained_on(trained: Path, capsys):
    out = trained / "eval"
    assert evaluate.main(["--bag", str(trained / "run1"), "--query-bag", str(trained / "run4"), "--out", str(out),
                          "--radius-m", "5", "--baselines", "gem", "--device", "cpu",
                          "--model", f"student={trained / 'student' / 'best.pt'}",
                          "--model", f"teacher={trained / 'teacher' / 'best.pt'}"]) == 0
    print(capsys.readouterr().out)
    methods = {m["name"]: m for m in json.loads((out / "loop_closure.json").read_text())["methods"]}
    gem = methods["GeM baseline (pretrained, no training)"]["recall_at"]["1"]
    student = methods["student"]["recall_at"]["1"]
    teacher = methods["teacher"]["recall_at"]["1"]
    print(f"{QUERY_CONDITION} traversal, R@1 within 5 m: student {student:.3f}, teacher {teacher:.3f}, GeM {gem:.3f}")
    assert student > gem


def test_one_traversal_cannot_train_and_the_error_says_what_to_record(site: Path, tmp_path: Path):
    data = tmp_path / "one"
    # one bag: a place split of one traversal; training has no second view of any place
    assert extract_dataset.main(["--bag", str(site / "run1"), "--out", str(data), "--every-m", "2", "--no-progress",
                                 "--val-fraction", "0.3", "--test-fraction", "0"]) == 0
    with pytest.raises(DatasetError, match="record the route again"):
        from tscm_ros.train.config import default_config_path, load_train_config
        from tscm_ros.train.training import train as train_model

        config = load_train_config(default_config_path("teacher"))
        train_model("teacher", data, tmp_path / "run", config, progress=False)
