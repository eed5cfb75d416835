"""Compare study variants on one block fold on a CPU, at a reduced field size (a relative comparison).

    .venv/bin/python research/cpu_fold_experiment.py --data DATA --out runs/bgexp \\
        --variants full with_clahe_multiscale --size 112 --backbone-epochs 10

Trains each variant (names from ``training.experiments.ABLATIONS``) with the compact networks at
``--size`` px on the other block folds and scores it on ``--fold`` (default 0); the full model
also gets the shortcut audit and the segmentation Dice. Several ``--fold`` values run one after
another on one loaded dataset. Results go to ``OUT/cv/cv_block.json`` and
``OUT/log.txt`` as in ``hybridcn study`` (resumable). About 15 minutes per variant at 112 px on 2 cores.
The compact profile itself runs at 112 px without CLAHE/multiscale since session 3; the experiments
recorded in the model card ran on its earlier form (224 px profile sized down, CLAHE on), where
``full`` meant what ``with_clahe_multiscale`` means now.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hybridcn.profiles import get_profile  # noqa: E402
from training.experiments import ABLATIONS, crossvalidate, load_dataset  # noqa: E402
from training.pipeline import TrainOptions  # noqa: E402
from training.study import make_logger  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--variants", nargs="+", default=["full"], choices=sorted(ABLATIONS))
    parser.add_argument("--size", type=int, default=112, help="field size in px (the compact profile's own is 112)")
    parser.add_argument("--seg-epochs", type=int, default=4)
    parser.add_argument("--backbone-epochs", type=int, default=10)
    parser.add_argument("--head-epochs", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--fold", type=int, nargs="+", default=[0],
                        help="the held-out block fold(s) (0-4), run in this order in one process")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--background-augment", type=float, default=0.0, metavar="SHARE",
                        help="repaint the background of this share of training fields")
    parser.add_argument("--balance-acquisition", action="store_true",
                        help="draw each class's yellowish- and bluish-background fields equally often")
    parser.add_argument("--look-augment", type=float, default=0.0, metavar="SHARE",
                        help="vary focus and saturation of this share of training fields")
    parser.add_argument("--stain-views", type=int, default=0, metavar="N",
                        help="stain- and camera-shifted copies of each training field")
    parser.add_argument("--head-label-smoothing", type=float, metavar="EPSILON",
                        help="label smoothing of the phase-4 head alone (default: the backbones' 0.1)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="override one profile value (JSON), e.g. preprocess.stain_lightness_threshold=200")
    args = parser.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = make_logger(out / "log.txt")
    compact = get_profile("compact")
    profile = compact.with_changes(image_size=args.size, features=replace(compact.features, input_size=args.size))
    profile = profile.with_overrides(args.set)
    data = load_dataset(args.data, args.size, log=log)
    options = TrainOptions(seg_epochs=args.seg_epochs, backbone_epochs=args.backbone_epochs,
                           head_epochs=args.head_epochs, batch_size=args.batch_size, feature_views=1, seed=args.seed,
                           background_augment=args.background_augment,
                           balance_acquisition=args.balance_acquisition, look_augment=args.look_augment,
                           stain_views=args.stain_views,
                           head_label_smoothing=args.head_label_smoothing,
                           device="cpu", progress=False)
    crossvalidate(data, profile, options, out / "cv", variants=args.variants, folds=5,
                  fold_order=args.fold, log=log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
