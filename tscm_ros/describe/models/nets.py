"""TSCM's teacher and student networks (and a pretrained-backbone + GeM baseline), built from config dicts;
the training-free VLAD default is in tscm_ros/describe/models/vlad.py.

Every network maps (N, 3, H, W) normalised images to (N, dim) L2-normalised descriptors. A descriptor is
two halves, each L2-normalised before the whole is normalised again, so both carry equal weight and the
student's halves line up with the teacher's (what the distillation losses compare dimension by dimension):

- global half: GeM pooling of the CNN feature map (optionally a linear layer to ``gem.dim``);
- aggregation half: NetVLAD-Loupe output(s) - the student's patch-embedding branch, or the teacher's
  fused / CNN / ViT token branches concatenated.

Config layouts are documented in config/model_*.yaml.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from tscm_ros.describe.models.backbones import Backbone, build_backbone
from tscm_ros.describe.models.blocks import (
    GeM,
    InterTransformer,
    NetVLADLoupe,
    feature_map_to_tokens,
    l2_normalize,
    principal_components,
)
from tscm_ros.describe.models.options import REQUIRED, check_keys, config_section
from tscm_ros.describe.models.vlad import VladNet
from tscm_ros.errors import ConfigError


class GeMHead(nn.Module):
    """GeM pooling of a feature map, optionally followed by a linear layer to ``dim``.

    The linear layer starts as a zero-padded identity, so an untrained model keeps the pretrained GeM
    geometry exactly (and the initialisation is bit-for-bit reproducible on any machine).
    """

    def __init__(self, channels: int, p: float = 3.0, dim: int | None = None) -> None:
        super().__init__()
        self.gem = GeM(p)
        self.dim = int(dim or channels)
        self.projection: nn.Linear | None = None
        if dim:
            if dim < channels:
                raise ConfigError(f"gem.dim ({dim}) must be at least the backbone's {channels} channels")
            self.projection = nn.Linear(channels, dim, bias=False)
            with torch.no_grad():
                self.projection.weight.copy_(torch.eye(dim, channels))

    def forward(self, feature_map: torch.Tensor) -> torch.Tensor:
        pooled = self.gem(feature_map)
        return self.projection(pooled) if self.projection is not None else pooled


class TokenProjection(nn.Linear):
    """Linear map of backbone tokens to the aggregation width. It starts as a zero-padded (or truncated)
    identity, and :meth:`fit_pca` sets it to the principal components of sample tokens."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__(in_dim, out_dim)
        with torch.no_grad():
            self.weight.copy_(torch.eye(out_dim, in_dim))
            self.bias.zero_()

    @torch.no_grad()
    def fit_pca(self, tokens: torch.Tensor) -> None:
        """Project onto the top principal directions of ``tokens`` (..., in_dim), centred; the rest (when
        the output is wider than the data's rank) stays as it was."""
        mean, _, components = principal_components(tokens.reshape(-1, self.in_features))
        rank = min(self.out_features, components.shape[0])
        self.weight[:rank] = components[:rank].to(self.weight.dtype)
        self.bias[:rank] = (-components[:rank] @ mean).to(self.bias.dtype)


class OutputProjection(nn.Module):
    """Affine map of the descriptor to a smaller deployment dimension (``projection_dim``), then L2
    normalisation; it starts as "keep the first ``out_dim`` dimensions", its weights come from a checkpoint."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        if not 0 < out_dim <= in_dim:
            raise ConfigError(f"projection_dim must be in 1..{in_dim}, got {out_dim}")
        self.linear = nn.Linear(in_dim, out_dim)
        with torch.no_grad():
            self.linear.weight.copy_(torch.eye(out_dim, in_dim))
            self.linear.bias.zero_()

    def forward(self, descriptors: torch.Tensor) -> torch.Tensor:
        return l2_normalize(self.linear(descriptors))


def join_halves(global_half: torch.Tensor, aggregation_half: torch.Tensor) -> torch.Tensor:
    """Concatenate the two descriptor halves, each unit-norm, and normalise the result."""
    return l2_normalize(torch.cat([l2_normalize(global_half), l2_normalize(aggregation_half)], dim=-1))


class StudentNet(nn.Module):
    """TSCM student: one truncated CNN feature map pooled two ways, GeM and NetVLAD-Loupe over its tokens.

    The paper's student aggregates a separate 16x16 patch embedding of the raw image; learnt from random
    initialisation on a robot's few traversals it stayed noise (untrained default and distilled students
    at chance on held-out routes), so here the NetVLAD half aggregates the CNN's tokens, projected to
    ``vlad_branch.dim`` (see README, "Design changes").
    """

    kind = "student"

    def __init__(self, config: dict[str, Any], load_pretrained: bool = True) -> None:
        super().__init__()
        where = f"student config {config.get('name', '')!r}"
        check_keys(config, {"kind", "name", "seed", "backbone", "gem", "vlad_branch", "projection_dim"}, where)
        gem = config_section(config, "gem", {"p": 3.0, "dim": None}, where)
        vlad = config_section(
            config, "vlad_branch", {"dim": REQUIRED, "clusters": REQUIRED, "output_dim": REQUIRED, "gating": True},
            where,
        )
        self.name = str(config.get("name", "student"))
        self.backbone = build_backbone(config.get("backbone"), load_pretrained=load_pretrained)
        self.gem_head = GeMHead(self.backbone.channels, gem["p"], gem["dim"])
        self.token_projection = TokenProjection(self.backbone.channels, int(vlad["dim"]))
        self.vlad = NetVLADLoupe(int(vlad["dim"]), int(vlad["clusters"]), int(vlad["output_dim"]), bool(vlad["gating"]))
        self.native_dim = self.gem_head.dim + int(vlad["output_dim"])
        projection_dim = config.get("projection_dim")
        self.projection = OutputProjection(self.native_dim, int(projection_dim)) if projection_dim else None
        self.dim = int(projection_dim) if projection_dim else self.native_dim

    def trunk(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The pretrained backbone's output: what training keeps frozen and caches."""
        return (self.backbone(images),)

    def native_head(self, feature_map: torch.Tensor) -> torch.Tensor:
        """The descriptor before the optional deployment projection (what distillation compares)."""
        tokens = self.token_projection(feature_map_to_tokens(feature_map))
        return join_halves(self.gem_head(feature_map), self.vlad(tokens))

    def head(self, feature_map: torch.Tensor) -> torch.Tensor:
        descriptors = self.native_head(feature_map)
        return self.projection(descriptors) if self.projection is not None else descriptors

    @torch.no_grad()
    def init_aggregation(self, feature_map: torch.Tensor) -> None:
        """Token projection by PCA and NetVLAD by k-means, from sample backbone outputs."""
        tokens = feature_map_to_tokens(feature_map.float())
        self.token_projection.fit_pca(tokens)
        self.vlad.init_from_tokens(self.token_projection(tokens))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(*self.trunk(images))


class TeacherNet(nn.Module):
    """TSCM teacher: CNN and ViT branches fused by the inter-transformer, three NetVLAD-Loupe heads + GeM."""

    kind = "teacher"

    def __init__(self, config: dict[str, Any], load_pretrained: bool = True) -> None:
        super().__init__()
        where = f"teacher config {config.get('name', '')!r}"
        check_keys(
            config,
            {"kind", "name", "seed", "cnn_backbone", "vit_backbone", "gem", "token_dim", "transformer", "netvlad"},
            where,
        )
        gem = config_section(config, "gem", {"p": 3.0, "dim": None}, where)
        transformer = config_section(config, "transformer", {"heads": 4, "ffn_dim": None, "dropout": 0.0}, where)
        vlad = config_section(
            config, "netvlad",
            {"clusters": 64, "fused_dim": REQUIRED, "cnn_dim": REQUIRED, "vit_dim": REQUIRED, "gating": True},
            where,
        )
        if "token_dim" not in config:
            raise ConfigError(f"{where}: lacks 'token_dim' (the width of the projected tokens)")
        token_dim = int(config["token_dim"])
        self.name = str(config.get("name", "teacher"))
        self.cnn_backbone = build_backbone(config.get("cnn_backbone"), load_pretrained=load_pretrained)
        self.vit_backbone = build_backbone(config.get("vit_backbone"), load_pretrained=load_pretrained)
        self.gem_head = GeMHead(self.cnn_backbone.channels, gem["p"], gem["dim"])
        self.cnn_projection = TokenProjection(self.cnn_backbone.channels, token_dim)
        self.vit_projection = TokenProjection(self.vit_backbone.channels, token_dim)
        if token_dim % int(transformer["heads"]):
            raise ConfigError(f"{where}: token_dim {token_dim} is not divisible by {transformer['heads']} heads")
        self.inter_transformer = InterTransformer(
            token_dim, int(transformer["heads"]), transformer["ffn_dim"], float(transformer["dropout"])
        )
        clusters, gating = int(vlad["clusters"]), bool(vlad["gating"])
        self.fused_vlad = NetVLADLoupe(token_dim, clusters, int(vlad["fused_dim"]), gating)
        self.cnn_vlad = NetVLADLoupe(token_dim, clusters, int(vlad["cnn_dim"]), gating)
        self.vit_vlad = NetVLADLoupe(token_dim, clusters, int(vlad["vit_dim"]), gating)
        self.dim = self.gem_head.dim + int(vlad["fused_dim"]) + int(vlad["cnn_dim"]) + int(vlad["vit_dim"])

    def trunk(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The two pretrained backbones' outputs: what training keeps frozen and caches."""
        return self.cnn_backbone(images), self.vit_backbone(images)

    def _tokens(self, cnn_map: torch.Tensor, vit_map: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (self.cnn_projection(feature_map_to_tokens(cnn_map)),
                self.vit_projection(feature_map_to_tokens(vit_map)))

    def head(self, cnn_map: torch.Tensor, vit_map: torch.Tensor) -> torch.Tensor:
        cnn_tokens, vit_tokens = self._tokens(cnn_map, vit_map)
        fused_tokens = self.inter_transformer(cnn_tokens, vit_tokens)
        aggregation = torch.cat(
            [self.fused_vlad(fused_tokens), self.cnn_vlad(cnn_tokens), self.vit_vlad(vit_tokens)], dim=-1
        )
        return join_halves(self.gem_head(cnn_map), aggregation)

    @torch.no_grad()
    def init_aggregation(self, cnn_map: torch.Tensor, vit_map: torch.Tensor) -> None:
        """Token projections by PCA and the three NetVLADs by k-means, from sample backbone outputs."""
        self.cnn_projection.fit_pca(feature_map_to_tokens(cnn_map.float()))
        self.vit_projection.fit_pca(feature_map_to_tokens(vit_map.float()))
        cnn_tokens, vit_tokens = self._tokens(cnn_map.float(), vit_map.float())
        self.cnn_vlad.init_from_tokens(cnn_tokens)
        self.vit_vlad.init_from_tokens(vit_tokens)
        self.fused_vlad.init_from_tokens(self.inter_transformer(cnn_tokens, vit_tokens))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(*self.trunk(images))


class GeMNet(nn.Module):
    """Baseline: a pretrained backbone + GeM, L2-normalised, no VPR training."""

    kind = "baseline"

    def __init__(self, config: dict[str, Any], load_pretrained: bool = True) -> None:
        super().__init__()
        where = f"baseline config {config.get('name', '')!r}"
        check_keys(config, {"kind", "name", "seed", "backbone", "gem"}, where)
        gem = config_section(config, "gem", {"p": 3.0}, where)
        self.name = str(config.get("name", "baseline"))
        self.backbone = build_backbone(config.get("backbone"), load_pretrained=load_pretrained)
        self.gem = GeM(gem["p"])
        self.dim = self.backbone.channels

    def trunk(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (self.backbone(images),)

    def head(self, feature_map: torch.Tensor) -> torch.Tensor:
        return l2_normalize(self.gem(feature_map))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(*self.trunk(images))


MODEL_KINDS: dict[str, type[nn.Module]] = {"student": StudentNet, "teacher": TeacherNet, "baseline": GeMNet,
                                           "vlad": VladNet}


def build_model(model_config: dict[str, Any], load_pretrained: bool = True) -> nn.Module:
    """Build the network a model config describes, on CPU, deterministically from ``model_config['seed']``.

    ``model_config['kind']`` is 'student', 'teacher', 'baseline' or 'vlad'. ``load_pretrained=False`` skips reading
    pretrained backbone weights (for a model whose weights come from a checkpoint). The global RNG state
    is left untouched.
    """
    if not isinstance(model_config, dict):
        raise ConfigError(f"model config must be a mapping, got {type(model_config).__name__}")
    kind = model_config.get("kind")
    if kind not in MODEL_KINDS:
        raise ConfigError(f"model config 'kind' must be one of {sorted(MODEL_KINDS)}, got {kind!r}")
    seed = model_config.get("seed", 0)
    if not isinstance(seed, int):
        raise ConfigError(f"model config 'seed' must be an integer, got {seed!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MODEL_KINDS[kind](model_config, load_pretrained=load_pretrained)
    return model.eval()


def freeze(model: nn.Module) -> nn.Module:
    """Put ``model`` in eval mode and stop gradients to all its parameters (the frozen teacher). Returns it."""
    model.eval()
    model.requires_grad_(False)
    return model


def prepare_for_inference(model: nn.Module) -> nn.Module:
    """An eval-mode copy of ``model`` with batch norms folded into convolutions, in channels-last layout.

    Same descriptors (to float rounding) in less time on the CPU; bench/descriptor_latency.py measures it.
    Feed it channels-last input (``x.contiguous(memory_format=torch.channels_last)``).
    """
    fast = copy.deepcopy(model).eval()
    for module in fast.modules():
        if isinstance(module, Backbone):
            module.fuse_batch_norms()
    return fast.to(memory_format=torch.channels_last)

