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
from preprocessing.pipeline import check_aspect_ratio
from preprocessing.scale import ScalePlan, fit_to_plan, plan_scale


@dataclass
class PreparedField:
    original: np.ndarray  # (S, S, 3) uint8, fitted to the model size
    display: np.ndarray  # (F, F, 3) uint8, fitted to the field size: what people see (web page, reports)
    preprocessed: np.ndarray  # (S, S, 3) uint8, what Triton receives
    qc: FieldQC
    source_shape: tuple[int, int]
    timings_ms: dict[str, float] = field(default_factory=dict)
    statistics: np.ndarray | None = None  # preprocessing.fieldstats of ``original``, for the OOD check
    scale: ScalePlan | None = None  # how the field was fitted, where the model knows its training scale


def _ms(start: float) -> float:
    return round((time.perf_counter() - start) * 1000.0, 2)


def prepare_array(rgb: np.ndarray, model: ServedModel, *, pixel_size_um: float | None = None) -> PreparedField:
    """Fit (at the training scale, see :func:`fit_original`), QC and preprocess a decoded RGB field."""
    started = time.perf_counter()
    original, scale = fit_original(rgb, model, pixel_size_um=pixel_size_um)
    return _finish(rgb, original, field_qc(original), model, started, scale)


def prepare_tile(rgb: np.ndarray, model: ServedModel, *, pixel_size_um: float | None = None) -> PreparedField | None:
    """:func:`prepare_array` for a slide tile; ``None``, with no preprocessing spent, when the QC finds it empty."""
    started = time.perf_counter()
    original, scale = fit_original(rgb, model, pixel_size_um=pixel_size_um)
    qc = field_qc(original)
    return None if qc.empty else _finish(rgb, original, qc, model, started, scale)


def fit_original(rgb: np.ndarray, model: ServedModel, *, pixel_size_um: float | None = None
                 ) -> tuple[np.ndarray, ScalePlan | None]:
    """The field at the model's size, and the scale plan behind it.

    A model that records its training fields' red-cell size (``manifest.ood.red_cell_diameter``) fits
    each field so that its red cells come out that size: from ``pixel_size_um`` when the caller knows
    it, else by measuring them (:func:`preprocessing.scale.plan_scale`). Without it, or when the plan
    keeps the plain fit, the short side is fitted to the model's size as always.
    """
    check = model.manifest.ood
    if check is None or check.red_cell_diameter is None:
        return fit_field(rgb, model.image_size, max_aspect_ratio=model.preprocess.max_aspect_ratio), None
    check_aspect_ratio(rgb, model.preprocess.max_aspect_ratio)
    scale = plan_scale(rgb, model.field_size, check.red_cell_diameter, pixel_size_um=pixel_size_um)
    return _fit(rgb, model.image_size, model, scale), scale


def _fit(rgb: np.ndarray, size: int, model: ServedModel, scale: ScalePlan | None) -> np.ndarray:
    return fit_to_plan(rgb, size, scale, field_size=model.field_size,
                       max_aspect_ratio=model.preprocess.max_aspect_ratio)


def _finish(rgb: np.ndarray, original: np.ndarray, qc: FieldQC, model: ServedModel, started: float,
            scale: ScalePlan | None = None) -> PreparedField:
    display = original if model.field_size == model.image_size else _fit(rgb, model.field_size, model, scale)
    preprocessed = enhance_field(original, model.reference, model.preprocess)
    statistics = field_statistics(original) if model.manifest.ood is not None else None
    return PreparedField(original, display, preprocessed, qc, rgb.shape[:2], {"preprocess": _ms(started)},
                         statistics, scale)


def prepare_bytes(data: bytes, model: ServedModel, *, pixel_size_um: float | None = None) -> PreparedField:
    """Decode and validate an upload, then :func:`prepare_array`; raises ``InvalidImageError``."""
    start = time.perf_counter()
    rgb = decode_image(data, max_pixels=model.preprocess.max_pixels, min_side=model.preprocess.min_side)
    decode_ms = _ms(start)
    prepared = prepare_array(rgb, model, pixel_size_um=pixel_size_um)
    prepared.timings_ms = {"decode": decode_ms, **prepared.timings_ms}
    return prepared


def out_of_distribution(model: ServedModel, statistics: np.ndarray | None, feature_score: np.ndarray | None
                        ) -> tuple[float | None, list[str]]:
    """``(score, review reasons)`` of a field under the manifest's out-of-distribution check.

    The score is the larger of the feature and acquisition scores, each divided by its threshold (so 1 is
    the boundary). ``None`` where the model has no check or a path could not supply its input.
    """
    check = model.manifest.ood
    if check is None or statistics is None or feature_score is None:
        return None, []
    centred = statistics.astype(np.float64) - np.asarray(check.statistics_mean)
    acquisition = float(((centred @ np.asarray(check.statistics_whitening)) ** 2).sum() / len(centred))
    features = float(np.asarray(feature_score).reshape(-1)[0])
    score = max(features / check.feature_threshold, acquisition / check.statistics_threshold)
    reasons = []
    if score > 1:
        reasons.append(f"out_of_distribution: score {score:.2f} (features {features / check.feature_threshold:.2f}, "
                       f"acquisition {acquisition / check.statistics_threshold:.2f}; over 1 is unlike the training "
                       "fields)")
    if check.scale_range is not None:
        blob = float(np.exp(statistics[STATISTICS.index("log_blob_scale")]))
        low, high = check.scale_range
        if not low <= blob <= high:
            reasons.append(f"scale_out_of_range: texture scale {blob:.1f} px, training fields {low:.1f}-{high:.1f} px "
                           "(another magnification, or not a smear field)")
    return round(score, 4), reasons


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
    ood_score, ood_reasons = out_of_distribution(model, prepared.statistics, output.ood_score)
    plan = prepared.scale
    if plan is not None and plan.reason:
        reasons.append(plan.reason)
        ood_reasons = [r for r in ood_reasons if not r.startswith("scale_")]  # one scale reason is enough
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
        scale=None if plan is None or plan.diameter is None else round(plan.diameter, 2),
        pixel_size_um=None if plan is None or plan.pixel_size_um is None else round(plan.pixel_size_um, 4),
        rescaled_by=None if plan is None or plan.rescaled_by is None else round(plan.rescaled_by, 4),
        qc=FieldQCResult(**prepared.qc.to_dict()),
        model_version=model.model_version,
        timings_ms=timings,
    )
