"""z-score standardisation, the last preprocessing step (run inside the first ONNX graph when served)."""

from __future__ import annotations

import numpy as np


def zscore(values: np.ndarray, *, axis: int | tuple[int, ...] | None = None, eps: float = 1e-6) -> np.ndarray:
    """``(x - mean) / std`` over ``axis`` (float32 out); ``std`` is floored at ``eps`` for flat inputs."""
    values = np.asarray(values, dtype=np.float32)
    mean = values.mean(axis=axis, keepdims=True)
    std = values.std(axis=axis, keepdims=True)
    return (values - mean) / np.maximum(std, eps)


def fit_zscore(features: np.ndarray, *, eps: float = 1e-6) -> tuple[np.ndarray, np.ndarray]:
    """Column means and stds (float32) of a ``(samples, features)`` matrix, stds floored at ``eps``."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"fit_zscore needs a (samples>=2, features) matrix, got shape {features.shape}")
    return features.mean(axis=0).astype(np.float32), np.maximum(features.std(axis=0), eps).astype(np.float32)
