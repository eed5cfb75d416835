"""A field's acquisition statistics: colour, contrast, stain coverage, focus and texture, as one vector.

The networks see a stain-normalised field, which hides exactly what tells a foreign image apart (a
greyscale camera, an inverted image, a black background, noise); these statistics are taken on the
field as it arrived (fitted to the model's size, before normalisation) and feed the out-of-distribution
score next to the networks' features.
"""

from __future__ import annotations

import cv2
import numpy as np

from preprocessing.stain import foreground_mask

STATISTICS = ("L_mean", "a_mean", "b_mean", "L_std", "a_std", "b_std", "stained_fraction", "log_sharpness",
              "dark_fraction", "bright_fraction", "chroma_mean", "log_grain", "clipped_white_fraction",
              "log_object_size", "log_object_count", "log_blob_scale")

#: Scales (Gaussian sigma, pixels) searched for the field's characteristic blob size.
_SIGMAS = 2.0 ** np.arange(0, 4.75, 0.25)


def blob_scale(lightness: np.ndarray) -> float:
    """The field's characteristic blob radius in pixels: the scale of the strongest scale-normalised
    Laplacian-of-Gaussian response (Lindeberg 1998, "Feature detection with automatic scale selection").

    Red cells dominate a smear and are 7-8 um across in every lab, so this tracks the magnification.
    """
    energies = []
    pyramid = [lightness]
    for sigma in _SIGMAS:
        # sigma beyond 2 px runs on a halved image at half the sigma: the scale-normalised response is the
        # same, and the blur costs a quarter per halving (the largest sigma would be a 97-tap kernel)
        level = max(0, int(np.floor(np.log2(sigma))) - 1)
        while len(pyramid) <= level:
            pyramid.append(cv2.pyrDown(pyramid[-1]))
        local = float(sigma) / 2**level
        response = cv2.Laplacian(cv2.GaussianBlur(pyramid[level], (0, 0), local), cv2.CV_32F)
        energies.append(float(np.abs(response).mean()) * local**2)
    best = int(np.argmax(energies))
    if 0 < best < len(energies) - 1:  # parabolic refinement on the log-scale grid
        left, mid, right = energies[best - 1 : best + 2]
        denominator = left - 2 * mid + right
        offset = 0.5 * (left - right) / denominator if denominator else 0.0
        return float(2.0 ** (np.log2(_SIGMAS[best]) + 0.25 * offset))
    return float(_SIGMAS[best])


def _objects(mask: np.ndarray) -> tuple[float, int]:
    """Median equivalent diameter (pixels) and count of the stained objects of at least 9 pixels.

    Cells are the ruler here: a field at another magnification, or one cell blown up to fill the image,
    has objects of another size than the training fields at the same pixel count.
    """
    count, _, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8))
    areas = stats[1:, cv2.CC_STAT_AREA]
    areas = areas[areas >= 9]
    if not len(areas):
        return 0.0, 0
    return float(np.sqrt(4 * np.median(areas) / np.pi)), int(len(areas))


def field_statistics(rgb: np.ndarray) -> np.ndarray:
    """The :data:`STATISTICS` of a uint8 RGB field, as float32 (OpenCV's 8-bit L*a*b*)."""
    lab = cv2.cvtColor(rgb, cv2.COLOR_RGB2LAB).astype(np.float32)
    lightness = lab[..., 0]
    chroma = np.hypot(lab[..., 1] - 128, lab[..., 2] - 128)
    grain = np.abs(lightness - cv2.medianBlur(lightness.astype(np.uint8), 3).astype(np.float32)).mean()
    stained = foreground_mask(rgb)
    size, count = _objects(stained)
    values = [
        *lab.reshape(-1, 3).mean(axis=0), *lab.reshape(-1, 3).std(axis=0),
        stained.mean(),
        np.log1p(cv2.Laplacian(lightness, cv2.CV_32F).var()),
        (lightness < 25).mean(), (lightness > 250).mean(), chroma.mean(), np.log1p(grain),
        (rgb.min(axis=2) >= 254).mean(), np.log1p(size), np.log1p(count), np.log(blob_scale(lightness)),
    ]
    return np.asarray(values, np.float32)
