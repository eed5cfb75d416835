"""Where do a study's out-of-fold errors fall? Per class, per acquisition look and per block (CPU, ~1 min).

    .venv/bin/python research/errors_by_look.py --data DATA --study runs/cpu112e24 [--variant full] [--fold K ...]

The look is :func:`training.data.white_balance_groups` of each field (yellowish or bluish background);
the blocks are the patient stand-ins of the block split. Reads the stored out-of-fold logits
(``STUDY/cv/cv_block.json``) and, for the looks, the fields themselves. Prints JSON: fields and errors
per class and look, the confusion matrix of each look, and the blocks with the most errors.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hybridcn.profiles import CLASS_NAMES  # noqa: E402
from training.data import white_balance_groups  # noqa: E402
from training.experiments import load_dataset  # noqa: E402

LOOKS = ("bluish", "yellowish")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--study", required=True)
    parser.add_argument("--variant", default="full")
    parser.add_argument("--fold", type=int, action="append", metavar="K",
                        help="count only this held-out fold (repeatable; default: every fold the study finished)")
    args = parser.parse_args()

    cv = json.loads((Path(args.study) / "cv" / "cv_block.json").read_text())
    labels, groups = np.asarray(cv["labels"]), np.asarray(cv["groups"])
    predicted = np.full(len(labels), -1)
    for fold, entry in cv["folds"].items():
        if args.variant in entry and (args.fold is None or int(fold) in args.fold):
            result = entry[args.variant]
            predicted[np.asarray(result["index"])] = np.asarray(result["logits"]).argmax(1)
    scored = predicted >= 0
    size = cv["setup"]["profile"]["image_size"]
    data = load_dataset(args.data, size, log=lambda message: None)
    if not np.array_equal(data.labels, labels):
        raise SystemExit(f"{args.data} does not hold the study's fields in the study's order")
    looks = white_balance_groups(data.images)
    wrong = scored & (predicted != labels)
    per_class = {
        CLASS_NAMES[c]: {LOOKS[g]: {"fields": int((scored & (labels == c) & (looks == g)).sum()),
                                    "errors": int((wrong & (labels == c) & (looks == g)).sum())} for g in (0, 1)}
        for c in range(len(CLASS_NAMES))
    }
    confusion = {}
    for g in (0, 1):
        matrix = np.zeros((len(CLASS_NAMES), len(CLASS_NAMES)), dtype=int)
        np.add.at(matrix, (labels[scored & (looks == g)], predicted[scored & (looks == g)]), 1)
        confusion[LOOKS[g]] = matrix.tolist()
    by_block = Counter(int(b) for b in groups[wrong])
    result = {
        "study": args.study, "variant": args.variant, "fields": int(scored.sum()), "errors": int(wrong.sum()),
        "per_class_and_look": per_class,
        "confusion_by_look (rows true, columns predicted)": confusion,
        "blocks_with_errors": len(by_block), "blocks": len(np.unique(groups[scored])),
        "worst_blocks": [{"block": b, "errors": n, "fields": int((groups == b).sum())}
                         for b, n in by_block.most_common(5)],
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
