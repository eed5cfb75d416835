"""Out-of-distribution probes: images a lab may send that are not fields like the training ones.

Each probe turns a real field (or nothing) into something the model should not answer for without a
person: another magnification, one cell blown up, cells cut out onto black or white, inverted colours,
greyscale, heavy blur, noise, cell-free texture, and images that are not smears at all. They are what
the out-of-distribution score is checked against (the goal: nearly all of them flagged, few real fields
flagged). Deterministic for a given seed.
"""

from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np

from preprocessing.stain import foreground_mask

Probe = Callable[[np.ndarray, np.random.Generator], np.ndarray]


def zoom_in(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Twice the magnification: the centre half of the field, enlarged to the field's size."""
    h, w = rgb.shape[:2]
    crop = rgb[h // 4 : h // 4 + h // 2, w // 4 : w // 4 + w // 2]
    return cv2.resize(crop, (w, h), interpolation=cv2.INTER_CUBIC)


def zoom_out(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Half the magnification: the field mirrored to twice its extent, then shrunk back to its size."""
    h, w = rgb.shape[:2]
    wide = cv2.copyMakeBorder(rgb, h // 2, h // 2, w // 2, w // 2, cv2.BORDER_REFLECT)
    return cv2.resize(wide, (w, h), interpolation=cv2.INTER_AREA)


def nucleated_cores(rgb: np.ndarray) -> np.ndarray:
    """``(x, y, width, height, area)`` rows of the field's nucleated cells' stained cores, largest first.

    A white cell's nucleus is the most saturated stained matter of a Romanowsky smear: stained pixels
    (:func:`preprocessing.stain.foreground_mask`) above the field's 90th percentile of chroma (and at
    least 20), closed and opened by a 5 px disc; components under 0.4% of the field (debris, platelets)
    are dropped. Red cells, paler and less saturated, mostly stay out.
    """
    lab = cv2.cvtColor(rgb, cv2.COLOR_RGB2LAB).astype(np.float32)
    chroma = np.hypot(lab[..., 1] - 128, lab[..., 2] - 128)
    stained = foreground_mask(rgb)
    level = max(20.0, float(np.percentile(chroma[stained], 90))) if stained.any() else 20.0
    disc = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5))
    cores = cv2.morphologyEx((stained & (chroma > level)).astype(np.uint8), cv2.MORPH_CLOSE, disc)
    cores = cv2.morphologyEx(cores, cv2.MORPH_OPEN, disc)
    _, _, stats, _ = cv2.connectedComponentsWithStats(cores)
    stats = stats[1:][stats[1:, cv2.CC_STAT_AREA] >= 0.004 * cores.size]
    return stats[np.argsort(-stats[:, cv2.CC_STAT_AREA], kind="stable")]


def crop_around(rgb: np.ndarray, core: np.ndarray, margin: float) -> np.ndarray:
    """A square of ``margin`` times the larger side of ``core`` (an ``(x, y, width, height, area)`` row),
    centred on it and shifted inside the image where it would cross an edge."""
    h, w = rgb.shape[:2]
    x, y, bw, bh, _ = core
    side = min(h, w, int(max(bw, bh) * margin))
    x0 = int(np.clip(x + bw // 2 - side // 2, 0, w - side))
    y0 = int(np.clip(y + bh // 2 - side // 2, 0, h - side))
    return rgb[y0 : y0 + side, x0 : x0 + side]


def single_cell(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One white cell cropped with a margin and enlarged to fill the field, as single-cell datasets show one.

    The crop is centred on the largest nucleated core (:func:`nucleated_cores`) with twice its size as the
    side, so the cell and a rim of its neighbours are in it. A field without one is zoomed in 4x instead.
    """
    h, w = rgb.shape[:2]
    cores = nucleated_cores(rgb)
    if not len(cores):
        return zoom_in(zoom_in(rgb, rng), rng)
    return cv2.resize(crop_around(rgb, cores[0], 2.0), (w, h), interpolation=cv2.INTER_CUBIC)


def _background(rgb: np.ndarray, value: int) -> np.ndarray:
    mask = cv2.dilate(foreground_mask(rgb).astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
    out = np.full_like(rgb, value)
    out[mask] = rgb[mask]
    return out


def black_background(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The stained cells on black, as single-cell datasets and some segmenters present them."""
    return _background(rgb, 0)


def white_background(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The stained cells on pure white."""
    return _background(rgb, 255)


def inverted(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Colour negative."""
    return 255 - rgb


def greyscale(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A monochrome camera or a converted image."""
    return cv2.cvtColor(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)


def heavy_blur(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Far out of focus (sigma 4-8 pixels)."""
    return cv2.GaussianBlur(rgb, (0, 0), float(rng.uniform(4, 8)))


def noise(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Uniform colour noise of the field's size."""
    return rng.integers(0, 256, rgb.shape, dtype=np.uint8)


def cell_free_texture(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Smooth pink-purple texture with no cells (stain debris, an empty area of the slide)."""
    h, w = rgb.shape[:2]
    coarse = rng.uniform(0, 1, (h // 16 + 1, w // 16 + 1, 1)).astype(np.float32)
    smooth = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)[..., None]
    pink, purple = np.array([235, 200, 215], np.float32), np.array([150, 90, 170], np.float32)
    return np.clip(pink * (1 - smooth) + purple * smooth, 0, 255).astype(np.uint8)


def not_a_smear(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A drawing: coloured shapes and lines on a light page (a screenshot, a document, a chart)."""
    h, w = rgb.shape[:2]
    page = np.full((h, w, 3), 245, np.uint8)
    for _ in range(12):
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        x0, y0, x1, y1 = (int(v) for v in rng.integers(0, min(h, w), 4))
        if rng.random() < 0.5:
            cv2.rectangle(page, (x0, y0), (x1, y1), colour, -1)
        else:
            cv2.line(page, (x0, y0), (x1, y1), colour, int(rng.integers(1, 6)))
    return page


#: The probes, by name (each also stands for a kind of image a lab might send by mistake).
PROBES: dict[str, Probe] = {
    "zoom_in_2x": zoom_in, "zoom_out_2x": zoom_out, "single_cell": single_cell,
    "black_background": black_background, "white_background": white_background, "inverted": inverted,
    "greyscale": greyscale, "heavy_blur": heavy_blur, "noise": noise, "cell_free_texture": cell_free_texture,
    "not_a_smear": not_a_smear,
}


def probe_field(rgb: np.ndarray, kind: str, *, seed: int, field: int) -> np.ndarray:
    """``rgb`` turned into the probe ``kind`` (deterministic for the seed and field)."""
    if kind not in PROBES:
        raise ValueError(f"unknown probe {kind!r}; choose from {', '.join(PROBES)}")
    return PROBES[kind](rgb, np.random.default_rng([seed, field, list(PROBES).index(kind)]))
