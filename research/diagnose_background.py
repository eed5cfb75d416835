"""Where does a field's background reach the shipped model? A diagnosis on labelled fields (CPU, ~2 min).

    .venv/bin/python research/diagnose_background.py --data DATA [--fields 400] > background.json

1. Preprocessing alone: recolour each field's background (non-stained pixels, texture kept) to another
   class's median background and measure how much the *cell* pixels change after each phase-1 step.
2. The shipped model (in-process ONNX Runtime, the served artifacts): accuracy as is, with the background
   replaced by a flat neutral colour, and recoloured; and how often a recoloured field is predicted as
   the class whose background it was given (what a colour shortcut would do). The shipped model was
   trained on all of DATA, so these accuracies are in-sample: read the drops, not the levels.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine.model import ServedModel  # noqa: E402
from export.runtime import OnnxEnsemble  # noqa: E402
from preprocessing import fit_field  # noqa: E402
from preprocessing.contrast import clahe_lightness, multiscale_enhance  # noqa: E402
from preprocessing.pipeline import enhance_field  # noqa: E402
from preprocessing.stain import blank_corner, foreground_mask, reinhard_normalize  # noqa: E402
from training.data import find_samples, read_rgb  # noqa: E402


def recolour(images: list[np.ndarray], labels: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    """Each field's background moved onto the median background of the next class's fields."""
    masks = [foreground_mask(image) for image in images]
    medians = np.array([np.median(image[~mask], axis=0) for image, mask in zip(images, masks, strict=True)])
    classes = sorted(set(labels.tolist()))
    class_median = {c: np.median(medians[labels == c], axis=0) for c in classes}
    donors = np.array([classes[(classes.index(c) + 1) % len(classes)] for c in labels])
    out = []
    for image, mask, median, donor in zip(images, masks, medians, donors, strict=True):
        moved = image.copy()
        moved[~mask] = np.clip(image[~mask] + (class_median[donor] - median), 0, 255).round().astype(np.uint8)
        out.append(moved)
    return out, donors


def step_sensitivity(images, moved, model: ServedModel) -> dict[str, float]:
    """Mean |change| of cell pixels (0-255) after each phase-1 step, original vs recoloured background."""
    config = model.preprocess
    steps = [
        ("blank_corner", lambda x: blank_corner(x, corner_fraction=config.corner_fraction)),
        ("reinhard", lambda x: reinhard_normalize(x, model.reference, corner_fraction=config.corner_fraction)),
        ("clahe", lambda x: clahe_lightness(x, clip_limit=config.clahe_clip_limit, tile_grid=config.clahe_tile_grid)),
        ("multiscale", lambda x: multiscale_enhance(x, sigmas=config.multiscale_sigmas,
                                                    weights=config.multiscale_weights,
                                                    amount=config.multiscale_amount)),
    ]
    change = {name: [] for name, _ in steps}
    for image, other in zip(images, moved, strict=True):
        cells = foreground_mask(image)
        a, b = image, other
        for name, step in steps:
            a, b = step(a), step(b)
            change[name].append(float(np.abs(a[cells].astype(int) - b[cells].astype(int)).mean()))
    return {name: round(float(np.mean(values)), 2) for name, values in change.items()}


def enhanced_cell_change(images, moved, model: ServedModel, config) -> float:
    """Mean |change| of cell pixels after the whole of phase 1 with ``config``."""
    change = []
    for image, other in zip(images, moved, strict=True):
        cells = foreground_mask(image)
        a = enhance_field(image, model.reference, config)[cells].astype(int)
        b = enhance_field(other, model.reference, config)[cells].astype(int)
        change.append(float(np.abs(a - b).mean()))
    return round(float(np.mean(change)), 2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--repository", default=str(ROOT / "model_repository"))
    parser.add_argument("--fields", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    model = ServedModel.from_repository(Path(args.repository))
    ensemble = OnnxEnsemble(Path(args.repository))
    samples = find_samples(args.data)
    chosen = np.random.default_rng(args.seed).choice(len(samples), min(args.fields, len(samples)), replace=False)
    labels = np.array([samples[i].label for i in chosen])
    images = [fit_field(read_rgb(samples[i].path), model.image_size) for i in chosen]
    moved, donors = recolour(images, labels)
    neutral = []
    for image in images:
        flat = image.copy()
        flat[~foreground_mask(image)] = (235, 230, 235)
        neutral.append(flat)

    def predicted(fields: list[np.ndarray]) -> np.ndarray:
        prepared = np.stack([enhance_field(f, model.reference, model.preprocess) for f in fields])
        return np.concatenate([ensemble.infer(prepared[i : i + 16]).probabilities.argmax(1)
                               for i in range(0, len(prepared), 16)])

    as_is, replaced, recoloured = predicted(images), predicted(neutral), predicted(moved)
    result = {
        "fields": len(chosen), "model_version": model.model_version,
        "cell_pixel_change_after_step": step_sensitivity(images, moved, model),
        "shipped_model_in_sample": {
            "as_is": float((as_is == labels).mean()),
            "background_replaced_neutral": float((replaced == labels).mean()),
            "background_recoloured": float((recoloured == labels).mean()),
            "recoloured_predicted_as_donor_class": float((recoloured == donors).mean()),
            "prediction_changed_by_recolouring": float((recoloured != as_is).mean()),
        },
        "cell_pixel_change_after_phase_1": {
            "as_shipped": enhanced_cell_change(images, moved, model, model.preprocess),
            "flatten_background": enhanced_cell_change(images, moved, model,
                                                       replace(model.preprocess, flatten_background=True)),
        },
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
