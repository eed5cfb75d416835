"""Where the served mask's stripes come from: column-to-column against row-to-row differences.

    .venv/bin/python research/mask_stripes.py --data DATA --per-class 50

For each field, the shipped U-Net's mask probability (0-255, the model's 112 px) is differenced between
neighbouring columns and between neighbouring rows, inside the cells only (mask over 127, where a
smooth probability should be near 255 everywhere). A transposed convolution of stride 2 paints a
period-2 pattern (Odena et al., "Deconvolution and checkerboard artifacts", Distill 2016); the
even-odd column gap measures it directly. Also the Dice of the served mask (over 127) against the
dataset's cleaned ``Segmented/`` masks (``training.data.clean_mask``), where those are usable. Prints
medians over fields (Dice: the mean). Run before and after ``python -m export.graph_patches``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine.field import prepare_array  # noqa: E402
from engine.model import ServedModel  # noqa: E402
from export.runtime import onnx_session  # noqa: E402
from preprocessing import fit_field  # noqa: E402
from training.data import clean_mask, find_samples, read_rgb  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--per-class", type=int, default=50)
    args = parser.parse_args()
    repository = ROOT / "model_repository"
    model = ServedModel.from_repository(repository)
    segmentation = onnx_session(repository / "segmentation" / "1" / "model.onnx")
    samples = find_samples(args.data)
    chosen = [s for c in range(4) for s in [s for s in samples if s.label == c][: args.per_class]]
    columns, rows, parity_columns, parity_rows, dice = [], [], [], [], []
    background_columns, background_rows = [], []
    for sample in chosen:
        field = prepare_array(read_rgb(sample.path), model).preprocessed
        mask = segmentation.run(None, {"image": field[None]})[0][0].astype(np.float32)
        inside = mask > 127
        background_columns.append(abs(mask[:, 0::2][:, :56].mean() - mask[:, 1::2][:, :56].mean()))
        background_rows.append(abs(mask[0::2][:56].mean() - mask[1::2][:56].mean()))
        if sample.segmented is not None:
            target, usable = clean_mask(fit_field(read_rgb(sample.segmented), mask.shape[0]))
            if usable:
                dice.append(2 * (inside & target).sum() / max(inside.sum() + target.sum(), 1))
        if inside.sum() < 50:
            continue
        columns.append(np.abs(np.diff(mask, axis=1))[inside[:, 1:] & inside[:, :-1]].mean())
        rows.append(np.abs(np.diff(mask, axis=0))[inside[1:] & inside[:-1]].mean())
        even, odd = inside[:, 0::2][:, :56], inside[:, 1::2][:, :56]
        both = even & odd
        parity_columns.append(abs(mask[:, 0::2][:, :56][both].mean() - mask[:, 1::2][:, :56][both].mean()))
        both = inside[0::2][:56] & inside[1::2][:56]
        parity_rows.append(abs(mask[0::2][:56][both].mean() - mask[1::2][:56][both].mean()))
    print(f"fields {len(background_columns)}; whole field, even against odd: columns "
          f"{np.median(background_columns):.1f}, rows {np.median(background_rows):.1f} (of 255)")
    print(f"Dice against the cleaned Segmented/ masks: {np.mean(dice):.3f} ({len(dice)} usable)")
    print(f"fields {len(columns)} (with cells)")
    print(f"inside the cells, mean |difference| of neighbours: columns {np.median(columns):.1f}, "
          f"rows {np.median(rows):.1f} (of 255)")
    print(f"even against odd: columns {np.median(parity_columns):.1f}, rows {np.median(parity_rows):.1f} (of 255)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
