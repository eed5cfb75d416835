"""Attention U-Net on the full field vs on the field pooled by ``SegmentationConfig.input_scale`` (CPU).

    .venv/bin/python research/segmentation_scale_experiment.py --data DATA --epochs 4 > segscale.json

Phase 2 only, ``--size`` px fields (224 reproduces the numbers in ``SegmentationConfig``), trained on
block folds 1-4 of 5 with the same schedule for every scale, scored on fold 0's cleaned masks (Dice/IoU),
with the training time. About 10 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hybridcn.profiles import get_profile  # noqa: E402
from preprocessing.stain import fit_stain_reference  # noqa: E402
from training.data import block_folds  # noqa: E402
from training.experiments import load_dataset  # noqa: E402
from training.pipeline import TrainOptions, dice_iou, preprocess_all, train_segmentation  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--scales", type=int, nargs="+", default=[2, 1])
    parser.add_argument("--size", type=int, default=224, help="field size in px (the compact profile runs at 112)")
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
    result = {}
    for scale in args.scales:
        profile = compact.with_changes(segmentation=replace(compact.segmentation, input_scale=scale))
        started = time.time()
        stage = train_segmentation(fields[usable], torch.as_tensor(data.masks[usable].astype(np.uint8)), profile,
                                   options, log, torch.Generator().manual_seed(0))
        seconds = time.time() - started
        with torch.no_grad():
            masks = torch.cat([stage(fields[held[i : i + 64]])[0] for i in range(0, len(held), 64)])
        dice, iou = dice_iou(masks.float() / 255.0, torch.as_tensor(data.masks[held]).float())
        result[f"input_scale_{scale}"] = {"dice": round(dice, 4), "iou": round(iou, 4), "train_seconds": round(seconds),
                                          "held_out_fields": int(len(held)), "epochs": args.epochs}
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
