"""Why does a flat background cost accuracy? Held-out fields of one CV fold, its stored full model (CPU).

    .venv/bin/python research/diagnose_flat_background.py --data DATA --study runs/cpu112 --fold 0

The fold's full model (``STUDY/cv/models/block_fold{K}_full.pt``, kept by ``hybridcn study``) scores its
held-out fields as they are and with the background painted one flat neutral colour, then with parts
of the as-is computation put back: the as-is field's z-score statistics (is the per-image z-score the
route?), and the as-is field's U-Net mask (is the mask?). Then the other order: the background painted
after phase 1, so the cells' pixels are exactly the as-is ones (does phase 1 move the cells when the
background changes, through the foreground statistics of Reinhard's normalisation?), with how far
phase 1 moves the cells' pixels. Every row feeds the backbones through the gate the model was trained
with (``segmentation.hard_gate``: soft mask, or exact zeros off the cells). Last, the same model through
the other gate, with no retraining: for a soft-gated model, does the background reach the backbones
through the soft mask's small values? Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from models.stages import segmented_input  # noqa: E402
from preprocessing.stain import foreground_mask  # noqa: E402
from training.experiments import full_checkpoint, load_dataset  # noqa: E402
from training.pipeline import TrainedModel, load_trained, preprocess_all  # noqa: E402

NEUTRAL = (235, 230, 235)


def channel_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image, per-channel mean and std, as the served z-score computes them."""
    return x.mean((2, 3), keepdim=True), x.std((2, 3), keepdim=True, unbiased=False).clamp(min=1e-6)


@torch.no_grad()
def accuracy(model: TrainedModel, field: torch.Tensor, stats: tuple[torch.Tensor, torch.Tensor],
             labels: np.ndarray, mask_input: torch.Tensor | None = None, *, hard_mask: bool | None = None) -> float:
    """The served stages by hand: z-score with ``stats``, the U-Net on ``mask_input`` (default: this field).

    ``hard_mask`` overrides the gate the model was trained with.
    """
    if hard_mask is None:
        hard_mask = model.profile.segmentation.hard_gate
    normalized = (field - stats[0]) / stats[1]
    logits, _ = model.segmentation.mask_logits(normalized if mask_input is None else mask_input)
    probability = torch.sigmoid(logits)
    features = model.features(segmented_input(normalized, probability, hard=hard_mask).contiguous(
        memory_format=torch.channels_last))
    predicted = model.head.head(features)[0].argmax(1).numpy()
    return float((predicted == labels).mean())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--study", required=True)
    parser.add_argument("--fold", type=int, default=0)
    args = parser.parse_args()

    cv_dir = Path(args.study) / "cv"
    model = load_trained(full_checkpoint(cv_dir, "block", args.fold))
    held_out = np.asarray(json.loads((cv_dir / "cv_block.json").read_text())["assignment"]) == args.fold
    data = load_dataset(args.data, model.profile.image_size, log=lambda message: None)
    raw, labels = data.images[held_out], data.labels[held_out]
    background = np.stack([~foreground_mask(image) for image in raw])
    flat = raw.copy()
    flat[background] = NEUTRAL

    def phase1(fields: np.ndarray) -> torch.Tensor:
        pre = preprocess_all(fields, model.reference, model.profile.preprocess, workers=2)
        return torch.as_tensor(pre).permute(0, 3, 1, 2).float()

    as_is, flattened = phase1(raw), phase1(flat)
    as_is_stats = channel_stats(as_is)
    as_is_normalized = (as_is - as_is_stats[0]) / as_is_stats[1]
    cells = torch.as_tensor(~background)[:, None].expand_as(as_is)
    painted_after = torch.where(cells, as_is, flattened)  # as-is cells, the flat field's background
    trained_hard = model.profile.segmentation.hard_gate
    other = not trained_hard
    result = {
        "fold": args.fold, "fields": int(held_out.sum()), "gate": "hard" if trained_hard else "soft",
        "as_is": accuracy(model, as_is, as_is_stats, labels),
        "flat": accuracy(model, flattened, channel_stats(flattened), labels),
        "flat_with_as_is_zscore_stats": accuracy(model, flattened, as_is_stats, labels),
        "flat_with_as_is_mask": accuracy(model, flattened, channel_stats(flattened), labels, as_is_normalized),
        "flat_with_as_is_zscore_stats_and_mask": accuracy(model, flattened, as_is_stats, labels, as_is_normalized),
        "flat_painted_after_phase1": accuracy(model, painted_after, channel_stats(painted_after), labels),
        "phase1_cell_pixel_shift": float((flattened - as_is).abs()[cells].mean()),
        "as_is_other_gate": accuracy(model, as_is, as_is_stats, labels, hard_mask=other),
        "flat_other_gate": accuracy(model, flattened, channel_stats(flattened), labels, hard_mask=other),
        "flat_painted_after_phase1_other_gate": accuracy(model, painted_after, channel_stats(painted_after), labels,
                                                         hard_mask=other),
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
