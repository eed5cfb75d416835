"""Images for people: data URLs of the field, its preprocessed form, mask and attention overlays, cell crops.

The web page gets PNG layers it stacks itself; batch reports get small JPEGs with the maps blended in.
"""

from __future__ import annotations

import base64

import cv2
import numpy as np

from engine.occlusion import Evidence
from hybridcn.contracts import Cell, FieldImages
from preprocessing import split_cells


def encode_png(rgb: np.ndarray) -> bytes:
    """PNG bytes of an RGB (or single-channel) uint8 image."""
    bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR) if rgb.ndim == 3 else rgb
    ok, encoded = cv2.imencode(".png", bgr)
    if not ok:
        raise ValueError("PNG encoding failed")
    return encoded.tobytes()


def png_data_url(rgb: np.ndarray) -> str:
    return "data:image/png;base64," + base64.b64encode(encode_png(rgb)).decode()


def rgba_map(values: np.ndarray, colour: tuple[int, int, int]) -> np.ndarray:
    """A uint8 map (0-255) as a transparent RGBA layer of one colour, alpha = value."""
    layer = np.zeros((*values.shape, 4), np.uint8)
    layer[..., :3] = colour
    layer[..., 3] = values
    return layer


def heatmap(values: np.ndarray) -> np.ndarray:
    """A uint8 map as an RGBA 'jet' heat layer with alpha growing with the value."""
    colours = cv2.cvtColor(cv2.applyColorMap(values, cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    return np.dstack([colours, (values.astype(np.float32) * 0.85).astype(np.uint8)])


def _rgba_png(rgba: np.ndarray) -> str:
    ok, encoded = cv2.imencode(".png", cv2.cvtColor(rgba, cv2.COLOR_RGBA2BGRA))
    if not ok:
        raise ValueError("PNG encoding failed")
    return "data:image/png;base64," + base64.b64encode(encoded.tobytes()).decode()


def fit_maps(mask: np.ndarray, attention: np.ndarray, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """The model's mask and attention map resized to an image of ``shape`` (a field in scanner pixels, a thumbnail)."""
    return _resized(mask, shape, cv2.INTER_NEAREST), _resized(attention, shape, cv2.INTER_AREA)


def _resized(values: np.ndarray, shape: tuple[int, ...], interpolation: int = cv2.INTER_LINEAR) -> np.ndarray:
    """A uint8 map resized to an image of ``shape`` (unchanged when it already fits); bilinear by default,
    for the occlusion evidence, whose windows overlap."""
    if values.shape == shape[:2]:
        return values
    return cv2.resize(values, (shape[1], shape[0]), interpolation=interpolation)


def cell_crops(rgb: np.ndarray, boxes: list[tuple[int, int, int, int]], *, limit: int = 12,
               pad: int = 4) -> list[np.ndarray]:
    """64x64 crops of the first ``limit`` cell boxes (x, y, width, height), padded by ``pad`` pixels."""
    crops = []
    for x, y, w, h in boxes[:limit]:
        crop = rgb[max(0, y - pad) : y + h + pad, max(0, x - pad) : x + w + pad]
        crops.append(cv2.resize(crop, (64, 64), interpolation=cv2.INTER_AREA))
    return crops


def field_images(display: np.ndarray, preprocessed: np.ndarray, mask: np.ndarray, attention: np.ndarray,
                 cells: list[Cell] | None = None, *, steps: list[str] | None = None,
                 evidence: Evidence | None = None) -> FieldImages:
    """Data URLs for the web page and reports (mask, attention and occlusion evidence as transparent overlays).

    ``display`` is the field in scanner pixels; a model that runs at a lower resolution has its maps
    resized to it. ``cells`` are the result's cell dicts (``bbox`` and ``area`` in field pixels);
    without them the mask is split again.
    """
    scale = display.shape[0] / mask.shape[0]
    if cells is None:
        boxes_areas = [([round(v * scale) for v in c.bbox], c.area) for c in split_cells(mask)[1]]
    else:
        boxes_areas = [(c.bbox, c.area) for c in cells]
    mask, attention = fit_maps(mask, attention, display.shape)
    boxes = [tuple(bbox) for bbox, _ in sorted(boxes_areas, key=lambda item: -item[1])]
    return FieldImages(
        original=png_data_url(display),
        preprocessed=png_data_url(preprocessed),
        mask=_rgba_png(rgba_map(mask, (0, 200, 120))),
        attention=_rgba_png(heatmap(attention)),
        cells=[png_data_url(crop) for crop in cell_crops(display, boxes)],
        preprocessing=steps or [],
        evidence=None if evidence is None else _rgba_png(heatmap(_resized(evidence.to_uint8(), display.shape))),
        evidence_peak=None if evidence is None else round(evidence.peak, 4),
    )


#: Side of the square JPEG thumbnails in batch report galleries.
THUMBNAIL = 160


def jpeg_data_url(rgb: np.ndarray, *, size: int = THUMBNAIL, quality: int = 82) -> str:
    small = cv2.resize(rgb, (size, size), interpolation=cv2.INTER_AREA) if rgb.shape[0] != size else rgb
    ok, encoded = cv2.imencode(".jpg", cv2.cvtColor(small, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError("JPEG encoding failed")
    return "data:image/jpeg;base64," + base64.b64encode(encoded.tobytes()).decode()


def _blend(rgb: np.ndarray, rgba: np.ndarray) -> np.ndarray:
    alpha = rgba[..., 3:4].astype(np.float32) / 255.0
    return (rgb.astype(np.float32) * (1 - alpha) + rgba[..., :3].astype(np.float32) * alpha).round().astype(np.uint8)


def gallery_images(original: np.ndarray, mask: np.ndarray, attention: np.ndarray) -> dict[str, str]:
    """Three small JPEG data URLs: the field, the field under its cell mask, under its attention map.

    ``original`` may be a thumbnail: the maps are resized to it.
    """
    mask, attention = fit_maps(mask, attention, original.shape)
    return {
        "field": jpeg_data_url(original),
        "mask": jpeg_data_url(_blend(original, rgba_map((mask > 127).astype(np.uint8) * 140, (0, 200, 120)))),
        "attention": jpeg_data_url(_blend(original, heatmap(attention))),
    }
