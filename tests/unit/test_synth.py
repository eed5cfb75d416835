"""The synthetic smear generator is deterministic and writes the public release's layout."""

from __future__ import annotations

import numpy as np

from hybridcn.cli import build_parser
from hybridcn.synth import synth_field, write_dataset


def test_same_seed_same_pixels_different_seed_different_field():
    a, b = synth_field(3, seed=5), synth_field(3, seed=5)
    assert (a.image == b.image).all() and (a.mask == b.mask).all() and a.label == 3
    assert not (synth_field(3, seed=6).image == a.image).all()
    assert a.image.shape == (224, 224, 3) and a.image.dtype == np.uint8 and a.mask.any()


def test_classes_differ_in_cell_size():
    import cv2

    def mean_cell_area(label: int) -> float:
        areas = []
        for seed in range(6):
            mask = (synth_field(label, seed=seed).mask > 0).astype("uint8")
            _, _, stats, _ = cv2.connectedComponentsWithStats(mask)
            areas += stats[1:, cv2.CC_STAT_AREA].tolist()
        return float(np.mean(areas))

    assert mean_cell_area(0) < mean_cell_area(2) < mean_cell_area(3)  # hematogones small, Pro-B blasts large


def test_write_dataset_layout(tmp_path):
    root = write_dataset(tmp_path / "syn", per_class=2, size=64)
    for name in ("Benign", "Early", "Pre", "Pro"):
        assert len(list((root / "Original" / name).glob("*.png"))) == 2
        assert len(list((root / "Segmented" / name).glob("*.png"))) == 2
    assert (root / "labels.csv").read_text().count("\n") == 9


def test_cli_lists_every_command():
    commands = build_parser()._subparsers._group_actions[0].choices
    assert {"serve", "classify", "export", "synth", "train", "study", "report", "evaluate", "batch", "demo"} <= set(
        commands)
