"""Benign-vs-malignant folders for ``hybridcn evaluate --binary``: layouts read, layouts refused, metrics."""

from __future__ import annotations

import numpy as np
import pytest

from training.data import DataLayoutError, binary_label, find_binary_samples, find_samples
from training.metrics import binary_metrics


def _touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def test_binary_folders_in_every_layout(tmp_path):
    assert [binary_label(n) for n in ["Benign", "MALIGNANT", "[Malignant] Pro-B", "Early", "Segmented"]] == \
        [0, 1, 1, 1, None]
    root = tmp_path / "mixed" / "Original"
    files = {_touch(root / "Benign" / "b-2.jpg"): 0, _touch(root / "Benign" / "b-10.jpg"): 0,
             _touch(root / "[Malignant] Pro-B" / "p-1.jpg"): 1, _touch(root / "Malignant" / "Pre" / "m-3.png"): 1}
    _touch(root / "Benign" / "notes.txt")
    _touch(root / "Unlabelled" / "u-1.jpg")
    samples = find_binary_samples(tmp_path / "mixed")
    assert dict(samples) == files
    assert [path.name for path, _ in samples] == ["b-2.jpg", "b-10.jpg", "p-1.jpg", "m-3.png"]  # benign first

    _touch(tmp_path / "other" / "Unlabelled" / "u-1.jpg")
    with pytest.raises(DataLayoutError, match=r"no benign or malignant folders .* found \['Unlabelled'\]"):
        find_binary_samples(tmp_path / "other")
    with pytest.raises(FileNotFoundError):
        find_binary_samples(tmp_path / "nowhere")


def test_the_four_class_reader_refuses_a_malignant_folder(tmp_path):
    _touch(tmp_path / "Benign" / "b-1.jpg")
    _touch(tmp_path / "Malignant" / "m-1.jpg")
    with pytest.raises(DataLayoutError, match="hybridcn evaluate --binary"):
        find_samples(tmp_path)  # reading Benign alone would score one class as if it were the data set


def test_binary_metrics_count_the_malignant_calls():
    labels = np.array([0, 0, 0, 1, 1, 1, 1])
    p = np.array([0.1, 0.6, 0.2, 0.9, 0.5, 0.4, 0.8])
    result = binary_metrics(labels, p)
    assert result["confusion"] == [[2, 1], [1, 3]]
    assert (result["sensitivity"], result["specificity"]) == (0.75, pytest.approx(2 / 3))
    assert result["accuracy"] == pytest.approx(5 / 7) and result["auc"] == pytest.approx(10 / 12)
    one_side = binary_metrics(np.array([1, 1]), np.array([0.7, 0.2]))
    assert one_side["auc"] is None and one_side["specificity"] is None and one_side["sensitivity"] == 0.5
