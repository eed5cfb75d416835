"""Would another confidence score, or one review threshold per predicted class, send fewer fields to review?

    .venv/bin/python research/triage_scores.py --study research/trials/trial-head-no-smoothing/study \
        --variant head_label_smoothing

Leave-one-fold-out on a study's out-of-fold logits, as the served threshold is judged: each fold gets the
temperature (Guo et al. 2017) and the threshold(s) fitted on the other folds for 99.5% precision among
accepted fields, and the table gives the share sent to review and the precision reached on the fold left
out, pooled. Scores: the calibrated top probability (served), its margin over the runner-up, and minus
the entropy. Per-class thresholds are the prefixes of each predicted class's fields, most confident
first, that accept the most fields overall at the target precision (a Lagrangian sweep over the price of
an error).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from training.calibration import TARGET_PRECISION, fit_temperature  # noqa: E402
from training.metrics import precision_cutoff, softmax  # noqa: E402


def score(logits: np.ndarray, temperature: float, kind: str) -> np.ndarray:
    p = softmax(logits / temperature)
    top = np.sort(p, axis=1)
    if kind == "top probability":
        return top[:, -1]
    if kind == "margin":
        return top[:, -1] - top[:, -2]
    return (p * np.log(np.clip(p, 1e-12, None))).sum(axis=1)  # minus the entropy


def cutoffs(scores: np.ndarray, predicted: np.ndarray, correct: np.ndarray, per_class: bool) -> dict[int, float]:
    """Lowest accepted score per predicted class, or under ``-1`` one shared value (the served rule: the
    largest most-confident prefix that meets the target precision)."""
    if not per_class:
        cutoff = precision_cutoff(scores, correct, TARGET_PRECISION)
        return {-1: np.inf if cutoff is None else cutoff}
    groups = np.unique(predicted)
    best: tuple[int, dict[int, float]] | None = None
    for price in np.geomspace(1e-3, 1.0, 300):  # accepted fields an error is worth
        chosen: dict[int, float] = {}
        accepted = np.zeros(len(scores), bool)
        for group in groups:
            member = predicted == group
            order = np.argsort(-scores[member])
            value = price * np.arange(1, member.sum() + 1) - np.cumsum(~correct[member][order])
            keep = int(np.argmax(np.r_[0.0, value]))
            chosen[int(group)] = float(scores[member][order][keep - 1]) if keep else np.inf
            accepted |= member & (scores >= chosen[int(group)])
        meets = accepted.any() and correct[accepted].mean() >= TARGET_PRECISION
        if meets and (best is None or accepted.sum() > best[0]):
            best = (int(accepted.sum()), chosen)
    return best[1] if best else {int(group): np.inf for group in groups}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", required=True, help="a study folder or an archived one (its cv/cv_block.json)")
    parser.add_argument("--variant", default="full")
    args = parser.parse_args()
    cv = json.loads((Path(args.study) / "cv" / "cv_block.json").read_text())
    labels = np.asarray(cv["labels"])
    entries = [(int(fold), v[args.variant]) for fold, v in cv["folds"].items() if args.variant in v]
    fold_ids = np.concatenate([np.full(len(e["index"]), fold) for fold, e in entries])
    logits = np.concatenate([np.asarray(e["logits"], np.float64) for _, e in entries])
    truth = labels[np.concatenate([e["index"] for _, e in entries])]
    predicted = logits.argmax(axis=1)
    correct = predicted == truth
    print(f"{len(truth)} fields, {len(entries)} folds, accuracy {correct.mean():.2%}")
    for kind in ("top probability", "margin", "minus entropy"):
        for per_class in (False, True):
            accepted = np.zeros(len(truth), bool)
            for fold in np.unique(fold_ids):
                train, test = fold_ids != fold, fold_ids == fold
                temperature = fit_temperature(truth[train], logits[train])
                cut = cutoffs(score(logits[train], temperature, kind), predicted[train], correct[train], per_class)
                scores = score(logits[test], temperature, kind)
                limit = np.array([cut.get(int(c), np.inf) if per_class else cut[-1] for c in predicted[test]])
                accepted[test] = scores >= limit
            print(f"{kind:<16} {'per class' if per_class else 'one threshold':<14} sent to review "
                  f"{1 - accepted.mean():6.1%}   accepted right {correct[accepted].mean():.2%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
