"""Classifier of phase 4: z-score, mRMR gather, multi-head self-attention over feature tokens.

The selected features (K of them) are cut into K / token_dim tokens; a [CLS] token attends over
them through Transformer encoder layers (Vaswani et al., NeurIPS 2017). The z-score statistics and
the mRMR index list are buffers of the module, so the exported ONNX head needs no Python around it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models._registry import register_model


class SelfAttention(nn.Module):
    """Multi-head self-attention that also returns its attention weights (mean over heads)."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"model_dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        query, key, value = qkv[0], qkv[1], qkv[2]
        weights = torch.softmax(query @ key.transpose(-2, -1) * (dim // self.heads) ** -0.5, dim=-1)
        out = (self.dropout(weights) @ value).transpose(1, 2).reshape(batch, tokens, dim)
        return self.proj(out), weights.mean(dim=1)


class EncoderLayer(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attention = SelfAttention(dim, heads, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        attended, weights = self.attention(self.norm1(x))
        x = x + attended
        return x + self.mlp(self.norm2(x)), weights


class FeatureSelection(nn.Module):
    """Fixed z-score with training-fold statistics, then the mRMR-selected columns, as buffers."""

    def __init__(self, num_features: int, k: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(num_features))
        self.register_buffer("std", torch.ones(num_features))
        self.register_buffer("index", torch.arange(k, dtype=torch.int64))

    def set_statistics(self, mean, std, index) -> None:
        self.mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
        self.std.copy_(torch.as_tensor(std, dtype=torch.float32))
        self.index.copy_(torch.as_tensor(index, dtype=torch.int64))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return torch.index_select((features - self.mean) / self.std, 1, self.index)


class MHSAHead(nn.Module):
    """``features (N, F)`` -> ``(logits (N, C), token attention of [CLS] (N, K / token_dim))``.

    ``temperature`` (a buffer, 1 until calibrated) divides the logits, so calibration ships inside
    the graph too.
    """

    def __init__(
        self, *, num_features: int, k: int, token_dim: int, dim: int, heads: int, layers: int,
        num_classes: int, dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if k % token_dim:
            raise ValueError(f"mRMR k={k} must be a multiple of token_dim={token_dim}")
        self.selection = FeatureSelection(num_features, k)
        self.token_dim = token_dim
        self.tokens = k // token_dim
        self.embed = nn.Linear(token_dim, dim)
        self.position = nn.Parameter(torch.zeros(1, self.tokens + 1, dim))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.trunc_normal_(self.position, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.layers = nn.ModuleList(EncoderLayer(dim, heads, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.classifier = nn.Linear(dim, num_classes)
        self.register_buffer("temperature", torch.ones(1))

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        selected = self.selection(features)
        return self.forward_selected(selected)

    def forward_selected(self, selected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.embed(selected.reshape(selected.shape[0], self.tokens, self.token_dim))
        x = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1) + self.position
        weights = None
        for layer in self.layers:
            x, weights = layer(x)
        logits = self.classifier(self.norm(x[:, 0])) / self.temperature
        cls_to_tokens = weights[:, 0, 1:]  # how much [CLS] drew from each feature token, renormalised
        return logits, cls_to_tokens / cls_to_tokens.sum(dim=-1, keepdim=True)


class MLPHead(nn.Module):
    """Ablation baseline: the same selection, then a two-layer perceptron (attention is uniform)."""

    def __init__(self, *, num_features: int, k: int, dim: int, num_classes: int, dropout: float = 0.1,
                 token_dim: int = 1) -> None:
        super().__init__()
        self.selection = FeatureSelection(num_features, k)
        self.tokens = k // token_dim
        self.mlp = nn.Sequential(nn.Linear(k, 2 * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(2 * dim, num_classes))
        self.register_buffer("temperature", torch.ones(1))

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.forward_selected(self.selection(features))

    def forward_selected(self, selected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.mlp(selected) / self.temperature
        uniform = torch.full((selected.shape[0], self.tokens), 1.0 / self.tokens, device=selected.device)
        return logits, uniform


def probabilities(logits: torch.Tensor) -> torch.Tensor:
    return F.softmax(logits, dim=-1)


@register_model
def mhsa_head(profile, *, num_features: int, k: int | None = None, **kwargs) -> MHSAHead:
    config = profile.head
    return MHSAHead(
        num_features=num_features, k=k or config.mrmr_k, token_dim=config.token_dim, dim=config.model_dim,
        heads=config.heads, layers=config.layers, num_classes=len(profile.classes), dropout=config.dropout,
        **kwargs,
    )


@register_model
def mlp_head(profile, *, num_features: int, k: int | None = None, **kwargs) -> MLPHead:
    config = profile.head
    return MLPHead(
        num_features=num_features, k=k or config.mrmr_k, dim=config.model_dim, num_classes=len(profile.classes),
        dropout=config.dropout, token_dim=config.token_dim, **kwargs,
    )
