"""Temperature and review threshold of the full model, fitted on its out-of-fold logits, and the file export reads.

``hybridcn report`` fits them (:func:`fit_calibration`) and writes ``final/calibration.json``
(:func:`write_calibration`); ``hybridcn export --calibration`` folds the temperature into the head and
copies the threshold and the out-of-fold metrics into the manifest. Writing that file lives here, apart
from the report's tables and plots, so what export consumes is defined in one place.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from training.metrics import expected_calibration_error, fit_temperature, review_threshold, softmax

#: Precision the auto-accepted fields must reach; fields below the threshold it implies go to review.
TARGET_PRECISION = 0.995


@dataclass(frozen=True)
class Calibration:
    """What temperature scaling and the review threshold do to one set of out-of-fold predictions."""

    temperature: float
    review: dict  # review_threshold's result: threshold, review_fraction, accepted_precision, ...
    ece_before: float
    ece_after: float
    probabilities: np.ndarray  # softmax(logits / temperature)


def fit_calibration(labels: np.ndarray, logits: np.ndarray) -> Calibration:
    """Fit T on the logits (Guo et al. 2017), then the review threshold on the calibrated probabilities.

    Fitted and scored on the same data, so the ECE after is optimistic; :func:`crossfit_calibration`
    gives the honest figure.
    """
    temperature = fit_temperature(labels, logits)
    calibrated = softmax(logits / temperature)
    return Calibration(
        temperature=temperature,
        review=review_threshold(labels, calibrated, target_precision=TARGET_PRECISION),
        ece_before=expected_calibration_error(labels, softmax(logits)),
        ece_after=expected_calibration_error(labels, calibrated),
        probabilities=calibrated,
    )


def crossfit_calibration(labels: np.ndarray, logits: np.ndarray, fold_ids: np.ndarray) -> dict | None:
    """Leave-one-fold-out temperature and review threshold, scored on the fold left out.

    The headline temperature is fitted on the same OOF data it is judged on, which flatters it; this
    fits on the other folds only, so the ECE and precision here are what a new fold would see.
    """
    folds = np.unique(fold_ids)
    if len(folds) < 2:
        return None
    calibrated = np.empty_like(logits)
    accepted = np.zeros(len(labels), bool)
    for fold in folds:
        test = fold_ids == fold
        temperature = fit_temperature(labels[~test], logits[~test])
        train_probabilities = softmax(logits[~test] / temperature)
        threshold = review_threshold(labels[~test], train_probabilities, target_precision=TARGET_PRECISION)
        calibrated[test] = logits[test] / temperature
        accepted[test] = softmax(calibrated[test]).max(axis=1) >= threshold["threshold"]
    probabilities = softmax(calibrated)
    correct = probabilities.argmax(axis=1) == labels
    return {
        "ece": expected_calibration_error(labels, probabilities),
        "accepted_precision": float(correct[accepted].mean()) if accepted.any() else float("nan"),
        "review_fraction": float(1 - accepted.mean()),
    }


def crossfit_scores(labels: np.ndarray, logits: np.ndarray, groups: np.ndarray, scored: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray]:
    """``scored`` logits (the same fields, e.g. under a stain shift) calibrated group by group.

    Each group (a fold, or a block within one fold) gets the temperature and review threshold fitted on
    the other groups' clean ``logits``, as :func:`crossfit_calibration` does; returns the calibrated
    probabilities and whether each field is accepted (not sent to review).
    """
    probabilities = np.empty_like(scored, dtype=np.float64)
    accepted = np.zeros(len(labels), bool)
    for group in np.unique(groups):
        test = groups == group
        temperature = fit_temperature(labels[~test], logits[~test])
        threshold = review_threshold(labels[~test], softmax(logits[~test] / temperature),
                                     target_precision=TARGET_PRECISION)["threshold"]
        probabilities[test] = softmax(scored[test].astype(np.float64) / temperature)
        accepted[test] = probabilities[test].max(axis=1) >= threshold
    return probabilities, accepted


def json_safe(value: Any) -> Any:
    """JSON-safe copy: NaN becomes null (strict JSON has no NaN), numpy scalars become Python numbers."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_calibration(path: Path, calibration: Calibration, *, fitted_on: str, oof_metrics: dict) -> Path:
    """Write ``calibration.json`` for ``hybridcn export``: T, the review threshold and the OOF metrics.

    ``fitted_on`` says which predictions T came from; ``oof_metrics`` goes into the manifest unchanged, so
    the served model carries the numbers it was judged by.
    """
    review = calibration.review
    data = {
        "temperature": calibration.temperature,
        "review_threshold": review["threshold"],
        "target_precision": TARGET_PRECISION,
        "review_fraction": review["review_fraction"],
        "accepted_precision": review["accepted_precision"],
        "ece_before": calibration.ece_before,
        "ece_after": calibration.ece_after,
        "fitted_on": fitted_on,
        "oof_metrics": oof_metrics,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(json_safe(data), indent=2))
    return path
