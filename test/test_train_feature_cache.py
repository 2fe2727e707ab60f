"""The feature cache: the frozen trunk's outputs per frame and view, seeded augmented views, and lookups."""

from __future__ import annotations

import numpy as np
import torch

from tscm_ros.describe.preprocess import PreprocessConfig, preprocess
from tscm_ros.train.augment import AugmentConfig
from tscm_ros.train.feature_cache import FeatureCache, describe_frames

PREPROCESS = PreprocessConfig(height=16, width=16)
CPU = torch.device("cpu")


class Frames:
    """What the cache needs of a dataset: its length and its images by index."""

    def __init__(self, count: int) -> None:
        rng = np.random.default_rng(0)
        self.images = [rng.integers(0, 256, (24, 32, 3), dtype=np.uint8) for _ in range(count)]

    def __len__(self) -> int:
        return len(self.images)

    def load_images(self, indices) -> list[np.ndarray]:
        return [self.images[i] for i in indices]


def trunk(images: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """A stand-in for a frozen backbone with two outputs, as the student's has."""
    return images.mean(dim=(2, 3)), images[:, :, ::4, ::4]


def test_view_0_is_the_trunk_output_of_the_frames_as_recorded():
    frames = Frames(5)
    cache = FeatureCache(trunk, frames, PREPROCESS, CPU, batch_size=2)
    expected = trunk(preprocess(frames.images, PREPROCESS, CPU))
    assert [tuple(t.shape) for t in cache.features] == [(1, 5, 3), (1, 5, 3, 4, 4)]
    assert all(t.dtype == torch.float16 for t in cache.features)
    assert cache.nbytes == sum(t.numel() * 2 for t in cache.features)
    for cached, direct in zip(cache.get(np.arange(5), None, CPU), expected):
        assert cached.dtype == torch.float32
        torch.testing.assert_close(cached, direct, atol=1e-2, rtol=1e-2)


def test_augmented_views_are_seeded_per_frame_whatever_the_batches():
    frames = Frames(5)
    augment = AugmentConfig(probability=1.0)
    one = FeatureCache(trunk, frames, PREPROCESS, CPU, batch_size=2, views=3, augment=augment, seed=4)
    other = FeatureCache(trunk, frames, PREPROCESS, CPU, batch_size=3, views=3, augment=augment, seed=4)
    reseeded = FeatureCache(trunk, frames, PREPROCESS, CPU, batch_size=2, views=3, augment=augment, seed=5)
    assert all(torch.equal(a, b) for a, b in zip(one.features, other.features))
    assert not torch.equal(one.features[0][1], reseeded.features[0][1])
    assert not torch.equal(one.features[0][1], one.features[0][0])  # an augmented view differs from the frame


def test_get_picks_each_frame_in_its_own_view():
    cache = FeatureCache(trunk, Frames(4), PREPROCESS, CPU, batch_size=4, views=2, augment=AugmentConfig(), seed=0)
    means, _ = cache.get(np.array([3, 0]), np.array([1, 0]), CPU)
    torch.testing.assert_close(means, cache.features[0][[1, 0], [3, 0]].float())


def test_describe_frames_describes_every_frame_in_eval_mode_and_restores_the_mode():
    class Net(torch.nn.Module):
        def forward(self, images):
            assert not self.training
            return images.flatten(1)[:, :8]

    net = Net().train()
    descriptors = describe_frames(net, Frames(5), PREPROCESS, CPU, batch_size=2)
    assert descriptors.shape == (5, 8) and descriptors.dtype == np.float32
    assert net.training
