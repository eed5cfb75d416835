"""Attention U-Net on the full field vs on the field pooled by ``SegmentationConfig.input_scale`` (CPU).

    .venv/bin/python research/segmentation_scale_experiment.py --data DATA --epochs 4 > segscale.json

Phase 2 only, ``--size`` px fields (224 reproduces the numbers in ``SegmentationConfig``), trained on
block folds 1-4 of 5 with the same schedule for every scale, scored on fold 0's cleaned masks (Dice/IoU),
with the training time, plus the same scores on as many of the training fields (``in_sample``: how well the
U-Net fits the colour-threshold targets at all), a Dice that forgives outlines off by one pixel
(``dice_1px``), and how well two readings of the target agree with each other (``target_agreement``).
About 10 minutes on 2 cores at 224 px and 4 epochs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hybridcn.profiles import get_profile  # noqa: E402
from preprocessing.pipeline import fit_field  # noqa: E402
from preprocessing.stain import fit_stain_reference  # noqa: E402
from training.data import block_folds, clean_mask, read_rgb  # noqa: E402
from training.experiments import load_dataset  # noqa: E402
from training.pipeline import TrainOptions, dice_iou, preprocess_all, train_segmentation  # noqa: E402


def tolerant_dice(predicted: np.ndarray, target: np.ndarray, pixels: int) -> float:
    """Dice where a pixel within ``pixels`` of the other mask counts as agreeing (boundary tolerance; 0: Dice).

    (|P within d of T| + |T within d of P|) / (|P| + |T|), pooled over fields: 1.0 when every disagreement
    is an outline off by at most ``pixels``, so the gap to it is whole cells or specks missed or invented,
    and the gap between it and the plain Dice is outline precision (Nikolov et al. 2018's surface Dice
    asks the same question of the outlines alone).
    """
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * pixels + 1, 2 * pixels + 1))
    agree = total = 0
    for p, t in zip(predicted.astype(np.uint8), target.astype(np.uint8), strict=True):
        agree += int((p & cv2.dilate(t, kernel)).sum() + (t & cv2.dilate(p, kernel)).sum())
        total += int(p.sum() + t.sum())
    return agree / total if total else 1.0


def target_agreement(samples: list, rows: np.ndarray, masks: np.ndarray, size: int) -> float:
    """Dice between two readings of the same ``Segmented/`` target at ``size`` px: cleaned at ``size`` (what
    the U-Net is scored against) and cleaned at twice ``size`` then area-shrunk. No model can be expected
    to agree with one reading much better than the two readings agree with each other.
    """
    other = []
    for row in rows:
        fine, _ = clean_mask(fit_field(read_rgb(samples[row].segmented), 2 * size))
        other.append(cv2.resize(fine.astype(np.uint8) * 255, (size, size), interpolation=cv2.INTER_AREA) >= 128)
    return tolerant_dice(np.stack(other), masks[rows], 0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--scales", type=int, nargs="+", default=[2, 1])
    parser.add_argument("--size", type=int, default=224, help="field size in px (the compact profile runs at 112)")
    parser.add_argument("--base-width", type=int, default=None, help="U-Net width (default: the profile's)")
    args = parser.parse_args()

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    compact = get_profile("compact").with_changes(image_size=args.size)
    data = load_dataset(args.data, args.size, log=log)
    fold = block_folds(data.samples, folds=5)
    train, test = fold != 0, fold == 0
    reference = fit_stain_reference(data.images[train][::5])
    fields = torch.as_tensor(preprocess_all(data.images, reference, compact.preprocess, workers=2))
    options = TrainOptions(seg_epochs=args.epochs, batch_size=32, device="cpu", progress=False)
    usable, held = np.nonzero(train & data.mask_ok)[0], np.nonzero(test & data.mask_ok)[0]
    result: dict = {"target_agreement": round(target_agreement(data.samples, held, data.masks, args.size), 4)}
    for scale in args.scales:
        width = args.base_width or compact.segmentation.base_width
        profile = compact.with_changes(segmentation=replace(compact.segmentation, input_scale=scale, base_width=width))
        started = time.time()
        stage = train_segmentation(fields[usable], torch.as_tensor(data.masks[usable].astype(np.uint8)), profile,
                                   options, log, torch.Generator().manual_seed(0))
        seconds = time.time() - started
        seen = usable[np.random.default_rng(0).permutation(len(usable))[: len(held)]]
        scores = {}
        for name, rows in (("held_out", held), ("in_sample", seen)):
            with torch.no_grad():
                masks = torch.cat([stage(fields[rows[i : i + 64]])[0] for i in range(0, len(rows), 64)]).numpy() >= 128
            dice, iou = dice_iou(torch.as_tensor(masks).float(), torch.as_tensor(data.masks[rows]).float())
            scores[name] = {"dice": round(dice, 4), "iou": round(iou, 4),
                            "dice_1px": round(tolerant_dice(masks, data.masks[rows], 1), 4)}
        result[f"input_scale_{scale}"] = {**scores["held_out"], "in_sample": scores["in_sample"],
                                          "train_seconds": round(seconds),
                                          "held_out_fields": int(len(held)), "epochs": args.epochs,
                                          "base_width": width}
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
