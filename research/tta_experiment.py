"""Would test-time augmentation help? Each CV fold's stored full model scores its held-out fields (CPU).

    .venv/bin/python research/tta_experiment.py --data DATA --study runs/cpu112e24

A blood-smear field has no preferred orientation, so the eight symmetries of the square (flips and
90-degree rotations, the dihedral group D4) are all equally valid views of it; training augments
with exactly these. The fold's model (``STUDY/cv/models/block_fold{K}_full.pt``) scores every view
through the served stages, and the views are combined two ways: mean of the class probabilities,
and mean of the backbone features before the head. Prints JSON: accuracy per fold and pooled, for
one view (as served), the 4 views of the flip group, and all 8.
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

from training.experiments import full_checkpoint, load_dataset  # noqa: E402
from training.pipeline import TrainedModel, load_trained, preprocess_all  # noqa: E402

FLIPS = ((0, False), (0, True), (2, False), (2, True))  # identity, h-flip, rot180, v-flip
DIHEDRAL = tuple((turns, flip) for turns in range(4) for flip in (False, True))


def view(images: torch.Tensor, turns: int, flip: bool) -> torch.Tensor:
    """One symmetry of ``(N, H, W, 3)`` fields: ``turns`` quarter turns, then a horizontal flip."""
    out = torch.rot90(images, turns, dims=(1, 2))
    return torch.flip(out, dims=(2,)) if flip else out


@torch.no_grad()
def features_and_probabilities(model: TrainedModel, images: torch.Tensor, batch: int = 64
                               ) -> tuple[torch.Tensor, torch.Tensor]:
    features, probabilities = [], []
    for start in range(0, len(images), batch):
        _, _, segmented = model.segmentation(images[start:start + batch])
        feats = model.features(segmented.contiguous(memory_format=torch.channels_last)).float()
        features.append(feats)
        probabilities.append(torch.softmax(model.head.head(feats)[0], 1))
    return torch.cat(features), torch.cat(probabilities)


def probability_mean(per_view: dict, keys: tuple) -> torch.Tensor:
    """Mean of the class probabilities over the views ``keys``."""
    return torch.stack([per_view[key][1] for key in keys]).mean(0)


@torch.no_grad()
def feature_mean(model: TrainedModel, per_view: dict, keys: tuple) -> torch.Tensor:
    """The head's probabilities for the mean of the backbone features over the views ``keys``."""
    return torch.softmax(model.head.head(torch.stack([per_view[key][0] for key in keys]).mean(0))[0], 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--study", required=True)
    parser.add_argument("--folds", type=int, nargs="*", default=[0, 1, 2, 3, 4])
    args = parser.parse_args()
    torch.set_num_threads(2)

    cv_dir = Path(args.study) / "cv"
    assignment = np.asarray(json.loads((cv_dir / "cv_block.json").read_text())["assignment"])
    data = None
    correct: dict[str, int] = {}
    result: dict = {"folds": {}}
    for fold in args.folds:
        model = load_trained(full_checkpoint(cv_dir, "block", fold))
        if data is None:
            data = load_dataset(args.data, model.profile.image_size, log=lambda message: None)
        held_out = assignment == fold
        labels = torch.as_tensor(data.labels[held_out])
        pre = torch.as_tensor(preprocess_all(data.images[held_out], model.reference, model.profile.preprocess,
                                             workers=2))
        per_view = {key: features_and_probabilities(model, view(pre, *key)) for key in DIHEDRAL}

        scores = {
            "one_view": per_view[(0, False)][1],
            "flips4_probability_mean": probability_mean(per_view, FLIPS),
            "dihedral8_probability_mean": probability_mean(per_view, DIHEDRAL),
            "flips4_feature_mean": feature_mean(model, per_view, FLIPS),
            "dihedral8_feature_mean": feature_mean(model, per_view, DIHEDRAL),
        }
        hits = {name: int((p.argmax(1) == labels).sum()) for name, p in scores.items()}
        single_views = [float((per_view[key][1].argmax(1) == labels).float().mean()) for key in DIHEDRAL]
        result["folds"][fold] = {"fields": int(held_out.sum()),
                                 **{name: hit / int(held_out.sum()) for name, hit in hits.items()},
                                 "each_single_view": single_views}
        for name, hit in hits.items():
            correct[name] = correct.get(name, 0) + hit
        correct["fields"] = correct.get("fields", 0) + int(held_out.sum())
        print(json.dumps({fold: result["folds"][fold]}), file=sys.stderr, flush=True)
    result["pooled"] = {name: hit / correct["fields"] for name, hit in correct.items() if name != "fields"}
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
