"""Does the served occlusion evidence show the cells, and is it faithful? Measured on the shipped model.

    .venv/bin/python research/occlusion_probe.py --data DATA --per-class 50

For each field: the evidence map (``engine.occlusion``, the served path's own code, run here through
ONNX Runtime on the shipped graphs), then
- inside/outside: the mean of the displayed map (0-255) inside the cells (the U-Net mask, over 0.5)
  against outside, as for the U-Net gate (``research/gradcam_probe.py`` measured 0.54 for the gate);
- deletion (Petsiuk et al., BMVC 2018): the top 10% of the map's pixels painted with the field's
  background colour, against 10% random pixels and against a random square of the same area; a map
  that shows what the answer rests on costs the answer's margin (``engine.occlusion.margins``) more
  when its top is hidden.
Reads fields the shipped model was trained on (no held-out fold model is kept in git), which is what
the page shows anyway; prints medians, means and the share of fields where inside >= 2x outside.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine.field import prepare_array  # noqa: E402
from engine.model import ServedModel  # noqa: E402
from engine.occlusion import MIN_PEAK, margins, occlusion_evidence  # noqa: E402
from export.runtime import OnnxEnsemble  # noqa: E402
from preprocessing.stain import background_colour  # noqa: E402
from training.data import find_samples, read_rgb  # noqa: E402

REPOSITORY = ROOT / "model_repository"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--per-class", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    model = ServedModel.from_repository(REPOSITORY)
    ensemble = OnnxEnsemble(REPOSITORY, threads=args.threads)
    everything = find_samples(args.data)
    samples = [s for c in range(4) for s in [s for s in everything if s.label == c][: args.per_class]]
    rng = np.random.default_rng(0)
    ratios, peaks, falls = [], [], {"top": [], "random pixels": [], "random square": []}
    started = time.perf_counter()
    for sample in samples:
        prepared = prepare_array(read_rgb(sample.path), model)
        field = prepared.preprocessed
        output = ensemble.infer(field[None])
        evidence = occlusion_evidence(lambda x: ensemble.infer(x).probabilities, field, output.probabilities[0])
        shown = evidence.to_uint8().astype(np.float64)
        inside = output.mask[0] > 127
        if inside.any() and (~inside).any():
            ratios.append(shown[inside].mean() / max(shown[~inside].mean(), 1e-6))
        peaks.append(evidence.peak)
        size = field.shape[0]
        count = field.shape[0] * field.shape[1] // 10
        side = int(round(np.sqrt(count)))
        y, x = rng.integers(0, size - side + 1, 2)
        square = np.zeros((size, size), bool)
        square[y : y + side, x : x + side] = True
        top, scattered = np.zeros(size * size, bool), np.zeros(size * size, bool)
        top[np.argsort(evidence.values.reshape(-1))[-count:]] = True
        scattered[rng.choice(size * size, count, replace=False)] = True
        chosen = {"top": top.reshape(size, size), "random pixels": scattered.reshape(size, size),
                  "random square": square}
        fill = background_colour(field).round().astype(np.uint8)
        hidden = np.stack([np.where(where[..., None], fill, field) for where in chosen.values()])
        after = margins(ensemble.infer(hidden).probabilities, evidence.label_index)
        for name, margin in zip(chosen, after, strict=True):
            falls[name].append(evidence.base_margin - float(margin))
    seconds = time.perf_counter() - started
    ratios_array = np.array(ratios)
    print(f"fields {len(samples)}, {seconds / len(samples):.2f} s a field (occlusion and the deletion test)")
    print(f"evidence inside/outside the cells: median {np.median(ratios_array):.2f}, mean {ratios_array.mean():.2f}, "
          f"share >= 2x {np.mean(ratios_array >= 2):.1%}")
    print(f"peak fall of the class margin: median {np.median(peaks):.3f}, share >= {MIN_PEAK} "
          f"{np.mean(np.array(peaks) >= MIN_PEAK):.1%}")
    for name, values in falls.items():
        print(f"deletion, {name:>13}: mean fall {np.mean(values):.4f}, median {np.median(values):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
