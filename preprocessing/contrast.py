"""Contrast enhancement on the lightness channel: CLAHE, then multiscale unsharp masking.

Both act on L* only, so they sharpen chromatin and membrane detail without shifting the stain
colours that :mod:`preprocessing.stain` has just normalised.
"""

from __future__ import annotations

import cv2
import numpy as np


def clahe_lightness(
    rgb: np.ndarray, *, clip_limit: float = 2.0, tile_grid: int = 8, cells: np.ndarray | None = None,
    fill_level: int = 235,
) -> np.ndarray:
    """Contrast-limited adaptive histogram equalisation of L* (uint8 RGB in and out).

    Zuiderveld K. "Contrast limited adaptive histogram equalization". Graphics Gems IV, 1994.

    With a boolean ``cells`` mask, each tile's histogram is taken as if every other pixel had lightness
    ``fill_level``, and only the cells' lightness is replaced: the mapping the cells get no longer
    depends on the background around them, which keeps its own pixels.
    """
    if clip_limit <= 0 or tile_grid < 1:
        raise ValueError(f"clip_limit must be > 0 and tile_grid >= 1, got {clip_limit}, {tile_grid}")
    lab = cv2.cvtColor(rgb, cv2.COLOR_RGB2LAB)
    clahe = cv2.createCLAHE(clipLimit=clip_limit, tileGridSize=(tile_grid, tile_grid))
    if cells is None:
        lab[..., 0] = clahe.apply(np.ascontiguousarray(lab[..., 0]))
    else:
        lightness = np.where(cells, lab[..., 0], np.uint8(fill_level))
        lab[..., 0] = np.where(cells, clahe.apply(lightness), lab[..., 0])
    return cv2.cvtColor(lab, cv2.COLOR_LAB2RGB)


def multiscale_enhance(
    rgb: np.ndarray,
    *,
    sigmas: tuple[float, ...] = (1.0, 2.0, 4.0),
    weights: tuple[float, ...] = (0.5, 0.3, 0.2),
    amount: float = 1.0,
) -> np.ndarray:
    """Multiscale unsharp masking of L*: ``L + amount * sum_i w_i (L - G_sigma_i * L)``.

    Detail layers at several Gaussian scales are boosted together, so fine chromatin texture and
    whole-nucleus outlines gain contrast at once (generalised unsharp masking: Deng G, IEEE Trans
    Image Process 20(5):1249-1261, 2011; scale-space detail layers as in Jobson, Rahman & Woodell's
    multiscale retinex, IEEE Trans Image Process 6(7), 1997). uint8 RGB in and out.
    """
    if len(sigmas) != len(weights):
        raise ValueError(f"sigmas and weights differ in length: {sigmas} vs {weights}")
    lab = cv2.cvtColor(rgb, cv2.COLOR_RGB2LAB)
    lightness = lab[..., 0].astype(np.float32)
    detail = np.zeros_like(lightness)
    for sigma, weight in zip(sigmas, weights, strict=True):
        detail += weight * (lightness - cv2.GaussianBlur(lightness, (0, 0), sigmaX=sigma))
    lab[..., 0] = np.clip(lightness + amount * detail, 0, 255).round().astype(np.uint8)
    return cv2.cvtColor(lab, cv2.COLOR_LAB2RGB)
