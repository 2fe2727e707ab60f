"""export_model: ONNX and TorchScript files that give the PyTorch model's descriptors, and clear errors."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

from tscm_ros.cli import export_model
from tscm_ros.describe.checkpoint import load_model_config, load_torchscript, save_checkpoint
from tscm_ros.describe.describer import onnxruntime_available
from tscm_ros.describe.models import build_model


@pytest.fixture
def tiny_checkpoint(tmp_path):
    config, preprocess = load_model_config("tiny", "student")
    model = build_model(config).eval()
    path = tmp_path / "tiny.pt"
    fingerprint = save_checkpoint(path, model, config, preprocess)
    return path, model, preprocess, fingerprint


def images(preprocess, count):
    return torch.randn(count, 3, preprocess.height, preprocess.width, generator=torch.Generator().manual_seed(count))


@pytest.mark.skipif(not onnxruntime_available(), reason="onnxruntime or onnx is not installed")
def test_onnx_gives_the_models_descriptors_and_metadata(tmp_path, tiny_checkpoint, capsys):
    import onnx
    import onnxruntime

    checkpoint, model, preprocess, fingerprint = tiny_checkpoint
    out = tmp_path / "exported" / "tiny.onnx"
    assert export_model.main(["--onnx", "--model", str(checkpoint), "--out", str(out)]) == 0
    assert f"fingerprint {fingerprint}" in capsys.readouterr().out
    metadata = {p.key: json.loads(p.value) for p in onnx.load(str(out)).metadata_props}
    assert metadata == {"fingerprint": fingerprint, "preprocess": preprocess.to_dict(), "dim": model.dim,
                        "kind": "student", "name": "tscm_student_tiny"}
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"]
    assert [o.name for o in session.get_outputs()] == ["descriptors"]
    for count in (1, 3):
        batch = images(preprocess, count)
        (got,) = session.run(None, {"images": batch.numpy()})
        with torch.no_grad():
            np.testing.assert_allclose(got, model(batch).numpy(), atol=1e-5)


def test_torchscript_gives_the_models_descriptors_and_metadata(tmp_path, tiny_checkpoint):
    checkpoint, model, preprocess, fingerprint = tiny_checkpoint
    out = tmp_path / "tiny.ts"
    assert export_model.main(["--torchscript", "--model", str(checkpoint), "--out", str(out)]) == 0
    exported, metadata = load_torchscript(out)
    assert metadata["fingerprint"] == fingerprint and metadata["dim"] == model.dim
    for count in (1, 3):
        batch = images(preprocess, count)
        with torch.no_grad():
            assert torch.allclose(exported(batch), model(batch), atol=1e-5)


def test_existing_output_is_kept_unless_forced(tmp_path, tiny_checkpoint, capsys):
    checkpoint = tiny_checkpoint[0]
    out = tmp_path / "tiny.ts"
    out.write_bytes(b"keep me")
    assert export_model.main(["--torchscript", "--model", str(checkpoint), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err and out.read_bytes() == b"keep me"
    assert export_model.main(["--torchscript", "--model", str(checkpoint), "--out", str(out), "--force"]) == 0
    assert load_torchscript(out)[1]["dim"] == tiny_checkpoint[1].dim


def test_bad_input_is_one_error_line(tmp_path, tiny_checkpoint, capsys, monkeypatch):
    checkpoint = str(tiny_checkpoint[0])
    (tmp_path / "a_file").write_text("")
    cases = [
        (["--torchscript", "--model", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "x.ts")], "does not exist"),
        (["--torchscript", "--model", checkpoint, "--out", str(tmp_path)], "is a directory"),
        (["--torchscript", "--model", checkpoint, "--out", str(tmp_path / "a_file" / "x.ts")], "cannot write"),
    ]
    for argv, message in cases:
        assert export_model.main(argv) == 2
        assert message in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "onnx", None)  # as if onnx were not installed
    assert export_model.main(["--onnx", "--model", checkpoint, "--out", str(tmp_path / "x.onnx")]) == 2
    assert "needs the Python package onnx" in capsys.readouterr().err
    assert not (tmp_path / "x.onnx").exists() and not (tmp_path / "x.ts").exists()


@pytest.mark.skipif(not onnxruntime_available(), reason="onnxruntime or onnx is not installed")
def test_the_default_exported_for_a_map_describes_with_the_maps_vocabulary(tmp_path, route_reference, capsys):
    """What a C++ front end needs for a map: the network with that map's vocabulary and fingerprint."""
    import onnx
    import onnxruntime

    from tscm_ros.cli import build_map
    from tscm_ros.describe.describer import DEFAULT_MODEL, describer_for
    from tscm_ros.describe.preprocess import preprocess as preprocess_images
    from tscm_ros.map.building import describer_for_map
    from tscm_ros.map.keyframe_map import KeyframeMap

    assert build_map.main(["--bag", str(route_reference), "--out", str(tmp_path / "map"), "--min-distance", "0"]) == 0
    keyframe_map = KeyframeMap.load(tmp_path / "map")
    assert keyframe_map.vocabulary.source == "map"
    out = tmp_path / "site.onnx"
    assert export_model.main(["--onnx", "--map", str(tmp_path / "map"), "--out", str(out)]) == 0
    assert f"fingerprint {keyframe_map.model_fingerprint}" in capsys.readouterr().out
    metadata = {p.key: json.loads(p.value) for p in onnx.load(str(out)).metadata_props}
    assert metadata["fingerprint"] == keyframe_map.model_fingerprint and metadata["kind"] == "vlad"
    describer = describer_for_map(describer_for(DEFAULT_MODEL, device="cpu"), keyframe_map)
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (120, 160, 3), dtype=np.uint8) for _ in range(2)]
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"images": preprocess_images(frames, describer.preprocess_config).numpy()})
    assert ((got * describer.describe(frames)).sum(axis=1) > 0.95).all()
    other = tmp_path / "other_map"
    assert build_map.main(["--bag", str(route_reference), "--out", str(other), "--model", "pretrained"]) == 0
    assert export_model.main(["--onnx", "--map", str(other), "--out", str(tmp_path / "x.onnx")]) == 2
    assert "built with model gem_baseline_offline" in capsys.readouterr().err
