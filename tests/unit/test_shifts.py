"""The shift benchmark's stain and camera shifts: seeded per field, each moving the image the stated way."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from hybridcn.synth import synth_field
from preprocessing.shifts import SHIFTS, shift_field

FIELD = synth_field(2, seed=11).image


def _lab_mean(rgb: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(rgb, cv2.COLOR_RGB2LAB).reshape(-1, 3).astype(np.float64).mean(axis=0)


@pytest.mark.parametrize("kind", list(SHIFTS))
def test_a_shift_is_reproducible_per_seed_and_field_and_varies_across_fields(kind):
    first, amount = shift_field(FIELD, kind, seed=3, field=7)
    again, same = shift_field(FIELD, kind, seed=3, field=7)
    assert np.array_equal(first, again) and amount == same
    assert first.shape == FIELD.shape and first.dtype == np.uint8 and not np.array_equal(first, FIELD)
    amounts = {shift_field(FIELD, kind, seed=3, field=i)[1] for i in range(8)}
    assert len(amounts) > 1  # amounts are drawn per field


def test_shifts_move_the_field_the_stated_way():
    before = _lab_mean(FIELD)
    assert _lab_mean(shift_field(FIELD, "hue_blue", seed=0, field=0)[0])[2] < before[2] - 3  # b* down: bluer
    assert _lab_mean(shift_field(FIELD, "hue_red", seed=0, field=0)[0])[1] > before[1] + 3  # a* up: redder
    low, factor = shift_field(FIELD, "contrast", seed=0, field=0)
    assert 0.7 <= factor <= 0.9 and low.astype(float).std() < FIELD.astype(float).std()
    blurred, sigma = shift_field(FIELD, "blur", seed=0, field=0)
    assert 0.6 <= sigma <= 1.4
    assert cv2.Laplacian(blurred, cv2.CV_64F).var() < cv2.Laplacian(FIELD, cv2.CV_64F).var()
    _, quality = shift_field(FIELD, "jpeg", seed=0, field=0)
    assert 40 <= quality <= 75
    _, chroma = shift_field(FIELD, "saturation", seed=0, field=0)
    assert 0.7 <= chroma <= 1.5


def test_an_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="unknown shift"):
        shift_field(FIELD, "sepia", seed=0, field=0)
