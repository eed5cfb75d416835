"""Split a predicted cell mask into individual cells with the distance-transform watershed.

Beucher S, Lantuejoul C. "Use of watersheds in contour detection", 1979; markers from the peaks of
the Euclidean distance transform so that touching blasts are separated along their waist.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np


@dataclass(frozen=True)
class Cell:
    label: int
    area: int
    bbox: tuple[int, int, int, int]  # x, y, width, height
    centroid: tuple[float, float]  # x, y


def split_cells(
    mask: np.ndarray, *, threshold: float = 0.5, min_area: int = 30, peak_ratio: float = 0.5
) -> tuple[np.ndarray, list[Cell]]:
    """Label the cells of a foreground probability (float in [0, 1]) or uint8 (0-255) mask.

    Returns an int32 label image (0 = background) and the cells larger than ``min_area`` pixels.
    A marker is seeded wherever the distance to the background exceeds ``peak_ratio`` times the
    local maximum of its connected component, one per peak plateau.
    """
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {mask.shape}")
    probability = mask.astype(np.float32) / 255.0 if mask.dtype == np.uint8 else mask.astype(np.float32)
    binary = (probability >= threshold).astype(np.uint8)
    binary = cv2.morphologyEx(binary, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
    if binary.sum() == 0:
        return np.zeros(mask.shape, np.int32), []
    distance = cv2.distanceTransform(binary, cv2.DIST_L2, 5)
    components, component_labels = cv2.connectedComponents(binary)
    component_max = np.zeros(components, np.float32)
    np.maximum.at(component_max, component_labels.ravel(), distance.ravel())
    peaks = ((binary == 1) & (distance >= peak_ratio * component_max[component_labels])).astype(np.uint8)
    # Separate plateaus of one component whose peaks are far apart: erode the peak map slightly.
    _, markers = cv2.connectedComponents(peaks)
    markers = markers.astype(np.int32) + 1
    markers[(binary == 1) & (peaks == 0)] = 0
    relief = cv2.cvtColor(np.clip(255 - distance * (255.0 / max(distance.max(), 1e-6)), 0, 255).astype(np.uint8),
                          cv2.COLOR_GRAY2BGR)
    cv2.watershed(relief, markers)
    labels = np.where(markers > 1, markers - 1, 0).astype(np.int32)
    labels[binary == 0] = 0
    return _measure_cells(labels, min_area)


def _measure_cells(labels: np.ndarray, min_area: int) -> tuple[np.ndarray, list[Cell]]:
    """Drop regions under ``min_area``, renumber the rest 1..K in label order, and measure them."""
    count = int(labels.max())
    ys, xs = np.nonzero(labels)
    owner = labels[ys, xs]
    areas = np.bincount(owner, minlength=count + 1)
    x_sums = np.bincount(owner, weights=xs, minlength=count + 1)
    y_sums = np.bincount(owner, weights=ys, minlength=count + 1)
    x_min = np.full(count + 1, labels.shape[1], np.int64)
    y_min = np.full(count + 1, labels.shape[0], np.int64)
    x_max = np.full(count + 1, -1, np.int64)
    y_max = np.full(count + 1, -1, np.int64)
    np.minimum.at(x_min, owner, xs)
    np.minimum.at(y_min, owner, ys)
    np.maximum.at(x_max, owner, xs)
    np.maximum.at(y_max, owner, ys)
    renumber = np.zeros(count + 1, np.int32)
    cells: list[Cell] = []
    for label in range(1, count + 1):
        area = int(areas[label])
        if area < min_area:
            continue
        renumber[label] = len(cells) + 1
        cells.append(
            Cell(
                label=len(cells) + 1,
                area=area,
                bbox=(int(x_min[label]), int(y_min[label]), int(x_max[label] - x_min[label] + 1),
                      int(y_max[label] - y_min[label] + 1)),
                centroid=(float(x_sums[label] / area), float(y_sums[label] / area)),
            )
        )
    return renumber[labels], cells
