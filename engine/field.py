"""One field through the served model: prepare it on the CPU, interpret Triton's answer.

Shared by the REST gateway, ``hybridcn classify``, batch jobs and ``hybridcn evaluate``, so every
path reports the same class, confidence, review flag and cell count for the same field.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from engine.model import ServedModel
from export.runtime import EnsembleOutput
from hybridcn.contracts import Cell, FieldQCResult, FieldResult
from preprocessing import (
    FieldQC,
    decode_image,
    enhance_field,
    field_qc,
    fit_field,
    split_cells,
)
from preprocessing.fieldstats import STATISTICS, field_statistics


@dataclass
class PreparedField:
    original: np.ndarray  # (S, S, 3) uint8, fitted to the model size
    display: np.ndarray  # (F, F, 3) uint8, fitted to the field size: what people see (web page, reports)
    preprocessed: np.ndarray  # (S, S, 3) uint8, what Triton receives
    qc: FieldQC
    source_shape: tuple[int, int]
    timings_ms: dict[str, float] = field(default_factory=dict)
    statistics: np.ndarray | None = None  # preprocessing.fieldstats of ``original``, for the OOD check


def _ms(start: float) -> float:
    return round((time.perf_counter() - start) * 1000.0, 2)


def prepare_array(rgb: np.ndarray, model: ServedModel) -> PreparedField:
    """Fit, QC and preprocess an already decoded RGB field."""
    started = time.perf_counter()
    original = fit_field(rgb, model.image_size, max_aspect_ratio=model.preprocess.max_aspect_ratio)
    return _finish(rgb, original, field_qc(original), model, started)


def prepare_tile(rgb: np.ndarray, model: ServedModel) -> PreparedField | None:
    """:func:`prepare_array` for a slide tile; ``None``, with no preprocessing spent, when the QC finds it empty."""
    started = time.perf_counter()
    original = fit_field(rgb, model.image_size, max_aspect_ratio=model.preprocess.max_aspect_ratio)
    qc = field_qc(original)
    return None if qc.empty else _finish(rgb, original, qc, model, started)


def _finish(rgb: np.ndarray, original: np.ndarray, qc: FieldQC, model: ServedModel, started: float) -> PreparedField:
    display = original if model.field_size == model.image_size else fit_field(
        rgb, model.field_size, max_aspect_ratio=model.preprocess.max_aspect_ratio)
    preprocessed = enhance_field(original, model.reference, model.preprocess)
    statistics = field_statistics(original) if model.manifest.ood is not None else None
    return PreparedField(original, display, preprocessed, qc, rgb.shape[:2], {"preprocess": _ms(started)},
                         statistics)


def prepare_bytes(data: bytes, model: ServedModel) -> PreparedField:
    """Decode and validate an upload, then :func:`prepare_array`; raises ``InvalidImageError``."""
    start = time.perf_counter()
    rgb = decode_image(data, max_pixels=model.preprocess.max_pixels, min_side=model.preprocess.min_side)
    decode_ms = _ms(start)
    prepared = prepare_array(rgb, model)
    prepared.timings_ms = {"decode": decode_ms, **prepared.timings_ms}
    return prepared


def out_of_distribution(model: ServedModel, statistics: np.ndarray | None, feature_score: np.ndarray | None
                        ) -> tuple[float | None, float | None, list[str]]:
    """``(score, blob radius, review reasons)`` of a field under the manifest's out-of-distribution check.

    The score is the larger of the feature and acquisition scores, each divided by its threshold (so 1 is
    the boundary). ``None`` where the model has no check or a path could not supply its input.
    """
    check = model.manifest.ood
    if check is None or statistics is None or feature_score is None:
        return None, None, []
    centred = statistics.astype(np.float64) - np.asarray(check.statistics_mean)
    acquisition = float(((centred @ np.asarray(check.statistics_whitening)) ** 2).sum() / len(centred))
    features = float(np.asarray(feature_score).reshape(-1)[0])
    score = max(features / check.feature_threshold, acquisition / check.statistics_threshold)
    blob = float(np.exp(statistics[STATISTICS.index("log_blob_scale")]))
    reasons = []
    if score > 1:
        reasons.append(f"out_of_distribution: score {score:.2f} (features {features / check.feature_threshold:.2f}, "
                       f"acquisition {acquisition / check.statistics_threshold:.2f}; over 1 is unlike the training "
                       "fields)")
    low, high = check.scale_range
    if not low <= blob <= high:
        reasons.append(f"scale_out_of_range: cell scale {blob:.1f} px, training fields {low:.1f}-{high:.1f} px "
                       "(another magnification, or not a smear field)")
    return round(score, 4), round(blob, 3), reasons


def interpret(prepared: PreparedField, output: EnsembleOutput, model: ServedModel,
              timings_ms: dict[str, float] | None = None) -> FieldResult:
    """Class, confidence, review decision and watershed cell count for one field's ensemble output."""
    start = time.perf_counter()
    probabilities = output.probabilities[0].astype(float)
    best = int(np.argmax(probabilities))
    confidence = float(probabilities[best])
    _, cells = split_cells(output.mask[0])
    scale = model.field_size / model.image_size  # cells are reported in field pixels
    reasons = []
    if confidence < model.review_threshold:
        reasons.append(f"confidence {confidence:.4f} below review threshold {model.review_threshold:.4f}")
    reasons += [f"field QC: {flag}" for flag in prepared.qc.flags]
    if not cells:
        reasons.append("no cells segmented")
    ood_score, blob, ood_reasons = out_of_distribution(model, prepared.statistics, output.ood_score)
    reasons += ood_reasons
    timings = {**prepared.timings_ms, **(timings_ms or {}), "postprocess": _ms(start)}
    return FieldResult(
        label=model.classes[best],
        probabilities={name: round(float(p), 6) for name, p in zip(model.classes, probabilities, strict=True)},
        confidence=round(confidence, 6),
        needs_review=bool(reasons),
        review_reasons=reasons,
        review_threshold=model.review_threshold,
        cell_count=len(cells),
        cells=[Cell(bbox=[round(v * scale) for v in c.bbox], area=round(c.area * scale * scale),
                    centroid=[round(v * scale, 1) for v in c.centroid]) for c in cells],
        ood_score=ood_score,
        scale=blob,
        qc=FieldQCResult(**prepared.qc.to_dict()),
        model_version=model.model_version,
        timings_ms=timings,
    )
