"""The describe() inference path: the default (VLAD with a vocabulary), saved checkpoints, the baseline, devices."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from tscm_ros.describe.checkpoint import load_model_config, save_checkpoint
from tscm_ros.describe.describer import (
    DEFAULT_MODEL,
    PRETRAINED,
    Describer,
    describer_for,
    generic_vocabulary,
    onnxruntime_available,
    resolve_device,
)
from tscm_ros.describe.models import build_model
from tscm_ros.describe.models.vlad import Vocabulary
from tscm_ros.describe.preprocess import preprocess
from tscm_ros.errors import CheckpointError, ConfigError


def random_images(count, seed=0, size=(120, 160)):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (*size, 3), dtype=np.uint8) for _ in range(count)]


@pytest.fixture(scope="module")
def default():
    return describer_for(DEFAULT_MODEL, device="cpu", batch_size=4)


def test_default_descriptors(default):
    assert (default.dim, default.model_name) == (3840, "tscm_vlad_default")
    assert default.device == torch.device("cpu") and default.vocabulary.source == "generic"
    images = random_images(5) + random_images(1, seed=1, size=(480, 640))
    descriptors = default.describe(images)
    assert descriptors.shape == (6, 3840) and descriptors.dtype == np.float32
    assert np.allclose(np.linalg.norm(descriptors, axis=1), 1.0, atol=1e-5)
    one_by_one = np.concatenate([default.describe([image]) for image in images])
    assert np.allclose(descriptors, one_by_one, atol=1e-5)
    assert default.describe([]).shape == (0, 3840)


def test_default_is_the_plain_network_with_the_generic_vocabulary(default):
    config, preprocess_config = load_model_config("vlad_default")
    model = build_model(config)
    model.set_vocabulary(generic_vocabulary())
    images = random_images(3, seed=2)
    with torch.no_grad():
        expected = model(preprocess(images, preprocess_config)).numpy()
    assert np.allclose(default.describe(images), expected, atol=1e-5)


def test_default_is_the_same_in_a_new_process(default):
    code = ("from tscm_ros.describe.describer import describer_for; "
            "print(describer_for('default', device='cpu').fingerprint)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    assert result.stdout.strip() == default.fingerprint


@pytest.mark.skipif(not onnxruntime_available(), reason="onnxruntime or onnx is not installed")
def test_onnxruntime_and_torch_backends_agree(default):
    assert default.backend == "onnxruntime"  # 'auto' picks it on the CPU
    torch_backend = describer_for(DEFAULT_MODEL, device="cpu", batch_size=3, backend="torch")
    assert torch_backend.backend == "torch" and torch_backend.fingerprint == default.fingerprint
    images = random_images(7, seed=8)
    assert np.allclose(default.describe(images), torch_backend.describe(images), atol=1e-5)


def test_a_vocabulary_fitted_on_images_replaces_the_generic_one_in_both_backends(default):
    images = random_images(6, seed=9, size=(96, 128))
    descriptors, maps = default.describe_with_maps(images)
    assert np.array_equal(descriptors, default.describe(images))
    assert maps[0][0].shape == (120, 12, 16) and np.allclose(default.aggregate(maps), descriptors, atol=1e-6)
    fitted = default.fit_vocabulary([m[0] for m in maps])
    assert fitted.source == "map" and fitted.images == 6 and fitted.shapes == default.vocabulary.shapes
    adapted = default.with_vocabulary(fitted)
    assert adapted.vocabulary is fitted and adapted.base_fingerprint == default.fingerprint != adapted.fingerprint
    assert default.with_vocabulary(default.vocabulary).fingerprint == default.fingerprint
    others = random_images(4, seed=10)
    torch_adapted = describer_for(DEFAULT_MODEL, device="cpu", backend="torch").with_vocabulary(fitted)
    # Hard assignment: a token on a cluster border may fall either way with another backend's rounding.
    similarity = (adapted.describe(others) * torch_adapted.describe(others)).sum(axis=1)
    assert similarity.min() > 0.95
    assert not np.allclose(adapted.describe(others), default.describe(others), atol=1e-2)
    with pytest.raises(ConfigError, match="does not fit"):
        default.with_vocabulary(Vocabulary(np.eye(4, dtype=np.float32), images=1, source="map"))
    with pytest.raises(ConfigError, match="no VLAD vocabulary"):
        describer_for(PRETRAINED, device="cpu").with_vocabulary(fitted)


def test_describer_from_a_saved_tiny_checkpoint(tmp_path):
    config, preprocess_config = load_model_config("tiny", "student")
    model = build_model(config)
    fingerprint = save_checkpoint(tmp_path / "tiny.pt", model, config, preprocess_config)
    describer = describer_for(tmp_path / "tiny.pt", device="auto", batch_size=2)
    assert (describer.fingerprint, describer.dim, describer.preprocess_config) == (fingerprint, 64, preprocess_config)
    images = random_images(5, seed=3)
    with torch.no_grad():
        expected = model(preprocess(images, preprocess_config)).numpy()
    assert np.allclose(describer.describe(images), expected, atol=1e-5)


def test_similar_images_get_closer_descriptors_than_different_ones(default):
    base = random_images(1, seed=4)[0]
    noisy = np.clip(base.astype(int) + np.random.default_rng(5).integers(-10, 11, base.shape), 0, 255).astype(np.uint8)
    other = random_images(1, seed=6)[0]
    a, b, c = default.describe([base, noisy, other])
    assert float(a @ b) > float(a @ c)


def test_pretrained_baseline():
    baseline = describer_for(PRETRAINED, device="cpu")
    descriptors = baseline.describe(random_images(2, seed=7))
    assert descriptors.shape == (2, 112) and baseline.model_name == "gem_baseline_offline"
    assert np.allclose(np.linalg.norm(descriptors, axis=1), 1.0, atol=1e-5)


def test_bad_arguments():
    with pytest.raises(CheckpointError, match="does not exist"):
        describer_for("no/such/student.pt")
    config, preprocess_config = load_model_config("tiny", "student")
    model = build_model(config)
    with pytest.raises(ConfigError, match="batch_size"):
        Describer(model, preprocess_config, "f" * 16, "tiny", batch_size=0)
    with pytest.raises(ConfigError, match="backend"):
        Describer(model, preprocess_config, "f" * 16, "tiny", backend="tensorrt")
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert resolve_device("auto") == torch.device("cpu")
        with pytest.raises(ConfigError, match="no CUDA GPU"):
            resolve_device("cuda")
