"""The describe() inference path: default student, saved checkpoints, the baseline, devices."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from tscm_ros.checkpoint import load_checkpoint, load_model_config, save_checkpoint
from tscm_ros.describe import (
    DEFAULT_WEIGHTS,
    PRETRAINED,
    Describer,
    describer_for,
    onnxruntime_available,
    resolve_device,
)
from tscm_ros.errors import CheckpointError, ConfigError
from tscm_ros.models import build_model
from tscm_ros.preprocess import preprocess


def random_images(count, seed=0, size=(120, 160)):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (*size, 3), dtype=np.uint8) for _ in range(count)]


@pytest.fixture(scope="module")
def default_student():
    return Describer.from_checkpoint(None, device="cpu", batch_size=4)


def test_default_student_descriptors(default_student):
    assert (default_student.dim, default_student.model_name) == (512, "tscm_student_offline")
    assert default_student.device == torch.device("cpu")
    images = random_images(5) + random_images(1, seed=1, size=(480, 640))
    descriptors = default_student.describe(images)
    assert descriptors.shape == (6, 512) and descriptors.dtype == np.float32
    assert np.allclose(np.linalg.norm(descriptors, axis=1), 1.0, atol=1e-5)
    one_by_one = np.concatenate([default_student.describe([image]) for image in images])
    assert np.allclose(descriptors, one_by_one, atol=1e-5)
    assert default_student.describe([]).shape == (0, 512)


def test_default_student_matches_the_plain_network(default_student):
    shipped = load_checkpoint(DEFAULT_WEIGHTS)
    model, preprocess_config = shipped.model, shipped.preprocess
    images = random_images(3, seed=2)
    with torch.no_grad():
        expected = model(preprocess(images, preprocess_config)).numpy()
    assert np.allclose(default_student.describe(images), expected, atol=1e-5)


def test_default_student_is_the_same_in_a_new_process(default_student):
    code = "from tscm_ros.describe import Describer; print(Describer.from_checkpoint(None, device='cpu').fingerprint)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    assert result.stdout.strip() == default_student.fingerprint


@pytest.mark.skipif(not onnxruntime_available(), reason="onnxruntime or onnx is not installed")
def test_onnxruntime_and_torch_backends_agree(default_student):
    assert default_student.backend == "onnxruntime"  # 'auto' picks it on the CPU
    torch_backend = Describer.from_checkpoint(None, device="cpu", batch_size=3, backend="torch")
    assert torch_backend.backend == "torch" and torch_backend.fingerprint == default_student.fingerprint
    images = random_images(7, seed=8)
    assert np.allclose(default_student.describe(images), torch_backend.describe(images), atol=1e-5)


def test_saving_the_default_student_keeps_its_fingerprint(tmp_path, default_student):
    shipped = load_checkpoint(DEFAULT_WEIGHTS)  # half precision on disk, float32 once loaded
    fingerprint = save_checkpoint(tmp_path / "default.pt", shipped.model.half(), shipped.model_config,
                                  shipped.preprocess)
    assert fingerprint == default_student.fingerprint
    assert Describer.from_checkpoint(tmp_path / "default.pt", device="cpu").fingerprint == fingerprint


def test_describer_from_a_saved_tiny_checkpoint(tmp_path):
    config, preprocess_config = load_model_config("tiny", "student")
    model = build_model(config)
    fingerprint = save_checkpoint(tmp_path / "tiny.pt", model, config, preprocess_config)
    describer = Describer.from_checkpoint(tmp_path / "tiny.pt", device="auto", batch_size=2)
    assert (describer.fingerprint, describer.dim, describer.preprocess_config) == (fingerprint, 64, preprocess_config)
    images = random_images(5, seed=3)
    with torch.no_grad():
        expected = model(preprocess(images, preprocess_config)).numpy()
    assert np.allclose(describer.describe(images), expected, atol=1e-5)


def test_similar_images_get_closer_descriptors_than_different_ones(default_student):
    base = random_images(1, seed=4)[0]
    noisy = np.clip(base.astype(int) + np.random.default_rng(5).integers(-10, 11, base.shape), 0, 255).astype(np.uint8)
    other = random_images(1, seed=6)[0]
    a, b, c = default_student.describe([base, noisy, other])
    assert float(a @ b) > float(a @ c)


def test_pretrained_baseline():
    baseline = describer_for(PRETRAINED, device="cpu")
    descriptors = baseline.describe(random_images(2, seed=7))
    assert descriptors.shape == (2, 112) and baseline.model_name == "gem_baseline_offline"
    assert np.allclose(np.linalg.norm(descriptors, axis=1), 1.0, atol=1e-5)


def test_bad_arguments():
    with pytest.raises(CheckpointError, match="does not exist"):
        Describer.from_checkpoint("no/such/student.pt")
    with pytest.raises(ConfigError, match="batch_size"):
        Describer.from_config("tiny", kind="student", batch_size=0)
    with pytest.raises(ConfigError, match="backend"):
        Describer.from_config("tiny", kind="student", backend="tensorrt")
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert resolve_device("auto") == torch.device("cpu")
        with pytest.raises(ConfigError, match="no CUDA GPU"):
            resolve_device("cuda")
