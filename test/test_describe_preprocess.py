"""Preprocessing: resize policies, normalisation, config validation, bad images."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tscm_ros.describe.preprocess import IMAGENET_MEAN, IMAGENET_STD, PreprocessConfig, preprocess
from tscm_ros.errors import ConfigError, TscmError


def solid(height, width, rgb):
    image = np.empty((height, width, 3), dtype=np.uint8)
    image[:] = rgb
    return image


def normalised(rgb):
    return torch.tensor([(c / 255 - m) / s for c, m, s in zip(rgb, IMAGENET_MEAN, IMAGENET_STD)])


def test_stretch_resizes_any_size_and_normalises_per_channel():
    cfg = PreprocessConfig(height=48, width=64)
    colours = [(255, 0, 0), (10, 200, 30), (128, 128, 128)]
    images = [solid(120, 160, colours[0]), solid(31, 17, colours[1]), solid(480, 640, colours[2])]
    batch = preprocess(images, cfg, "cpu")
    assert batch.shape == (3, 3, 48, 64) and batch.dtype == torch.float32
    for i, rgb in enumerate(colours):
        assert torch.allclose(batch[i], normalised(rgb).view(3, 1, 1).expand(3, 48, 64), atol=1e-5)


def test_stretch_keeps_the_whole_field_of_view():
    cfg = PreprocessConfig(height=32, width=32)
    image = solid(40, 120, (0, 0, 0))
    image[:, :40] = (255, 255, 255)  # white left third
    out = preprocess([image], cfg)[0]
    white, black = normalised((255, 255, 255)), normalised((0, 0, 0))
    assert torch.allclose(out[:, :, 0], white.view(3, 1).expand(3, 32), atol=1e-5)
    assert torch.allclose(out[:, :, -1], black.view(3, 1).expand(3, 32), atol=1e-5)


def test_short_side_center_crop_keeps_the_centre_only():
    cfg = PreprocessConfig(height=32, width=32, resize="short_side_center_crop")
    image = solid(100, 300, (255, 0, 0))
    image[:, 100:200] = (0, 0, 255)  # the centre square is blue, the sides red
    out = preprocess([image], cfg)[0]
    assert torch.allclose(out, normalised((0, 0, 255)).view(3, 1, 1).expand(3, 32, 32), atol=1e-5)


def test_config_round_trip_and_validation():
    cfg = PreprocessConfig(height=192, width=256, resize="short_side_center_crop")
    assert PreprocessConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.to_dict()["mean"] == list(IMAGENET_MEAN)
    for bad in [{"height": 192, "width": 256, "resize": "squash"}, {"height": 4, "width": 256},
                {"height": 192}, {"height": 192, "width": 256, "std": [1, 0, 1]},
                {"height": 192, "width": 256, "mean": [0.5, 0.5]}, {"height": 192, "width": 256, "colour": "rgb"}]:
        with pytest.raises(ConfigError):
            PreprocessConfig.from_dict(bad)


@pytest.mark.parametrize(
    "bad", [np.zeros((10, 10), np.uint8), np.zeros((10, 10, 4), np.uint8), np.zeros((10, 10, 3), np.float32),
            np.zeros((0, 10, 3), np.uint8), "not an image"],
)
def test_bad_images_raise_a_tscm_error_naming_the_image(bad):
    cfg = PreprocessConfig(height=16, width=16)
    with pytest.raises(TscmError, match="image 1"):
        preprocess([solid(8, 8, (1, 2, 3)), bad], cfg)


def test_empty_batch_and_non_contiguous_input():
    cfg = PreprocessConfig(height=16, width=16)
    assert preprocess([], cfg).shape == (0, 3, 16, 16)
    bgr = solid(20, 20, (1, 2, 3))
    rgb_view = bgr[:, :, ::-1]  # a negative-stride view, as from a BGR -> RGB flip
    assert torch.allclose(preprocess([rgb_view], cfg)[0], preprocess([np.ascontiguousarray(rgb_view)], cfg)[0])
