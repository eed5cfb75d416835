"""``hybridcn evaluate``: score the served model on any labelled folder, with the artifacts Triton serves.

Each file goes through the gateway's own preparation (decode, fit, QC, Reinhard, CLAHE, multiscale),
then through the three ONNX graphs of the repository: in-process on ONNX Runtime by default, or
through a running Triton (``triton="HOST:PORT"``). Unreadable files are listed, not scored.
``hybridcn evaluate --binary`` scores benign against malignant on folders labelled that way
(:func:`evaluate_binary_folder`).
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from engine.client import TritonClient
from engine.field import prepare_array, prepare_bytes
from engine.model import ServedModel
from export.runtime import EnsembleOutput, OnnxEnsemble
from preprocessing import InvalidImageError, decode_image
from preprocessing.shifts import SHIFTS, shift_field
from training.data import BINARY_NAMES, DataLayoutError, find_binary_samples, find_samples
from training.metrics import (
    binary_metrics,
    bootstrap_intervals,
    classification_metrics,
    error_detection_auroc,
    expected_calibration_error,
)


def _prepare(path: Path, model: ServedModel):
    try:
        return prepare_bytes(path.read_bytes(), model).preprocessed, None
    except (InvalidImageError, OSError) as error:
        return None, str(error)


def _infer_all(fields: np.ndarray, repository: Path, triton: str | None, batch: int = 16) -> EnsembleOutput:
    if triton:
        client = TritonClient(triton)
        futures = [client.submit(fields[i : i + batch]) for i in range(0, len(fields), batch)]
        parts = [future.result() for future in futures]
        client.close()
    else:
        ensemble = OnnxEnsemble(repository)
        parts = [ensemble.infer(fields[i : i + batch]) for i in range(0, len(fields), batch)]
    return EnsembleOutput.concatenate(parts)


def _shifted(path: Path, model: ServedModel, kind: str, seed: int, index: int) -> np.ndarray:
    rgb = decode_image(path.read_bytes(), max_pixels=model.preprocess.max_pixels, min_side=model.preprocess.min_side)
    return prepare_array(shift_field(rgb, kind, seed=seed, field=index)[0], model).preprocessed


def _triage(labels: np.ndarray, probabilities: np.ndarray, threshold: float) -> dict:
    """Accuracy, calibration and how well the review threshold separates right from wrong."""
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == labels
    accepted = confidence >= threshold
    return {
        "accuracy": float(correct.mean()),
        "ece": float(expected_calibration_error(labels, probabilities)),
        "error_detection_auroc": float(error_detection_auroc(labels, probabilities)),
        "fraction_to_review": float(1 - accepted.mean()),
        "accuracy_of_auto_accepted": float(correct[accepted].mean()) if accepted.any() else None,
        "wrong_and_not_flagged": int((~correct & accepted).sum()),
    }


def shift_benchmark(samples: list, kept: list[int], labels: np.ndarray, clean: dict, model: ServedModel,
                    repository: Path, triton: str | None, seed: int, log=print) -> dict:
    """Accuracy and triage per shift kind (``preprocessing.shifts``), and the drop against the clean fields."""
    results = {}
    for kind in SHIFTS:
        started = time.perf_counter()
        with ThreadPoolExecutor() as pool:
            fields = np.stack(list(pool.map(lambda i, k=kind: _shifted(samples[i].path, model, k, seed, i), kept)))
        probabilities = _infer_all(fields, repository, triton).probabilities.astype(np.float64)
        row = _triage(labels, probabilities, model.review_threshold)
        row["accuracy_drop_points"] = round(100 * (clean["accuracy"] - row["accuracy"]), 2)
        results[kind] = row
        log(f"shift {kind:<17} accuracy {row['accuracy']:.4f} (drop {row['accuracy_drop_points']:+.2f} points) "
            f"to review {row['fraction_to_review']:.3f} wrong-unflagged {row['wrong_and_not_flagged']} "
            f"({time.perf_counter() - started:.0f}s)")
    return {"seed": seed, "clean": clean, "kinds": results,
            "worst_drop_points": max(r["accuracy_drop_points"] for r in results.values())}


def _score(paths: list[Path], data: Path, model: ServedModel, repository: Path, triton: str | None,
           log) -> tuple[list[int], list[dict], np.ndarray]:
    """``(kept, errors, probabilities)``: the indices of the readable files, the others' errors, the model's
    class probabilities of the readable ones (float64, in ``model.classes`` order)."""
    log(f"evaluating {model.model_version} on {len(paths)} fields from {data} "
        f"({'Triton ' + triton if triton else 'in-process ONNX Runtime'})")
    with ThreadPoolExecutor() as pool:
        prepared = list(pool.map(lambda p: _prepare(p, model), paths))
    errors = [{"path": str(p), "error": error} for p, (_, error) in zip(paths, prepared, strict=True) if error]
    kept = [i for i, (field, _) in enumerate(prepared) if field is not None]
    if not kept:
        raise DataLayoutError(f"no readable fields in {data}")
    output = _infer_all(np.stack([prepared[i][0] for i in kept]), repository, triton)
    return kept, errors, output.probabilities.astype(np.float64)


def evaluate_folder(data: Path, repository: Path, *, triton: str | None = None, shift_seed: int | None = None,
                    log=print) -> dict:
    """Metrics of the served model on ``data`` (contract: n, accuracy, balanced_accuracy, macro_auc, mcc,
    per_class, confusion), plus bootstrap intervals, review statistics, errors and per-file predictions.

    ``shift_seed``: also run the shift benchmark (every field under each stain/camera shift, amounts
    seeded per field) and report accuracy and triage per kind under ``shifts``.
    """
    started = time.perf_counter()
    model = ServedModel.from_repository(repository)
    samples = find_samples(data)
    kept, errors, probabilities = _score([s.path for s in samples], data, model, repository, triton, log)
    labels = np.array([samples[i].label for i in kept])
    result = classification_metrics(labels, probabilities)
    if len(np.unique(labels)) == probabilities.shape[1]:
        result["intervals_95"] = bootstrap_intervals(labels, probabilities, rounds=500)
    result["triage"] = _triage(labels, probabilities, model.review_threshold)
    result["review"] = {"threshold": model.review_threshold,
                        **{k: result["triage"][k] for k in ("fraction_to_review", "accuracy_of_auto_accepted")}}
    result.update({
        **_provenance(model, data, triton, errors, started),
        "predictions": [
            {"path": str(samples[i].path), "label": samples[i].class_name,
             "predicted": model.classes[int(np.argmax(p))], "confidence": round(float(np.max(p)), 6)}
            for i, p in zip(kept, probabilities, strict=True)
        ],
    })
    _print_summary(result, model.classes, log)
    if shift_seed is not None:
        result["shifts"] = shift_benchmark(samples, kept, labels, result["triage"], model, repository, triton,
                                           shift_seed, log)
    return result


def _provenance(model: ServedModel, data: Path, triton: str | None, errors: list, started: float) -> dict:
    """What was scored, how, and what could not be read: the same keys in every evaluation report."""
    return {"model_version": model.model_version, "data": str(data),
            "backend": f"triton {triton}" if triton else "onnxruntime in-process", "errors": errors,
            "seconds": round(time.perf_counter() - started, 1)}


def evaluate_binary_folder(data: Path, repository: Path, *, triton: str | None = None, log=print) -> dict:
    """Benign-vs-malignant metrics of the served model on ``data`` (``Benign/`` and ``Malignant/`` folders,
    or the four classes read as two): n, accuracy, balanced_accuracy, auc, mcc, sensitivity, specificity,
    confusion (2 x 2, benign first), plus errors and per-file predictions.

    The model stays four-class: ``P(malignant) = 1 - P(Benign)``, the sum of the three subtypes, which
    is what a benign/malignant reading of a field needs; the call is ``P(malignant) >= 0.5``, so a field
    whose most likely class is Benign can still be called malignant when the subtypes together outweigh it.
    """
    started = time.perf_counter()
    model = ServedModel.from_repository(repository)
    if BINARY_NAMES[0] not in model.classes:
        raise DataLayoutError(f"model {model.model_version} has no {BINARY_NAMES[0]} class ({model.classes}); "
                              "a benign-vs-malignant score needs one")
    benign = model.classes.index(BINARY_NAMES[0])
    samples = find_binary_samples(data)
    kept, errors, probabilities = _score([path for path, _ in samples], data, model, repository, triton, log)
    labels = np.array([samples[i][1] for i in kept])
    p_malignant = 1.0 - probabilities[:, benign]
    result = binary_metrics(labels, p_malignant)
    result.update({
        "classes": list(BINARY_NAMES),
        "malignant_classes": [name for name in model.classes if name != BINARY_NAMES[0]],
        **_provenance(model, data, triton, errors, started),
        "predictions": [
            {"path": str(samples[i][0]), "label": BINARY_NAMES[samples[i][1]],
             "predicted": BINARY_NAMES[int(p >= result["threshold"])], "p_malignant": round(float(p), 6),
             "predicted_class": model.classes[int(np.argmax(row))]}
            for i, p, row in zip(kept, p_malignant, probabilities, strict=True)
        ],
    })
    _print_binary_summary(result, log)
    return result


def _print_binary_summary(result: dict, log) -> None:
    def value(key: str) -> str:
        return "n/a" if result[key] is None else f"{result[key]:.4f}"

    log(f"sensitivity (malignant called malignant) {value('sensitivity')}, "
        f"specificity (benign called benign) {value('specificity')}")
    log("confusion (rows = truth, columns = called, order " + ", ".join(result["classes"]) + "):")
    for name, row in zip(result["classes"], result["confusion"], strict=True):
        log(f"  {name:<10} " + " ".join(f"{v:>5}" for v in row))
    if result["errors"]:
        log(f"{len(result['errors'])} files could not be read (listed under 'errors')")


def _print_summary(result: dict, classes: tuple[str, ...], log) -> None:
    log(f"{'class':<8} {'n':>5} {'sensitivity':>12} {'specificity':>12}")
    for name in classes:
        row = result["per_class"][name]
        log(f"{name:<8} {row['n']:>5} {row['sensitivity']:>12.4f} {row['specificity']:>12.4f}")
    log("confusion (rows = truth, columns = predicted, order " + ", ".join(classes) + "):")
    for name, row in zip(classes, result["confusion"], strict=True):
        log(f"  {name:<8} " + " ".join(f"{v:>5}" for v in row))
    if result["errors"]:
        log(f"{len(result['errors'])} files could not be read (listed under 'errors')")
