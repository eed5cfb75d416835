"""Add the stain and camera shift scores to a study whose folds were trained before studies stored them.

    .venv/bin/python research/shift_fold.py --data DATA --study runs/stainaug --fold 0
    .venv/bin/hybridcn report runs/stainaug --docs runs/stainaug/report    # section 9: the shift benchmark

Loads ``STUDY/cv/models/block_fold{F}_full.pt`` (written by ``hybridcn study`` or
``research/cpu_fold_experiment.py``), scores the fold's held-out fields under every seeded shift with
the product's own :func:`training.experiments.shifted_logits` (what ``hybridcn study`` now stores for
every fold), and writes them into the fold's ``full`` entry of ``STUDY/cv/cv_block.json``. About a
minute per fold on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from training.data import block_folds  # noqa: E402
from training.experiments import full_checkpoint, load_dataset, shifted_logits  # noqa: E402
from training.pipeline import TrainOptions, load_trained  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--study", required=True)
    parser.add_argument("--fold", type=int, nargs="+", default=[0])
    args = parser.parse_args()
    cv_dir = Path(args.study) / "cv"
    results_path = cv_dir / "cv_block.json"
    results = json.loads(results_path.read_text())
    for fold in args.fold:
        model = load_trained(full_checkpoint(cv_dir, "block", fold))
        data = load_dataset(args.data, model.profile.image_size, log=lambda line: print(line, file=sys.stderr))
        test = block_folds(data.samples) == fold
        entry = results["folds"][str(fold)]["full"]
        if sorted(entry["index"]) != np.nonzero(test)[0].tolist():
            raise SystemExit(f"fold {fold}: the study's held-out fields are not this data's block fold {fold}")
        options = TrainOptions(device="cpu", progress=False, workers=1, batch_size=32)
        entry["shifted_logits"] = shifted_logits(model, data, test, options)
        results_path.write_text(json.dumps(results))
        print(f"fold {fold}: shift scores stored in {results_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
