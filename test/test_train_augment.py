"""Training-time augmentation: seeded, same size and type, off when disabled, settings checked."""

from __future__ import annotations

import numpy as np
import pytest

from tscm_ros.errors import ConfigError
from tscm_ros.train.augment import AugmentConfig, augment_image


@pytest.fixture
def image():
    return np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)


def test_the_same_seed_gives_the_same_image_of_the_same_size_and_type(image):
    config = AugmentConfig(probability=1.0)
    first = augment_image(image, np.random.default_rng(7), config)
    again = augment_image(image, np.random.default_rng(7), config)
    other = augment_image(image, np.random.default_rng(8), config)
    assert first.shape == image.shape and first.dtype == np.uint8
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)
    assert not np.array_equal(first, image)


def test_disabled_or_never_chosen_leaves_the_image_as_it_is(image):
    assert augment_image(image, np.random.default_rng(0), AugmentConfig(enabled=False)) is image
    untouched = augment_image(image, np.random.default_rng(0), AugmentConfig(probability=0.0))
    assert np.array_equal(untouched, image)


def test_brightness_alone_makes_images_darker_and_lighter(image):
    only_brightness = {name: 0 for name in ("contrast", "gamma", "colour_cast", "haze", "blur_sigma", "noise_sigma",
                                            "crop", "rotation_deg")}
    gain = AugmentConfig.from_dict({**only_brightness, "probability": 1.0, "brightness": 0.9,
                                    "jpeg_quality_min": 100})
    means = [augment_image(image, np.random.default_rng(seed), gain).mean() for seed in range(20)]
    assert min(means) < image.mean() < max(means)  # a gain drawn from [0.1, 1.9]


def test_settings_from_a_config_file_are_checked():
    assert AugmentConfig.from_dict(None) == AugmentConfig()
    assert AugmentConfig.from_dict(False) == AugmentConfig(enabled=False)
    assert AugmentConfig.from_dict({"jpeg_quality_min": 50.0}).jpeg_quality_min == 50
    with pytest.raises(ConfigError, match="unknown augment setting"):
        AugmentConfig.from_dict({"sharpness": 0.1})
    with pytest.raises(ConfigError, match="wrong type"):
        AugmentConfig.from_dict({"haze": "some"})
    with pytest.raises(ConfigError, match="probability"):
        AugmentConfig(probability=1.5)
    with pytest.raises(ConfigError, match="blur_sigma"):
        AugmentConfig(blur_sigma=-1.0)
