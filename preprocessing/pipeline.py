"""Phase 1 of HybridCN-NAS as one function: field image -> model-ready uint8 field.

Training, the gateway and the Triton ``preprocess`` Python step all call :func:`preprocess_field`;
there is no second copy of these steps anywhere. The z-score (the last step) is folded into the
first ONNX graph, so what travels to Triton stays uint8.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import cv2
import numpy as np

from preprocessing.contrast import clahe_lightness, multiscale_enhance
from preprocessing.decode import DEFAULT_MAX_PIXELS, decode_image
from preprocessing.errors import InvalidImageError
from preprocessing.stain import (
    StainReference,
    blank_corner,
    flatten_background,
    foreground_mask,
    reinhard_normalize,
)


@dataclass(frozen=True)
class PreprocessConfig:
    """Constants of phase 1. ``stain_normalize`` and ``enhance`` exist for the ablation studies.

    ``flatten_background`` (after stain normalisation, before CLAHE) paints the background one grey;
    ``clahe_cells_only`` takes CLAHE's tile histograms over the stained matter only (the background
    counted as ``background_level``). Both keep the background from changing the cells' pixels, and both
    lost accuracy in a fold-0 experiment (MODEL_CARD.md, shortcut audit): ablation variants, off by default.
    ``stain_lightness_threshold`` fixes the L* threshold that tells Reinhard's statistics which pixels are
    stained (``None``: Otsu's threshold per field; see :func:`preprocessing.stain.foreground_mask`).
    """

    blank_corner: bool = True
    stain_normalize: bool = True
    stain_lightness_threshold: int | None = None
    flatten_background: bool = False
    clahe_cells_only: bool = False
    background_level: int = 235
    enhance: bool = True
    clahe_clip_limit: float = 2.0
    clahe_tile_grid: int = 8
    multiscale_sigmas: tuple[float, ...] = (1.0, 2.0, 4.0)
    multiscale_weights: tuple[float, ...] = (0.5, 0.3, 0.2)
    multiscale_amount: float = 0.6
    corner_fraction: tuple[float, float] = (0.12, 0.3)
    max_pixels: int = DEFAULT_MAX_PIXELS
    min_side: int = 32
    max_aspect_ratio: float = 4.0

    @classmethod
    def from_dict(cls, data: dict) -> PreprocessConfig:
        known = {f.name for f in fields(cls)}
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in known}
        return cls(**values)

    def to_dict(self) -> dict:
        return asdict(self)

    def steps(self) -> list[str]:
        """The phase-1 steps this configuration runs, in order, named for people (the web page's caption)."""
        named = [(self.blank_corner, "scale bar blanked"), (self.stain_normalize, "Reinhard"),
                 (self.flatten_background, "background flattened"), (self.enhance, "CLAHE"),
                 (self.enhance, "multiscale")]
        return [name for enabled, name in named if enabled]


def check_aspect_ratio(rgb: np.ndarray, max_aspect_ratio: float) -> None:
    """Refuse a very elongated image (``InvalidImageError``): it is a slide or a strip, not a field."""
    height, width = rgb.shape[:2]
    ratio = max(height, width) / min(height, width)
    if ratio > max_aspect_ratio:
        raise InvalidImageError(
            "bad_aspect_ratio",
            f"image is {width}x{height} (aspect {ratio:.1f}); a field must be at most {max_aspect_ratio}:1 "
            "- tile whole slides with `hybridcn batch`",
        )


def fit_field(rgb: np.ndarray, size: int, *, max_aspect_ratio: float = 4.0) -> np.ndarray:
    """Resize a field to ``size`` x ``size``: scale the short side to ``size``, centre-crop the long one.

    Fields of the model's size pass through untouched. Very elongated images are refused: they are
    slides or strips, which ``hybridcn batch`` tiles instead.
    """
    height, width = rgb.shape[:2]
    if (height, width) == (size, size):
        return rgb
    check_aspect_ratio(rgb, max_aspect_ratio)
    scale = size / min(height, width)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    resized = cv2.resize(rgb, (new_w, new_h), interpolation=interpolation)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return np.ascontiguousarray(resized[top : top + size, left : left + size])


def enhance_field(rgb: np.ndarray, reference: StainReference, config: PreprocessConfig) -> np.ndarray:
    """Scale-bar box blanked, Reinhard stain normalisation, [background flattened], CLAHE, multiscale enhancement.

    Each step is switchable for the ablation studies; the result is uint8 RGB of the same shape.
    """
    out = rgb
    if config.blank_corner:
        out = blank_corner(out, corner_fraction=config.corner_fraction)
    if config.stain_normalize:
        out = reinhard_normalize(out, reference, corner_fraction=config.corner_fraction,
                                 lightness_threshold=config.stain_lightness_threshold)
    if config.flatten_background:
        out = flatten_background(out, level=config.background_level, corner_fraction=config.corner_fraction)
    if config.enhance:
        cells = foreground_mask(out, corner_fraction=config.corner_fraction) if config.clahe_cells_only else None
        out = clahe_lightness(out, clip_limit=config.clahe_clip_limit, tile_grid=config.clahe_tile_grid, cells=cells,
                              fill_level=config.background_level)
        out = multiscale_enhance(
            out,
            sigmas=config.multiscale_sigmas,
            weights=config.multiscale_weights,
            amount=config.multiscale_amount,
        )
    return out


def preprocess_field(
    rgb: np.ndarray, *, size: int, reference: StainReference, config: PreprocessConfig
) -> np.ndarray:
    """A decoded RGB field -> the ``(size, size, 3)`` uint8 field that the served ensemble takes."""
    return enhance_field(fit_field(rgb, size, max_aspect_ratio=config.max_aspect_ratio), reference, config)


def preprocess_bytes(
    data: bytes, *, size: int, reference: StainReference, config: PreprocessConfig
) -> tuple[np.ndarray, np.ndarray]:
    """Decode and preprocess an upload; returns ``(original_field, preprocessed_field)``, both uint8."""
    rgb = decode_image(data, max_pixels=config.max_pixels, min_side=config.min_side)
    original = fit_field(rgb, size, max_aspect_ratio=config.max_aspect_ratio)
    return original, enhance_field(original, reference, config)
