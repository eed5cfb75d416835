"""A field's magnification from its red blood cells, and fitting a field at a chosen scale.

Red cells are 7-8 um across in every lab's smear, so their size in pixels is a ruler: a field taken
with another objective or camera has them larger or smaller than the training fields had. The served
model fits every field at the training scale, either from a pixel size the caller states (um per
pixel) or from this measurement.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from preprocessing.pipeline import fit_field

#: Diameter of a normal red blood cell in um (7-8 um; Bain BJ, "Blood Cells", 5th ed., 2015).
RED_CELL_UM = 7.5

#: Fewest distance-transform peaks (cells) a measurement needs before it is believed.
MIN_CELLS = 5

#: Side (pixels) the measurement works at: larger images are shrunk first, which bounds its cost.
_WORKING_SIDE = 448


def red_cell_diameter(rgb: np.ndarray) -> float | None:
    """Typical cell diameter in pixels of ``rgb`` (uint8 RGB), or ``None`` when too few cells are found.

    Cells are whatever is darker than the local background, which is taken as a wide grey-level dilation
    of L* (a rolling-ball style background, after Sternberg 1983, so a vignetted field is measured
    evenly); pale cell centres are filled. Each cell, isolated or in a clump, leaves a peak in the
    Euclidean distance transform of that mask whose value is its inscribed radius (Borgefors 1986);
    the median over peaks is dominated by the red cells, which outnumber white cells in a smear.
    """
    short = min(rgb.shape[:2])
    shrink = min(1.0, _WORKING_SIDE / short)
    if shrink < 1.0:
        rgb = cv2.resize(rgb, (round(rgb.shape[1] * shrink), round(rgb.shape[0] * shrink)),
                         interpolation=cv2.INTER_AREA)
    lightness = cv2.cvtColor(cv2.GaussianBlur(rgb, (0, 0), 0.8), cv2.COLOR_RGB2LAB)[..., 0].astype(np.float32)
    # the background varies slowly: estimated at a quarter of the resolution, it costs a sixteenth
    small = cv2.resize(lightness, (max(1, lightness.shape[1] // 4), max(1, lightness.shape[0] // 4)),
                       interpolation=cv2.INTER_AREA)
    side = max(5, (min(lightness.shape) // 32) | 1)
    ball = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (side, side))
    background = cv2.resize(cv2.GaussianBlur(cv2.dilate(small, ball), (0, 0), side / 2),
                            (lightness.shape[1], lightness.shape[0]), interpolation=cv2.INTER_LINEAR)
    darkness = background - lightness
    mask = (darkness > max(6.0, 0.2 * float(np.percentile(darkness, 97)))).astype(np.uint8)
    mask = _fill_small_holes(mask, max_area=0.01 * mask.size)
    mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
    distance = cv2.distanceTransform(mask, cv2.DIST_L2, 5)
    peaks = (distance >= 2.5) & (distance >= cv2.dilate(distance, cv2.getStructuringElement(cv2.MORPH_ELLIPSE,
                                                                                              (7, 7))))
    radii = distance[peaks]
    if len(radii) < MIN_CELLS:
        return None
    return 2.0 * float(np.median(radii)) / shrink


def _fill_small_holes(mask: np.ndarray, *, max_area: float) -> np.ndarray:
    """``mask`` with its enclosed background regions smaller than ``max_area`` filled (red cells' pale centres)."""
    holes = (1 - mask).astype(np.uint8)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(holes, connectivity=4)
    height, width = mask.shape
    x, y, w, h, area = (stats[:, i] for i in range(5))
    enclosed = (x > 0) & (y > 0) & (x + w < width) & (y + h < height) & (area < max_area)
    enclosed[0] = False
    return (mask.astype(bool) | enclosed[labels]).astype(np.uint8)


def fit_field_at(rgb: np.ndarray, size: int, factor: float) -> np.ndarray:
    """A ``size`` x ``size`` field of ``rgb`` resized by ``factor``: its centre, mirrored at the edges where
    the resized image is smaller than the field (a zoomed-in image covers less of the smear than a field).

    :func:`preprocessing.pipeline.fit_field` is the case ``factor = size / min(height, width)``.
    """
    height, width = rgb.shape[:2]
    new_w, new_h = max(1, round(width * factor)), max(1, round(height * factor))
    interpolation = cv2.INTER_AREA if factor < 1 else cv2.INTER_LINEAR
    resized = cv2.resize(rgb, (new_w, new_h), interpolation=interpolation)
    pad_y, pad_x = max(0, size - new_h), max(0, size - new_w)
    if pad_y or pad_x:  # OpenCV reflects repeatedly where the border is wider than the image
        resized = cv2.copyMakeBorder(resized, pad_y // 2, pad_y - pad_y // 2, pad_x // 2, pad_x - pad_x // 2,
                                     cv2.BORDER_REFLECT_101)
    height, width = resized.shape[:2]
    top, left = (height - size) // 2, (width - size) // 2
    return np.ascontiguousarray(resized[top : top + size, left : left + size])


#: Automatic rescaling is tried within this factor of the training scale; beyond it the field is flagged.
MAX_RESCALE = 4.0


@dataclass(frozen=True)
class ScalePlan:
    """How a field is fitted: ``factor`` resizes the image as sent to field pixels (the training scale)."""

    factor: float
    default_factor: float  # the plain fit: the short side to the field size
    diameter: float | None = None  # red cells measured at the plain fit, field pixels
    pixel_size_um: float | None = None  # um per pixel of the image as sent
    reason: str | None = None  # a review reason, when the scale is unknown, adjusted or out of range

    @property
    def rescaled_by(self) -> float | None:
        """How much the plan departs from the plain fit, or ``None`` when it does not."""
        return None if self.factor == self.default_factor else self.factor / self.default_factor


def plan_scale(rgb: np.ndarray, field_size: int, training: tuple[float, float, float], *,
               pixel_size_um: float | None = None) -> ScalePlan:
    """Fit ``rgb`` so that its red cells are the size they were in training.

    ``training`` is the training fields' red-cell diameter (low, median, high) in field pixels. With the
    caller's ``pixel_size_um`` the factor follows from it and the training pixel size (7.5 um over the
    median). Otherwise the cells are measured at the plain fit: inside the training range the field is
    fitted as usual (so in-distribution fields are untouched); outside it, and within
    :data:`MAX_RESCALE`, it is resized to the median and flagged for review, since a measurement can be
    wrong; farther out, or with no cells to measure, it is fitted as usual and flagged.
    """
    low, median, high = training
    default = field_size / min(rgb.shape[:2])
    if pixel_size_um is not None:
        if not pixel_size_um > 0:
            raise ValueError(f"the pixel size must be positive, got {pixel_size_um}")
        return ScalePlan(pixel_size_um / (RED_CELL_UM / median), default, pixel_size_um=pixel_size_um)
    measured = red_cell_diameter(rgb)
    if measured is None:
        return ScalePlan(default, default, reason="scale_unknown: too few cells to measure the magnification "
                                                  "(state the pixel size)")
    diameter = measured * default
    size = RED_CELL_UM / measured
    if low <= diameter <= high:
        return ScalePlan(default, default, diameter, size)
    ratio = median / diameter
    found = f"red cells {diameter:.1f} px across, training fields {low:.1f}-{high:.1f} px"
    if 1 / MAX_RESCALE <= ratio <= MAX_RESCALE:
        return ScalePlan(default * ratio, default, diameter, size,
                         f"scale_adjusted: {found}; field resized x{ratio:.2f} to the training scale "
                         "(another magnification? state the pixel size)")
    return ScalePlan(default, default, diameter, size,
                     f"scale_out_of_range: {found} (another magnification, or not a smear field)")


def fit_to_plan(rgb: np.ndarray, size: int, plan: ScalePlan | None, *, field_size: int,
                max_aspect_ratio: float = 4.0) -> np.ndarray:
    """``rgb`` fitted to ``size`` x ``size`` by ``plan`` (made for ``field_size``); the plain fit without one."""
    if plan is None or plan.rescaled_by is None:
        return fit_field(rgb, size, max_aspect_ratio=max_aspect_ratio)
    return fit_field_at(rgb, size, plan.factor * size / field_size)


#: Pixel sizes (um per pixel) accepted from callers: from a 0.01 um/px scan to a 10 um/px thumbnail.
PIXEL_SIZE_RANGE_UM = (0.01, 10.0)


def check_pixel_size(value: float) -> float:
    """``value`` as a float if it is a plausible pixel size in um, else ``ValueError`` saying why."""
    low, high = PIXEL_SIZE_RANGE_UM
    number = float(value)
    if not low <= number <= high:
        raise ValueError(f"pixel size {value} um is outside {low}-{high} um per pixel")
    return number
