"""Field quality control: flags a field that is empty, blurred or over-exposed before it is classified."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import cv2
import numpy as np

from preprocessing.stain import chroma_exceeds, corner_box


@dataclass(frozen=True)
class QCThresholds:
    """Limits set on the Taleqani development fields (all usable smears): at these values under 0.5% of
    them are flagged. Bright backgrounds are normal there (median 2%, p99 34% of pixels >= 250)."""

    min_stained_fraction: float = 0.01
    min_sharpness: float = 15.0
    max_saturated_fraction: float = 0.6
    corner_fraction: tuple[float, float] = (0.12, 0.3)


@dataclass(frozen=True)
class FieldQC:
    empty: bool
    blurred: bool
    overexposed: bool
    stained_fraction: float
    sharpness: float
    saturated_fraction: float

    @property
    def flags(self) -> list[str]:
        return [name for name in ("empty", "blurred", "overexposed") if getattr(self, name)]

    @property
    def ok(self) -> bool:
        return not self.flags

    def to_dict(self) -> dict[str, object]:
        return {**asdict(self), "flags": self.flags}


def field_qc(rgb: np.ndarray, thresholds: QCThresholds | None = None) -> FieldQC:
    """Measure a field and flag it.

    - stained fraction: pixels with chroma > 25 in L*a*b* (smear stains are strongly coloured;
      empty glass and background are not);
    - sharpness: variance of the Laplacian of the gray image (Pech-Pacheco et al., ICPR 2000);
    - saturation: share of pixels with all channels >= 250.
    The scale-bar box is left out of every measure.
    """
    thresholds = thresholds or QCThresholds()
    valid = np.ones(rgb.shape[:2], dtype=bool)
    rows, cols = corner_box(rgb.shape, corner_fraction=thresholds.corner_fraction)
    valid[rows, cols] = False
    stained = float(chroma_exceeds(cv2.cvtColor(rgb, cv2.COLOR_RGB2LAB), 25)[valid].mean())
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    sharpness = float(cv2.Laplacian(gray, cv2.CV_32F)[valid].var())
    darkest = cv2.min(cv2.min(rgb[..., 0], rgb[..., 1]), rgb[..., 2])  # per-pixel channel minimum
    saturated = float((darkest[valid] >= 250).mean())
    return FieldQC(
        empty=stained < thresholds.min_stained_fraction,
        blurred=sharpness < thresholds.min_sharpness,
        overexposed=saturated > thresholds.max_saturated_fraction,
        stained_fraction=round(stained, 4),
        sharpness=round(sharpness, 2),
        saturated_fraction=round(saturated, 4),
    )
