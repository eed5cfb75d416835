"""Single-cell images as a lab would send them, through the served review (ONNX Runtime, CPU).

    .venv/bin/python research/single_cell_probe.py --data DATA --fields 400

Single-cell datasets show one white cell per image: cut tight, or with a rim of neighbours (ALL-IDB2's
257 px crops), at the camera's resolution or enlarged. For each field with a nucleated cell
(``preprocessing.probes.nucleated_cores``) this crops its largest one with margins of 1.3x, 2x and 3x
its core's size, sends each crop as is and enlarged to 257 px, and counts how often the whole served
review (confidence, field QC, out-of-distribution score, magnification) sends it to a person, and why.
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine.field import interpret, prepare_array  # noqa: E402
from engine.model import ServedModel  # noqa: E402
from export.runtime import OnnxEnsemble  # noqa: E402
from preprocessing import InvalidImageError  # noqa: E402
from preprocessing.probes import crop_around, nucleated_cores  # noqa: E402
from training.data import find_samples, read_rgb  # noqa: E402

REPOSITORY = ROOT / "model_repository"
VARIANTS = [(margin, size) for margin in (1.3, 2.0, 3.0) for size in (None, 257)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--fields", type=int, default=400, help="fields drawn at random (seed 0)")
    args = parser.parse_args()
    model = ServedModel.from_repository(REPOSITORY)
    ensemble = OnnxEnsemble(REPOSITORY, threads=2)
    samples = find_samples(args.data)
    chosen = np.random.default_rng(0).choice(len(samples), min(args.fields, len(samples)), replace=False)
    flagged: dict[str, list[bool]] = collections.defaultdict(list)
    reasons: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    labels: collections.Counter = collections.Counter()
    for index in chosen:
        rgb = read_rgb(samples[index].path)
        cores = nucleated_cores(rgb)
        if not len(cores):
            continue
        for margin, size in VARIANTS:
            name = f"margin {margin}x, {'as cropped' if size is None else f'{size} px'}"
            image = crop_around(rgb, cores[0], margin)
            if size is not None:
                image = cv2.resize(image, (size, size), interpolation=cv2.INTER_CUBIC)
            try:
                prepared = prepare_array(image, model)
            except InvalidImageError as error:
                flagged[name].append(True)
                reasons[name][f"refused ({error.code})"] += 1
                continue
            result = interpret(prepared, ensemble.infer(prepared.preprocessed[None]), model)
            flagged[name].append(result.needs_review)
            for reason in result.review_reasons:
                reasons[name][reason.split(":")[0].split(" ")[0]] += 1
            if not result.needs_review:
                labels[result.label] += 1
    for name, values in flagged.items():
        top = ", ".join(f"{reason} {count}" for reason, count in reasons[name].most_common())
        print(f"{name:<26} n={len(values):<4} flagged {np.mean(values):6.1%}   reasons: {top}")
    print(f"classes given to unflagged crops: {dict(labels)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
