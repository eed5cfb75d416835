"""Shift benchmark and confidence quality of one block-CV fold model on its held-out fields.

    .venv/bin/python research/shift_fold.py --data DATA --study runs/stainaug --fold 0 --out runs/stainaug/shift.json

Loads ``STUDY/cv/models/block_fold{F}_full.pt`` (written by ``hybridcn study`` or
``research/cpu_fold_experiment.py``), reads the fold's held-out fields from DATA at their own 224 px,
and scores them as they are and under each seeded shift of ``preprocessing.shifts`` (the same shifts
as ``hybridcn evaluate --shift``, applied before the field is fitted to the model's size). Per kind:
accuracy and its drop, and the expected calibration error, the error-detection AUROC and the share
sent to review at the threshold that keeps auto-accepted clean fields 99.5% right. The temperature and
that threshold are cross-fitted inside the fold, leaving one block (a patient stand-in) out at a time:
each block is scored with the temperature and threshold fitted on the fold's other blocks' clean fields,
so no field is scored by a calibration fitted on it (halves of the fold were tried first: a half with
no error fits a degenerate temperature). The error-detection AUROC is also given for the uncalibrated
confidence, which a temperature does not reorder. Prints and writes JSON. About a minute on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from preprocessing import fit_field  # noqa: E402
from preprocessing.shifts import SHIFTS, shift_field  # noqa: E402
from training.data import block_folds, block_groups, find_samples, read_rgb  # noqa: E402
from training.metrics import (  # noqa: E402
    error_detection_auroc,
    expected_calibration_error,
    fit_temperature,
    review_threshold,
    softmax,
)
from training.pipeline import TrainOptions, load_trained, predict  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--study", required=True)
    parser.add_argument("--fold", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0, help="shift seed")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    model = load_trained(Path(args.study) / "cv" / "models" / f"block_fold{args.fold}_full.pt")
    samples = find_samples(args.data)
    held = np.nonzero(block_folds(samples) == args.fold)[0]
    labels = np.array([samples[i].label for i in held])
    originals = [read_rgb(samples[i].path) for i in held]
    size = model.profile.image_size
    options = TrainOptions(device="cpu", progress=False, workers=1, batch_size=32)

    def logits_of(fields: list[np.ndarray]) -> np.ndarray:
        return predict(model, np.stack([fit_field(f, size) for f in fields]), options)["logits"]

    clean = logits_of(originals).astype(np.float64)  # float64: a sharpening temperature must not tie at 1.0
    blocks = block_groups(samples)[held]
    calibrations = []
    for block in np.unique(blocks):
        scored = blocks == block
        fitted_on = ~scored
        temperature = fit_temperature(labels[fitted_on], clean[fitted_on])
        threshold = review_threshold(labels[fitted_on], softmax(clean[fitted_on] / temperature))["threshold"]
        calibrations.append((scored, temperature, threshold))

    def calibrated(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        probabilities, thresholds = np.empty_like(logits), np.empty(len(logits))
        for scored, temperature, threshold in calibrations:
            probabilities[scored] = softmax(logits[scored] / temperature)
            thresholds[scored] = threshold
        return probabilities, thresholds

    rows = {}
    for kind in ("none", *SHIFTS):
        logits = clean if kind == "none" else np.float64(1) * logits_of(
            [shift_field(f, kind, seed=args.seed, field=int(i))[0] for f, i in zip(originals, held, strict=True)])
        probabilities, thresholds = calibrated(logits)
        confidence, correct = probabilities.max(axis=1), probabilities.argmax(axis=1) == labels
        accepted = confidence >= thresholds
        rows[kind] = {
            "accuracy": float(correct.mean()),
            "ece": expected_calibration_error(labels, probabilities),
            "error_auroc": error_detection_auroc(labels, probabilities),
            "error_auroc_uncalibrated": error_detection_auroc(labels, softmax(logits)),
            "review_share": float(1 - accepted.mean()),
            "accepted_accuracy": float(correct[accepted].mean()) if accepted.any() else float("nan"),
            "wrong_unflagged": int((~correct & accepted).sum()),
        }
        row = rows[kind]
        print(f"{kind:<17} acc {row['accuracy']:.4f} drop {100 * (rows['none']['accuracy'] - row['accuracy']):+.2f} "
              f"ece {row['ece']:.4f} auroc {row['error_auroc']:.3f} ({row['error_auroc_uncalibrated']:.3f} at T=1) "
              f"review {row['review_share']:.3f} "
              f"accepted {row['accepted_accuracy']:.4f} wrong-unflagged {row['wrong_unflagged']}", flush=True)
    report = {"study": args.study, "fold": args.fold, "n": len(held), "shift_seed": args.seed,
              "calibration": [{"fields": int(scored.sum()), "temperature": temperature, "review_threshold": threshold}
                              for scored, temperature, threshold in calibrations], "kinds": rows}
    Path(args.out).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
