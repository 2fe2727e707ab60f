"""Checkpoints: round trip, fingerprints, corrupt and mismatched files, TorchScript export; model configs."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from tscm_ros.describe.checkpoint import (
    export_onnx,
    export_torchscript,
    find_config_file,
    load_checkpoint,
    load_model_config,
    load_torchscript,
    model_fingerprint,
    save_checkpoint,
)
from tscm_ros.describe.describer import onnxruntime_available
from tscm_ros.describe.models import build_model
from tscm_ros.errors import CheckpointError, ConfigError

REPO_CONFIG = Path(__file__).resolve().parents[1] / "config"


def tiny(kind: str):
    config, preprocess = load_model_config("tiny", kind)
    return build_model(config), config, preprocess


def images(preprocess, count=3, seed=0):
    return torch.randn(count, 3, preprocess.height, preprocess.width, generator=torch.Generator().manual_seed(seed))


def trained_a_little(model, preprocess):
    """Change every weight and batch-norm statistic, so a round trip cannot pass by re-initialisation."""
    model.train()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
        model(images(preprocess, 4, seed=9))
    return model.eval()


@pytest.mark.parametrize("kind", ["student", "teacher"])
def test_round_trip_gives_identical_descriptors(tmp_path, kind):
    model, config, preprocess = tiny(kind)
    model = trained_a_little(model, preprocess)
    path = tmp_path / "sub" / f"{kind}.pt"
    fingerprint = save_checkpoint(path, model, config, preprocess, extra={"epoch": 3, "recall@1": 0.5})
    loaded = load_checkpoint(path, expected_kind=kind)
    assert (loaded.kind, loaded.fingerprint, loaded.preprocess) == (kind, fingerprint, preprocess)
    assert loaded.model_config == config and loaded.extra == {"epoch": 3, "recall@1": 0.5}
    assert not loaded.model.training
    batch = images(preprocess)
    with torch.no_grad():
        assert torch.equal(loaded.model(batch), model(batch))
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left behind


def test_fingerprint_depends_on_weights_config_and_preprocessing():
    model, config, preprocess = tiny("student")
    state = model.state_dict()
    base = model_fingerprint(config, preprocess, state)
    assert base == model_fingerprint(json.loads(json.dumps(config)), preprocess, dict(reversed(state.items())))
    changed = {k: v.clone() for k, v in state.items()}
    changed["token_projection.bias"][0] += 1e-6
    assert model_fingerprint(config, preprocess, changed) != base
    assert model_fingerprint({**config, "name": "other"}, preprocess, state) != base
    other_preprocess = type(preprocess)(**{**preprocess.to_dict(), "resize": "short_side_center_crop"})
    assert model_fingerprint(config, other_preprocess, state) != base


def test_missing_truncated_and_foreign_files_raise_checkpoint_error(tmp_path):
    model, config, preprocess = tiny("student")
    path = tmp_path / "student.pt"
    save_checkpoint(path, model, config, preprocess)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "absent.pt")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated.pt"):
        load_checkpoint(truncated)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00not a checkpoint at all" * 10)
    with pytest.raises(CheckpointError, match="garbage.pt"):
        load_checkpoint(garbage)
    plain = tmp_path / "plain_state_dict.pt"
    torch.save(model.state_dict(), plain)
    with pytest.raises(CheckpointError, match="not a tscm_ros checkpoint"):
        load_checkpoint(plain)


class Payload:
    """An arbitrary object: unpickling it would run user code, so loading must refuse it."""


def test_a_pickled_object_is_refused_not_unpickled(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": "tscm_ros.checkpoint", "payload": Payload()}, path)
    with pytest.raises(CheckpointError, match="evil.pt"):
        load_checkpoint(path)


class RunsACommand:
    """Unpickling this would run ``os.system``: the file a hostile user hands in."""

    def __reduce__(self):
        import os

        return (os.system, ("echo this must never run",))


def test_refused_files_are_one_line_that_names_the_file_and_the_problem(tmp_path, capsys):
    """PyTorch's own text spans lines and suggests weights_only=False, i.e. running the refused file."""
    from tscm_ros.cli import export_model
    from tscm_ros.train.config import load_train_config
    from tscm_ros.train.run import Distributed, start_run

    hostile = tmp_path / "hostile.pt"
    torch.save({"format": "tscm_ros.checkpoint", "payload": RunsACommand()}, hostile)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(bytes(range(256)) * 8)
    truncated = tmp_path / "truncated.pt"
    model, config, preprocess = tiny("student")
    save_checkpoint(truncated, model, config, preprocess)
    truncated.write_bytes(truncated.read_bytes()[:3000])
    problems = {hostile: "it holds a Python object (posix.system)", garbage: "not a PyTorch file",
                truncated: "corrupt or truncated"}
    for path, problem in problems.items():
        with pytest.raises(CheckpointError) as raised:
            load_checkpoint(path)
        message = str(raised.value)
        assert message.startswith(f"cannot read checkpoint {path}: {problem}") and "\n" not in message, message
        assert "weights_only" not in message and len(message) < 300, message

    run = tmp_path / "run"
    run.mkdir()
    (run / "last.pt").write_bytes(hostile.read_bytes())
    with pytest.raises(CheckpointError) as raised:
        start_run(run, True, load_train_config(REPO_CONFIG / "train_tiny.yaml", []), "teacher", None,
                  Distributed(0, 1, 0))
    last = run / "last.pt"
    assert str(raised.value).startswith(f"cannot resume from {last}: it holds a Python object (posix.system)")
    assert "\n" not in str(raised.value) and "weights_only" not in str(raised.value)

    assert export_model.main(["--onnx", "--model", str(hostile), "--out", str(tmp_path / "model.onnx")]) == 2
    assert capsys.readouterr().err == (f"error: cannot read checkpoint {hostile}: it holds a Python object "
                                       "(posix.system) besides tensors and plain values: refused without loading it "
                                       "(tscm_ros never unpickles objects)\n")


def rewrite(path, change):
    payload = torch.load(path, weights_only=True)
    change(payload)
    torch.save(payload, path)


def test_edited_weights_fail_the_fingerprint_check(tmp_path):
    model, config, preprocess = tiny("student")
    path = tmp_path / "student.pt"
    save_checkpoint(path, model, config, preprocess)
    rewrite(path, lambda p: p["state_dict"]["token_projection.weight"].mul_(1.5))
    with pytest.raises(CheckpointError, match="fingerprint mismatch"):
        load_checkpoint(path)


def test_weights_that_do_not_match_the_config_are_rejected(tmp_path):
    model, config, preprocess = tiny("student")
    path = tmp_path / "student.pt"
    save_checkpoint(path, model, config, preprocess)

    def more_clusters(payload):
        changed = json.loads(payload["model_config"])
        changed["vlad_branch"]["clusters"] = 8
        payload["model_config"] = json.dumps(changed)

    rewrite(path, more_clusters)
    with pytest.raises(CheckpointError, match="do not match the model config"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="do not match the model config"):
        save_checkpoint(tmp_path / "other.pt", model, {**config, "gem": {"dim": 48}}, preprocess)


def test_wrong_kind_and_newer_version_are_rejected(tmp_path):
    model, config, preprocess = tiny("teacher")
    path = tmp_path / "teacher.pt"
    save_checkpoint(path, model, config, preprocess)
    with pytest.raises(CheckpointError, match="holds a teacher model, but a student is needed"):
        load_checkpoint(path, expected_kind="student")
    rewrite(path, lambda p: p.update(version=99))
    with pytest.raises(CheckpointError, match="version 99"):
        load_checkpoint(path)


def test_checkpoint_is_a_plain_torch_zip(tmp_path):
    model, config, preprocess = tiny("student")
    path = tmp_path / "student.pt"
    save_checkpoint(path, model, config, preprocess)
    assert zipfile.is_zipfile(path)
    payload = torch.load(path, weights_only=True)
    assert payload["format"] == "tscm_ros.checkpoint" and payload["version"] == 1
    assert json.loads(payload["preprocess"]) == preprocess.to_dict()


def test_projected_student_round_trips(tmp_path):
    _, config, preprocess = tiny("student")
    projected_config = {**config, "projection_dim": 6}
    model = build_model(projected_config)
    with torch.no_grad():
        model.projection.linear.weight.normal_(generator=torch.Generator().manual_seed(5))
    path = tmp_path / "projected.pt"
    save_checkpoint(path, model, projected_config, preprocess)
    loaded = load_checkpoint(path)
    assert loaded.model.dim == 6
    batch = images(preprocess)
    with torch.no_grad():
        assert torch.equal(loaded.model(batch), model(batch))


@pytest.mark.parametrize(("preset", "kind"), [("tiny", "student"), ("student_offline", None)])
def test_torchscript_export_gives_the_same_descriptors(tmp_path, preset, kind):
    config, preprocess = load_model_config(preset, kind)
    model = build_model(config)
    path = tmp_path / "student.ts"
    export_torchscript(model, preprocess, path, fingerprint="abc123")
    exported, metadata = load_torchscript(path)
    assert metadata == {"fingerprint": "abc123", "preprocess": preprocess.to_dict(), "dim": model.dim,
                        "kind": "student", "name": config["name"]}
    for count in (1, 3):
        batch = images(preprocess, count, seed=count)
        with torch.no_grad():
            assert torch.allclose(exported(batch), model(batch), atol=1e-5)


@pytest.mark.skipif(not onnxruntime_available(), reason="onnxruntime or onnx is not installed")
def test_onnx_export_gives_the_same_descriptors(tmp_path):
    import onnx
    import onnxruntime

    model, config, preprocess = tiny("student")
    path = tmp_path / "student.onnx"
    export_onnx(model, preprocess, path, fingerprint="abc123")
    metadata = {p.key: json.loads(p.value) for p in onnx.load(str(path)).metadata_props}
    assert metadata["fingerprint"] == "abc123" and metadata["dim"] == 64
    assert metadata["preprocess"] == preprocess.to_dict()
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for count in (1, 4):
        batch = images(preprocess, count, seed=count)
        (got,) = session.run(None, {"images": batch.numpy()})
        with torch.no_grad():
            assert np.allclose(got, model(batch).numpy(), atol=1e-5)


def test_unreadable_torchscript_raises_checkpoint_error(tmp_path):
    path = tmp_path / "broken.ts"
    path.write_bytes(b"nope")
    with pytest.raises(CheckpointError, match="broken.ts"):
        load_torchscript(path)


def test_model_config_lookup_and_errors(tmp_path):
    assert find_config_file("student_offline").name == "model_student_offline.yaml"
    with pytest.raises(ConfigError, match="say which kind"):
        load_model_config("tiny")
    with pytest.raises(ConfigError, match="no 'baseline' model"):
        load_model_config("tiny", kind="baseline")
    with pytest.raises(ConfigError, match="model_nonexistent.yaml not found"):
        load_model_config("nonexistent")
    broken = tmp_path / "model_broken.yaml"
    broken.write_text("student:\n  seed: 0\n")
    with pytest.raises(ConfigError, match="preprocess"):
        load_model_config(broken)
    broken.write_text("robot: {}\n")
    with pytest.raises(ConfigError, match="top-level keys"):
        load_model_config(broken)
