"""Building blocks of the TSCM networks: GeM, NetVLAD-Loupe, the inter-transformer, L2 normalisation.

Token tensors are (N, T, D): batch, tokens, channels. Feature maps are (N, C, H, W).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def l2_normalize(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Scale ``x`` to unit L2 norm along ``dim`` (zero vectors stay zero)."""
    return F.normalize(x, p=2.0, dim=dim, eps=1e-12)


def feature_map_to_tokens(feature_map: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) feature map -> (N, H*W, C) tokens, row-major over the map."""
    return feature_map.flatten(2).transpose(1, 2)


def spherical_kmeans(samples: torch.Tensor, clusters: int, iterations: int = 20, seed: int = 0) -> torch.Tensor:
    """k-means by cosine similarity of unit-norm ``samples`` (M, D), M >= clusters: (clusters, D) unit-norm
    centres, seeded by ``seed`` (the same centres on any machine). A cluster left empty keeps its centre."""
    if len(samples) < clusters:
        raise ValueError(f"k-means with {clusters} clusters needs at least {clusters} tokens, got {len(samples)}")
    generator = torch.Generator().manual_seed(seed)
    centres = samples[torch.randperm(len(samples), generator=generator)[:clusters]].clone()
    for _ in range(iterations):
        nearest = (samples @ centres.T).argmax(dim=1)
        sums = torch.zeros_like(centres).index_add_(0, nearest, samples)
        filled = torch.bincount(nearest, minlength=clusters) > 0
        centres[filled] = l2_normalize(sums[filled])
    return centres


def principal_components(data: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PCA of the rows of ``data`` (M, D), in float64 on the CPU: (mean, singular values, components as rows)."""
    data = data.detach().to(torch.float64).cpu()
    mean = data.mean(dim=0)
    _, singular, components = torch.linalg.svd(data - mean, full_matrices=False)
    return mean, singular, components


class GeM(nn.Module):
    """Generalised-mean pooling of a feature map, with a learnable exponent p.

    ``(mean over H, W of clamp(x, eps) ** p) ** (1 / p)``; p = 1 is average pooling, p -> inf max pooling.
    """

    def __init__(self, p: float = 3.0, eps: float = 1e-6) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.tensor(float(p)))
        self.eps = eps

    def forward(self, feature_map: torch.Tensor) -> torch.Tensor:
        pooled = feature_map.clamp(min=self.eps).pow(self.p).mean(dim=(-2, -1))
        return pooled.pow(1.0 / self.p)


class ContextGating(nn.Module):
    """Context gating of a vector: ``x * sigmoid(BN(W x))`` (Miech et al., used by NetVLAD-Loupe)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gate = nn.Linear(dim, dim, bias=False)
        self.norm = nn.BatchNorm1d(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.norm(self.gate(x)))


class NetVLADLoupe(nn.Module):
    """NetVLAD with a learned projection and context gating, as in PointNetVLAD / TSCM.

    Tokens (N, T, D), L2-normalised, are soft-assigned to K clusters (linear + batch norm + softmax); the residuals
    to the learned cluster centres are summed per cluster, intra-normalised per cluster, flattened (K*D),
    globally L2-normalised, projected to ``output_dim`` with batch norm, then context-gated.
    """

    def __init__(self, feature_dim: int, clusters: int, output_dim: int, gating: bool = True) -> None:
        super().__init__()
        self.feature_dim = feature_dim
        self.clusters = clusters
        self.output_dim = output_dim
        self.assignment = nn.Linear(feature_dim, clusters, bias=False)
        self.assignment_norm = nn.BatchNorm1d(clusters)
        self.centres = nn.Parameter(torch.empty(clusters, feature_dim).uniform_(-1.0, 1.0) / feature_dim**0.5)
        self.projection = nn.Linear(clusters * feature_dim, output_dim, bias=False)
        self.output_norm = nn.BatchNorm1d(output_dim)
        self.gating = ContextGating(output_dim) if gating else None

    @torch.no_grad()
    def init_from_tokens(self, tokens: torch.Tensor, iterations: int = 20, seed: int = 0) -> None:
        """NetVLAD's data-driven initialisation from sample tokens (M, D), M >= clusters: k-means centres
        (cosine, seeded), and soft-assignment weights ``2 * alpha * c_k`` whose softmax puts ~99 % of a
        token's weight on its nearest centre. The assignment batch norm starts as the identity on these
        logits (its running statistics and affine parameters agree), in training and in eval mode."""
        samples = l2_normalize(tokens.detach().reshape(-1, self.feature_dim).float())
        centres = spherical_kmeans(samples, self.clusters, iterations, seed)
        similarity = (samples @ centres.T).topk(2, dim=1).values
        gap = (similarity[:, 0] - similarity[:, 1]).mean().clamp(min=1e-3)
        alpha = float(torch.log(torch.tensor(100.0)) / (2 * gap))
        self.centres.copy_(centres)
        self.assignment.weight.copy_(2 * alpha * centres)
        logits = self.assignment(samples)
        mean, var = logits.mean(dim=0), logits.var(dim=0, unbiased=False)
        norm = self.assignment_norm
        norm.running_mean.copy_(mean)
        norm.running_var.copy_(var)
        norm.weight.copy_((var + norm.eps).sqrt())
        norm.bias.copy_(mean)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        batch, count, dim = tokens.shape
        tokens = l2_normalize(tokens)  # as NetVLAD: unit-norm input descriptors
        logits = self.assignment(tokens)  # (N, T, K)
        logits = self.assignment_norm(logits.reshape(batch * count, self.clusters)).reshape(batch, count, self.clusters)
        weights = torch.softmax(logits, dim=-1)
        # sum_t a_tk (x_t - c_k) = (A^T X)_k - (sum_t a_tk) c_k
        vlad = torch.bmm(weights.transpose(1, 2), tokens) - weights.sum(dim=1).unsqueeze(-1) * self.centres
        vlad = l2_normalize(vlad, dim=-1).reshape(batch, self.clusters * dim)
        vlad = self.output_norm(self.projection(l2_normalize(vlad)))
        return self.gating(vlad) if self.gating is not None else vlad


class CrossAttentionBlock(nn.Module):
    """Pre-norm transformer block where query tokens attend to context tokens; attention + FFN, both residual."""

    def __init__(self, dim: int, heads: int = 4, ffn_dim: int | None = None, dropout: float = 0.0) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.dropout = dropout
        self.query_norm = nn.LayerNorm(dim)
        self.context_norm = nn.LayerNorm(dim)
        self.query = nn.Linear(dim, dim)
        self.key_value = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)
        self.ffn_norm = nn.LayerNorm(dim)
        hidden = ffn_dim or 4 * dim
        self.ffn = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim))

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, count, dim = x.shape
        return x.reshape(batch, count, self.heads, dim // self.heads).transpose(1, 2)

    def forward(self, queries: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        q = self._split_heads(self.query(self.query_norm(queries)))
        k, v = self.key_value(self.context_norm(context)).chunk(2, dim=-1)
        attended = F.scaled_dot_product_attention(
            q, self._split_heads(k), self._split_heads(v), dropout_p=self.dropout if self.training else 0.0
        )
        x = queries + self.out(attended.transpose(1, 2).reshape(queries.shape))
        return x + self.ffn(self.ffn_norm(x))


class InterTransformer(nn.Module):
    """TSCM's inter-transformer encoder: ViT tokens attend to CNN tokens and CNN tokens attend to ViT tokens.

    Returns the fused tokens, the two attended sequences concatenated along the token axis.
    """

    def __init__(self, dim: int, heads: int = 4, ffn_dim: int | None = None, dropout: float = 0.0) -> None:
        super().__init__()
        self.vit_from_cnn = CrossAttentionBlock(dim, heads, ffn_dim, dropout)
        self.cnn_from_vit = CrossAttentionBlock(dim, heads, ffn_dim, dropout)

    def forward(self, cnn_tokens: torch.Tensor, vit_tokens: torch.Tensor) -> torch.Tensor:
        fused_vit = self.vit_from_cnn(vit_tokens, cnn_tokens)
        fused_cnn = self.cnn_from_vit(cnn_tokens, vit_tokens)
        return torch.cat([fused_vit, fused_cnn], dim=1)
