"""Seeded stain and camera shifts of the kinds other labs produce, for robustness benchmarks.

Each kind changes one thing a different stain batch, microscope or camera changes, by a random amount
within a stated range: weaker contrast, a bluer or redder stain, more or less saturated colour,
brightness and gamma, defocus blur, JPEG compression. The amount is drawn per field from
``numpy.random.default_rng([seed, field, kind])``, so a benchmark is reproducible field by field and
independent of the order the fields are read in. Colour shifts act in CIE L*a*b* (OpenCV's 8-bit
encoding, a* and b* centred on 128), where "bluer" and "redder" are single axes (Reinhard et al. 2001
work in the same opponent space for the same reason).
"""

from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np

Shift = Callable[[np.ndarray, np.random.Generator], tuple[np.ndarray, float]]


def _lab(rgb: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(rgb, cv2.COLOR_RGB2LAB).astype(np.float32)


def _rgb(lab: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(np.clip(lab, 0, 255).round().astype(np.uint8), cv2.COLOR_LAB2RGB)


def contrast(rgb: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """Contrast times 0.7-0.9 about the field's mean (a flatter lamp, a thinner smear)."""
    factor = float(rng.uniform(0.7, 0.9))
    mean = rgb.reshape(-1, 3).mean(axis=0)
    return np.clip(mean + (rgb.astype(np.float32) - mean) * factor, 0, 255).round().astype(np.uint8), factor


def hue_blue(rgb: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """b* lowered by 4-12 (a bluer stain or a cooler white balance)."""
    amount = float(rng.uniform(4, 12))
    lab = _lab(rgb)
    lab[..., 2] -= amount
    return _rgb(lab), amount


def hue_red(rgb: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """a* raised by 4-12 (a redder eosin, a warmer white balance)."""
    amount = float(rng.uniform(4, 12))
    lab = _lab(rgb)
    lab[..., 1] += amount
    return _rgb(lab), amount


def saturation(rgb: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """Chroma (a*, b* about neutral) times 0.7-1.5 (stain strength, camera colour settings)."""
    factor = float(rng.uniform(0.7, 1.5))
    lab = _lab(rgb)
    lab[..., 1:] = 128 + (lab[..., 1:] - 128) * factor
    return _rgb(lab), factor


def brightness_gamma(rgb: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """Gamma 0.75-1.35, then brightness -15..+15 grey levels (exposure and camera response)."""
    gamma = float(rng.uniform(0.75, 1.35))
    offset = float(rng.uniform(-15, 15))
    shifted = 255.0 * (rgb.astype(np.float32) / 255.0) ** gamma + offset
    return np.clip(shifted, 0, 255).round().astype(np.uint8), gamma


def blur(rgb: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """Gaussian blur, sigma 0.6-1.4 pixels at the field's scale (slight defocus)."""
    sigma = float(rng.uniform(0.6, 1.4))
    return cv2.GaussianBlur(rgb, (0, 0), sigma), sigma


def jpeg(rgb: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """Re-encoded as JPEG at quality 40-75 (a scanner or LIS that compresses hard)."""
    quality = int(rng.integers(40, 76))
    ok, encoded = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError("JPEG encoding failed")
    return cv2.cvtColor(cv2.imdecode(encoded, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB), float(quality)


#: The benchmark's kinds, in report order.
SHIFTS: dict[str, Shift] = {
    "contrast": contrast, "hue_blue": hue_blue, "hue_red": hue_red, "saturation": saturation,
    "brightness_gamma": brightness_gamma, "blur": blur, "jpeg": jpeg,
}


def shift_field(rgb: np.ndarray, kind: str, *, seed: int, field: int) -> tuple[np.ndarray, float]:
    """``rgb`` (uint8, H x W x 3) shifted by ``kind``, with the amount drawn for this seed and field."""
    if kind not in SHIFTS:
        raise ValueError(f"unknown shift {kind!r}; choose from {', '.join(SHIFTS)}")
    rng = np.random.default_rng([seed, field, list(SHIFTS).index(kind)])
    return SHIFTS[kind](rgb, rng)
