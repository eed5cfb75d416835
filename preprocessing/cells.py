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
    peaks = np.zeros_like(binary)
    for component in range(1, components):
        inside = component_labels == component
        local_max = distance[inside].max()
        peaks[inside & (distance >= peak_ratio * local_max)] = 1
    # Separate plateaus of one component whose peaks are far apart: erode the peak map slightly.
    _, markers = cv2.connectedComponents(peaks)
    markers = markers.astype(np.int32) + 1
    markers[(binary == 1) & (peaks == 0)] = 0
    relief = cv2.cvtColor(np.clip(255 - distance * (255.0 / max(distance.max(), 1e-6)), 0, 255).astype(np.uint8),
                          cv2.COLOR_GRAY2BGR)
    cv2.watershed(relief, markers)
    labels = np.where(markers > 1, markers - 1, 0).astype(np.int32)
    labels[binary == 0] = 0
    cells: list[Cell] = []
    kept = np.zeros_like(labels)
    for label in range(1, int(labels.max()) + 1):
        region = labels == label
        area = int(region.sum())
        if area < min_area:
            continue
        ys, xs = np.nonzero(region)
        new_label = len(cells) + 1
        kept[region] = new_label
        cells.append(
            Cell(
                label=new_label,
                area=area,
                bbox=(int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)),
                centroid=(float(xs.mean()), float(ys.mean())),
            )
        )
    return kept, cells
