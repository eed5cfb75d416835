"""Reinhard colour transfer for stain normalisation, with foreground-only statistics.

Reinhard E, Ashikhmin M, Gooch B, Shirley P. "Color transfer between images". IEEE Computer
Graphics and Applications 21(5):34-41, 2001. The statistics are taken in CIE L*a*b* (OpenCV's 8-bit
encoding) over the smear's foreground only: the pale background and the scale-bar box in the
bottom-right corner differ by acquisition session (and so by class in the Taleqani data); letting
them drive the transfer would carry that shortcut into the model.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import cv2
import numpy as np


@dataclass(frozen=True)
class StainReference:
    """Target per-channel mean and std of the foreground in OpenCV 8-bit L*a*b* units."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def to_dict(self) -> dict[str, list[float]]:
        return {"mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, data: dict[str, list[float]]) -> StainReference:
        return cls(mean=tuple(map(float, data["mean"])), std=tuple(map(float, data["std"])))


def corner_box(shape: tuple[int, ...], *, corner_fraction: tuple[float, float]) -> tuple[slice, slice]:
    """Rows and columns of the bottom-right box where microscope software stamps the scale bar."""
    height, width = shape[:2]
    box_h = int(round(height * corner_fraction[0]))
    box_w = int(round(width * corner_fraction[1]))
    return slice(height - box_h, height), slice(width - box_w, width)


def foreground_mask(
    rgb: np.ndarray, *, corner_fraction: tuple[float, float] = (0.12, 0.3), min_fraction: float = 0.05,
    lightness_threshold: int | None = None,
) -> np.ndarray:
    """Boolean mask of stained matter (cells), excluding the pale background and the scale-bar box.

    Background is found by a threshold on lightness combined with a chroma test; if fewer than
    ``min_fraction`` of the pixels pass, the darkest ``min_fraction`` are used instead, so every
    field yields statistics. The threshold is Otsu's (Otsu 1979, IEEE Trans. SMC 9(1):62-66) unless
    ``lightness_threshold`` (OpenCV 8-bit L*) fixes it: Otsu's adapts to each field's brightness, but
    it also depends on the background's histogram, so repainting the background changes which cell
    pixels count as foreground; a fixed threshold does not.
    """
    lab = cv2.cvtColor(rgb, cv2.COLOR_RGB2LAB)
    return _foreground_from_lab(lab, corner_fraction=corner_fraction, min_fraction=min_fraction,
                                lightness_threshold=lightness_threshold)


def _foreground_from_lab(lab: np.ndarray, *, corner_fraction: tuple[float, float], min_fraction: float,
                         lightness_threshold: int | None = None) -> np.ndarray:
    lightness = lab[..., 0]
    if lightness_threshold is None:
        threshold, _ = cv2.threshold(lightness, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    else:
        threshold = lightness_threshold
    mask = (lightness < threshold) | chroma_exceeds(lab, 30)
    rows, cols = corner_box(lab.shape, corner_fraction=corner_fraction)
    mask[rows, cols] = False
    if mask.mean() < min_fraction:
        allowed = np.ones_like(mask)
        allowed[rows, cols] = False
        cutoff = np.quantile(lightness[allowed], min_fraction)
        mask = allowed & (lightness <= cutoff)
    return mask


def chroma_exceeds(lab: np.ndarray, limit: int) -> np.ndarray:
    """Boolean map of ``hypot(a* - 128, b* - 128) > limit`` for OpenCV 8-bit L*a*b*, in exact integers.

    Comparing squared integer distances gives the same answer as the float ``hypot`` test at a
    fraction of its cost (it runs on every field, twice).
    """
    a = lab[..., 1].astype(np.int32) - 128
    b = lab[..., 2].astype(np.int32) - 128
    return a * a + b * b > limit * limit


def lab_statistics(rgb: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std (float64, shape (3,)) of the L*a*b* pixels under ``mask``."""
    return _masked_statistics(cv2.cvtColor(rgb, cv2.COLOR_RGB2LAB), mask)


def _masked_statistics(lab: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean, std = cv2.meanStdDev(lab, mask=mask.view(np.uint8))  # population std, accumulated in float64
    return mean.reshape(3), std.reshape(3)


def _channel_medians(pixels: np.ndarray) -> np.ndarray:
    """``np.median(pixels, axis=0)`` of (N, 3) uint8 pixels, from per-channel histograms (no sort)."""
    count = pixels.shape[0]
    ranks = np.array([(count - 1) // 2, count // 2])  # the two middle order statistics (equal if N is odd)
    medians = np.empty(3)
    for channel in range(3):
        cumulative = np.cumsum(np.bincount(pixels[:, channel], minlength=256))
        medians[channel] = np.searchsorted(cumulative, ranks, side="right").mean()
    return medians


def reinhard_normalize(
    rgb: np.ndarray,
    reference: StainReference,
    *,
    corner_fraction: tuple[float, float] = (0.12, 0.3),
    min_std: float = 1.0,
    lightness_threshold: int | None = None,
) -> np.ndarray:
    """Map the field's foreground L*a*b* mean/std onto ``reference``; returns uint8 RGB.

    Every pixel gets the same affine map per channel, so the background moves with the foreground
    but does not decide the map. ``lightness_threshold`` as in :func:`foreground_mask`.
    """
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) uint8 image, got {rgb.dtype} {rgb.shape}")
    lab8 = cv2.cvtColor(rgb, cv2.COLOR_RGB2LAB)  # converted once: mask, statistics and transfer share it
    mask = _foreground_from_lab(lab8, corner_fraction=corner_fraction, min_fraction=0.05,
                                lightness_threshold=lightness_threshold)
    source_mean, source_std = _masked_statistics(lab8, mask)
    target_mean = np.asarray(reference.mean)
    target_std = np.asarray(reference.std)
    scale = target_std / np.maximum(source_std, min_std)
    # The map is per channel and the input is 8-bit: evaluate it once per level, apply it as a table.
    levels = np.arange(256, dtype=np.float32)[:, None]
    table = (levels - source_mean.astype(np.float32)) * scale.astype(np.float32) + target_mean.astype(np.float32)
    table = np.clip(table, 0, 255).round().astype(np.uint8)
    return cv2.cvtColor(cv2.LUT(lab8, table.reshape(256, 1, 3)), cv2.COLOR_LAB2RGB)


def fit_stain_reference(
    images: Iterable[np.ndarray], *, corner_fraction: tuple[float, float] = (0.12, 0.3),
    lightness_threshold: int | None = None,
) -> StainReference:
    """Reference statistics: the median over fields of each field's foreground mean and std."""
    means, stds = [], []
    for rgb in images:
        mean, std = lab_statistics(rgb, foreground_mask(rgb, corner_fraction=corner_fraction,
                                                        lightness_threshold=lightness_threshold))
        means.append(mean)
        stds.append(std)
    if not means:
        raise ValueError("fit_stain_reference needs at least one image")
    mean = np.median(np.stack(means), axis=0)
    std = np.median(np.stack(stds), axis=0)
    return StainReference(mean=tuple(float(v) for v in mean), std=tuple(float(v) for v in std))


def background_colour(rgb: np.ndarray, *, corner_fraction: tuple[float, float] = (0.12, 0.3),
                      foreground: np.ndarray | None = None) -> np.ndarray:
    """Median RGB ``(3,) float`` of a field's non-stained pixels (white where there are none).

    The background's tint records the acquisition session (illumination and white balance), not the
    cells, so it serves to audit and to counter that shortcut. Pass ``foreground`` (from
    :func:`foreground_mask`) when the caller already has it.
    """
    if foreground is None:
        foreground = foreground_mask(rgb, corner_fraction=corner_fraction)
    background = ~foreground
    return np.median(rgb[background], axis=0) if background.any() else np.full(3, 255.0)


def background_tint(rgb: np.ndarray, *, corner_fraction: tuple[float, float] = (0.12, 0.3)) -> float:
    """Median CIE b* of the background pixels: positive is yellowish, negative bluish (the white balance).

    The median is taken over the pixels' own b*: the b* of the per-channel median RGB reads higher on
    these pale fields, and called a fifth of the bluish Early fields yellowish in a first try.
    """
    background = ~foreground_mask(rgb, corner_fraction=corner_fraction)
    if not background.any():
        return 0.0
    return float(np.median(cv2.cvtColor(rgb, cv2.COLOR_RGB2LAB)[..., 2][background])) - 128.0


def blank_corner(rgb: np.ndarray, *, corner_fraction: tuple[float, float] = (0.12, 0.3)) -> np.ndarray:
    """Paint the scale-bar box with the field's median background colour (a known shortcut of the data).

    Returns a new uint8 array; the rest of the field is untouched.
    """
    out = rgb.copy()
    rows, cols = corner_box(rgb.shape, corner_fraction=corner_fraction)
    background = ~foreground_mask(rgb, corner_fraction=corner_fraction)
    background[rows, cols] = False
    fill = _channel_medians(rgb[background] if background.any() else rgb.reshape(-1, 3))
    out[rows, cols] = fill.round().astype(np.uint8)
    return out


def flatten_background(
    rgb: np.ndarray, *, level: int = 235, corner_fraction: tuple[float, float] = (0.12, 0.3)
) -> np.ndarray:
    """Paint everything but the stained matter one neutral grey, the same for every field.

    Background colour and texture differ by acquisition session, and local contrast steps that come
    after (CLAHE equalises each tile's histogram, background included) carry that difference into the
    cells' own pixel values. With the background flat and identical everywhere, nothing downstream can
    read it. Returns a new uint8 array.
    """
    out = rgb.copy()
    out[~foreground_mask(rgb, corner_fraction=corner_fraction)] = level
    return out
