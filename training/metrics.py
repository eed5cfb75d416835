"""Classification metrics with bootstrap intervals, calibration (ECE, temperature) and the review threshold."""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize_scalar
from sklearn.metrics import balanced_accuracy_score, confusion_matrix, matthews_corrcoef, roc_auc_score

from hybridcn.profiles import CLASS_NAMES


def classification_metrics(labels: np.ndarray, probabilities: np.ndarray) -> dict:
    """Accuracy, balanced accuracy, macro one-vs-rest AUC, MCC, per-class sensitivity/specificity, confusion."""
    labels = np.asarray(labels)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    predicted = probabilities.argmax(axis=1)
    classes = list(range(probabilities.shape[1]))
    confusion = confusion_matrix(labels, predicted, labels=classes)
    per_class = {}
    for c in classes:
        tp = confusion[c, c]
        fn = confusion[c].sum() - tp
        fp = confusion[:, c].sum() - tp
        tn = confusion.sum() - tp - fn - fp
        per_class[CLASS_NAMES[c]] = {
            "n": int(confusion[c].sum()),
            "sensitivity": float(tp / max(tp + fn, 1)),
            "specificity": float(tn / max(tn + fp, 1)),
        }
    present = np.unique(labels)
    try:
        auc = float(roc_auc_score(labels, probabilities, multi_class="ovr", average="macro", labels=classes)) \
            if len(present) == len(classes) else float("nan")
    except ValueError:
        auc = float("nan")
    return {
        "n": int(len(labels)),
        "accuracy": float((predicted == labels).mean()),
        "balanced_accuracy": float(balanced_accuracy_score(labels, predicted)),
        "macro_auc": auc,
        "mcc": float(matthews_corrcoef(labels, predicted)),
        "per_class": per_class,
        "confusion": confusion.tolist(),
    }


def binary_metrics(labels: np.ndarray, p_positive: np.ndarray, *, threshold: float = 0.5) -> dict:
    """Benign (0) vs malignant (1) scores of ``P(malignant)``: the positive call is ``p >= threshold``.

    Sensitivity is the malignant fields called malignant; ``confusion`` rows are the truth, columns the
    call, both in the order benign, malignant. ``auc`` is ``None`` when the fields hold one side only.
    """
    labels = np.asarray(labels).astype(np.int64)
    p_positive = np.asarray(p_positive, dtype=np.float64)
    predicted = (p_positive >= threshold).astype(np.int64)
    confusion = confusion_matrix(labels, predicted, labels=[0, 1])
    (tn, fp), (fn, tp) = confusion.tolist()
    both = len(np.unique(labels)) == 2
    return {
        "n": int(len(labels)),
        "accuracy": float((predicted == labels).mean()),
        "balanced_accuracy": float(balanced_accuracy_score(labels, predicted)) if both else None,
        "auc": float(roc_auc_score(labels, p_positive)) if both else None,
        "mcc": float(matthews_corrcoef(labels, predicted)),
        "sensitivity": float(tp / (tp + fn)) if tp + fn else None,
        "specificity": float(tn / (tn + fp)) if tn + fp else None,
        "confusion": confusion.tolist(),
        "threshold": threshold,
    }


def bootstrap_intervals(
    labels: np.ndarray, probabilities: np.ndarray, *, rounds: int = 1000, seed: int = 0,
    keys: tuple[str, ...] = ("accuracy", "balanced_accuracy", "macro_auc", "mcc"),
) -> dict[str, list[float]]:
    """Percentile 95% intervals over ``rounds`` resamples of the fields (with replacement)."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    values: dict[str, list[float]] = {k: [] for k in keys}
    for _ in range(rounds):
        sample = rng.integers(0, len(labels), len(labels))
        if len(np.unique(labels[sample])) < probabilities.shape[1]:
            continue
        predicted = probabilities[sample].argmax(axis=1)
        values["accuracy"].append(float((predicted == labels[sample]).mean()))
        if "balanced_accuracy" in values:
            values["balanced_accuracy"].append(float(balanced_accuracy_score(labels[sample], predicted)))
        if "macro_auc" in values:
            values["macro_auc"].append(float(roc_auc_score(labels[sample], probabilities[sample], multi_class="ovr")))
        if "mcc" in values:
            values["mcc"].append(float(matthews_corrcoef(labels[sample], predicted)))
    return {k: [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))] for k, v in values.items() if v}


def expected_calibration_error(labels: np.ndarray, probabilities: np.ndarray, *, bins: int = 15) -> float:
    """ECE of the top-class confidence (Guo et al., ICML 2017), equal-width bins."""
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == labels
    edges = np.linspace(0, 1, bins + 1)
    error = 0.0
    for low, high in zip(edges[:-1], edges[1:], strict=True):
        inside = (confidence > low) & (confidence <= high)
        if inside.any():
            error += inside.mean() * abs(correct[inside].mean() - confidence[inside].mean())
    return float(error)


def error_detection_auroc(labels: np.ndarray, probabilities: np.ndarray) -> float:
    """How well the top-class confidence ranks the model's own errors below its correct answers.

    The misclassification-detection measure of Hendrycks & Gimpel (ICLR 2017): the AUROC of the
    confidence for "correct" against "wrong". 1.0 puts every error below every correct field, 0.5 is
    chance. It summarises the ranking at every depth; a review threshold needs it good near its own
    operating point (the most confident ~90%), so read it next to the share sent to review. NaN when
    there is no error, or nothing correct, to rank.
    """
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == labels
    if correct.all() or not correct.any():
        return float("nan")
    return float(roc_auc_score(correct, confidence))


def reliability_curve(labels: np.ndarray, probabilities: np.ndarray, *, bins: int = 10) -> dict[str, list[float]]:
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == labels
    edges = np.linspace(0, 1, bins + 1)
    mids, accuracy, counts = [], [], []
    for low, high in zip(edges[:-1], edges[1:], strict=True):
        inside = (confidence > low) & (confidence <= high)
        if inside.any():
            mids.append(float(confidence[inside].mean()))
            accuracy.append(float(correct[inside].mean()))
            counts.append(int(inside.sum()))
    return {"confidence": mids, "accuracy": accuracy, "count": counts}


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def fit_temperature(labels: np.ndarray, logits: np.ndarray) -> float:
    """Temperature scaling (Guo et al. 2017): the T > 0 minimising the NLL of ``softmax(logits / T)``."""

    def nll(log_t: float) -> float:
        p = softmax(logits / np.exp(log_t))
        return float(-np.log(np.clip(p[np.arange(len(labels)), labels], 1e-12, None)).mean())

    result = minimize_scalar(nll, bounds=(-3, 3), method="bounded")
    return float(np.exp(result.x))


def precision_cutoff(scores: np.ndarray, correct: np.ndarray, target_precision: float) -> float | None:
    """Lowest score of the largest highest-scoring prefix whose share of ``correct`` meets the target, or
    ``None`` when no prefix does."""
    order = np.argsort(-scores)
    cumulative = np.cumsum(correct[order]) / np.arange(1, len(order) + 1)
    ok = np.nonzero(cumulative >= target_precision)[0]
    return float(scores[order][ok.max()]) if len(ok) else None


def review_threshold(labels: np.ndarray, probabilities: np.ndarray, *, target_precision: float = 0.995) -> dict:
    """Lowest confidence threshold at which auto-accepted fields (confidence >= t) are >= target precise."""
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == labels
    threshold = precision_cutoff(confidence, correct, target_precision)
    threshold = 1.0 if threshold is None else threshold
    accepted = confidence >= threshold
    return {
        "threshold": threshold,
        "target_precision": target_precision,
        "accepted_precision": float(correct[accepted].mean()) if accepted.any() else float("nan"),
        "review_fraction": float(1 - accepted.mean()),
    }
