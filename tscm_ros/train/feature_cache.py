"""The frozen backbones' outputs for every training frame, computed once (:class:`FeatureCache`), the
trainable heads that turn them into descriptors (:class:`TrainableHeads`), and descriptors of whole frames."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from tscm_ros.describe.models.backbones import Backbone
from tscm_ros.describe.preprocess import PreprocessConfig, preprocess
from tscm_ros.io.dataset import Dataset
from tscm_ros.train.augment import AugmentConfig, augment_image


@torch.no_grad()
def describe_frames(
    model: torch.nn.Module,
    dataset: Dataset,
    preprocess_config: PreprocessConfig,
    device: torch.device,
    batch_size: int,
    amp: bool = False,
) -> np.ndarray:
    """Descriptors (N, D) float32 of all frames of ``dataset``, the model in eval mode."""
    was_training = model.training
    model.eval()
    chunks = []
    for start in range(0, len(dataset), batch_size):
        images = dataset.load_images(range(start, min(start + batch_size, len(dataset))))
        with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
            chunks.append(model(preprocess(images, preprocess_config, device)).float().cpu())
    model.train(was_training)
    return torch.cat(chunks).numpy()


class FeatureCache:
    """The frozen trunk's outputs for every frame of a dataset: view 0 as recorded, views 1.. augmented.

    Stored as float16 on the CPU, one (views, frames, ...) tensor per trunk output; augmented views are
    seeded by (seed, view, frame), so a resumed run sees the same views.
    """

    def __init__(self, trunk, dataset: Dataset, preprocess_config: PreprocessConfig, device: torch.device,
                 batch_size: int, views: int = 1, augment: AugmentConfig | None = None, seed: int = 0,
                 progress: bool = False, description: str = "caching backbone features", amp: bool = False) -> None:
        from tscm_ros.progress import progress as progress_bar

        self.views = views
        outputs: list[list[torch.Tensor]] | None = None
        batches = [(view, start) for view in range(views) for start in range(0, len(dataset), batch_size)]
        with torch.no_grad():
            for view, start in progress_bar(batches, desc=description, unit="batch", enabled=progress, leave=False):
                indices = range(start, min(start + batch_size, len(dataset)))
                images = dataset.load_images(indices)
                if view > 0 and augment is not None:
                    images = [augment_image(image, np.random.default_rng([seed, view, i]), augment)
                              for image, i in zip(images, indices)]
                with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
                    result = trunk(preprocess(images, preprocess_config, device))
                if outputs is None:
                    outputs = [[] for _ in result]
                for chunks, tensor in zip(outputs, result):
                    chunks.append(tensor.to("cpu", torch.float16))
        self.features = [torch.cat(chunks).reshape(views, len(dataset), *chunks[0].shape[1:]) for chunks in outputs]
        self.nbytes = sum(t.numel() * t.element_size() for t in self.features)

    def get(self, indices: np.ndarray, views: np.ndarray | None, device: torch.device) -> tuple[torch.Tensor, ...]:
        """Trunk outputs of frames ``indices`` in views ``views`` (view 0 for all when None), float32 on ``device``."""
        index = torch.as_tensor(np.asarray(indices), dtype=torch.long)
        view = torch.zeros_like(index) if views is None else torch.as_tensor(np.asarray(views), dtype=torch.long)
        return tuple(t[view, index].to(device, torch.float32) for t in self.features)


def _images_as_trunk(images: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return (images,)


class TrainableHeads(nn.Module):
    """The trainable part of a model, applied to what :class:`FeatureCache` holds, as a module DDP can wrap.

    With pretrained backbones only (the presets), they are frozen: the cache holds their outputs and the
    heads train. A randomly initialised backbone (the tiny test models, ``pretrained: false``) must train:
    then the cache holds the preprocessed images and the whole network trains.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        backbones = [module for module in model.modules() if isinstance(module, Backbone)]
        self.frozen_backbones = all(backbone.pretrained for backbone in backbones)
        self.trunk = model.trunk if self.frozen_backbones else _images_as_trunk
        self.freeze()

    def freeze(self) -> TrainableHeads:
        """Stop gradients to frozen backbones and keep them in eval mode (batch-norm statistics fixed)."""
        if self.frozen_backbones:
            for module in self.model.modules():
                if isinstance(module, Backbone):
                    module.requires_grad_(False)
                    module.eval()
        return self

    def forward(self, *cached: torch.Tensor) -> torch.Tensor:
        return self.model.head(*cached) if self.frozen_backbones else self.model(*cached)

    @torch.no_grad()
    def init_aggregation(self, cached: tuple[torch.Tensor, ...]) -> None:
        """The model's data-driven initialisation from sample cache entries."""
        self.model.init_aggregation(*(cached if self.frozen_backbones else self.model.trunk(*cached)))


@torch.no_grad()
def describe_cached(heads: TrainableHeads, cache: FeatureCache, device: torch.device, batch_size: int,
                    amp: bool) -> np.ndarray:
    """Descriptors (N, D) float32 of view 0 of every cached frame, in eval mode."""
    was_training = heads.training
    heads.eval()
    frames = cache.features[0].shape[1]
    chunks = []
    for start in range(0, frames, batch_size):
        cached = cache.get(np.arange(start, min(start + batch_size, frames)), None, device)
        with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
            chunks.append(heads(*cached).float().cpu())
    heads.train(was_training)
    heads.freeze()
    return torch.cat(chunks).numpy()
