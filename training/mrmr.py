"""Minimum-redundancy maximum-relevance feature selection (MID criterion).

Peng H, Long F, Ding C. "Feature selection based on mutual information: criteria of
max-dependency, max-relevance, and min-redundancy". IEEE TPAMI 27(8):1226-1238, 2005.
Features are discretised into equal-frequency bins; every mutual information is a joint histogram
computed as one matrix product, so the greedy loop runs on a GPU when one is given.
"""

from __future__ import annotations

import numpy as np
import torch


def discretize(features: np.ndarray, *, bins: int = 10) -> np.ndarray:
    """Equal-frequency bin index (int64, 0..bins-1) of every value, column by column."""
    quantiles = np.quantile(features, np.linspace(0, 1, bins + 1)[1:-1], axis=0)  # (bins-1, F)
    return (features[None, :, :] > quantiles[:, None, :]).sum(axis=0).astype(np.int64)


def _mutual_information(one_hot_a: torch.Tensor, one_hot_b: torch.Tensor, samples: int) -> torch.Tensor:
    """MI between one variable ``a`` (N, Ba) and each of F variables ``b`` (N, F, Bb) -> (F,)."""
    joint = torch.einsum("na,nfb->fab", one_hot_a, one_hot_b) / samples
    pa = joint.sum(dim=2, keepdim=True)
    pb = joint.sum(dim=1, keepdim=True)
    ratio = joint / torch.clamp(pa * pb, min=1e-12)
    return torch.where(joint > 0, joint * torch.log(torch.clamp(ratio, min=1e-12)), torch.zeros_like(joint)).sum((1, 2))


def mrmr_select(
    features: np.ndarray, labels: np.ndarray, k: int, *, bins: int = 10, device: str | None = None
) -> np.ndarray:
    """Indices (int64, length ``k``) chosen greedily by ``MI(f; y) - mean_s MI(f; s)``."""
    samples, width = features.shape
    if not 0 < k <= width:
        raise ValueError(f"k must be in 1..{width}, got {k}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    codes = torch.as_tensor(discretize(features, bins=bins), device=device)
    one_hot = torch.nn.functional.one_hot(codes, bins).to(torch.float32)  # (N, F, B)
    classes = int(labels.max()) + 1
    label_hot = torch.nn.functional.one_hot(torch.as_tensor(labels, device=device), classes).to(torch.float32)
    relevance = _mutual_information(label_hot, one_hot, samples)
    redundancy = torch.zeros(width, device=device)
    selected = [int(torch.argmax(relevance))]
    available = torch.ones(width, dtype=torch.bool, device=device)
    available[selected[0]] = False
    for step in range(1, k):
        redundancy += _mutual_information(one_hot[:, selected[-1], :], one_hot, samples)
        score = relevance - redundancy / step
        score[~available] = -torch.inf
        best = int(torch.argmax(score))
        selected.append(best)
        available[best] = False
    return np.asarray(selected, dtype=np.int64)
