"""The magnification check: red cells as the ruler, fitting at a scale, the caller's pixel size."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from hybridcn.synth import synth_field
from preprocessing import fit_field
from preprocessing.scale import (
    PIXEL_SIZE_RANGE_UM,
    RED_CELL_UM,
    check_pixel_size,
    fit_field_at,
    fit_to_plan,
    plan_scale,
    red_cell_diameter,
)

TRAINING = (11.0, 16.0, 25.0)  # red-cell diameters at the field size: low, median, high


@pytest.fixture(scope="module")
def field() -> np.ndarray:
    return synth_field(2, seed=1, size=224).image


def test_the_measured_diameter_follows_the_magnification(field):
    base = red_cell_diameter(field)
    assert base is not None and 12 < base < 24
    enlarged = red_cell_diameter(cv2.resize(field, (448, 448), interpolation=cv2.INTER_LINEAR))
    shrunk = red_cell_diameter(cv2.resize(field, (112, 112), interpolation=cv2.INTER_AREA))
    assert 1.7 < enlarged / base < 2.3 and 0.4 < shrunk / base < 0.6
    # a large image is measured on a shrunk copy, in its own pixels
    assert 0.85 < red_cell_diameter(cv2.resize(field, (1792, 1792))) / (8 * base) < 1.15


def test_nothing_to_measure_on_a_blank_or_noise_free_image():
    assert red_cell_diameter(np.full((224, 224, 3), 230, np.uint8)) is None


def test_fitting_at_a_scale_crops_or_mirrors_and_the_plain_factor_is_the_plain_fit(field):
    assert np.array_equal(fit_field_at(field, 112, 0.5), fit_field(field, 112))
    wide = np.ascontiguousarray(np.concatenate([field, field[:, :100]], axis=1))
    assert np.array_equal(fit_field_at(wide, 112, 112 / 224), fit_field(wide, 112))
    small = fit_field_at(field, 224, 0.5)  # half the size: the centre is the whole image, mirrored around it
    assert small.shape == (224, 224, 3)
    assert np.array_equal(small[56:168, 56:168], cv2.resize(field, (112, 112), interpolation=cv2.INTER_AREA))
    assert np.array_equal(small[55, 56:168], small[57, 56:168])  # reflected about the edge row
    large = fit_field_at(field, 112, 1.0)  # the centre 112 px at full resolution
    assert np.array_equal(large, field[56:168, 56:168])


def test_a_field_at_the_training_scale_is_left_alone(field):
    plan = plan_scale(field, 224, TRAINING)
    assert plan.rescaled_by is None and plan.reason is None
    assert plan.pixel_size_um == pytest.approx(RED_CELL_UM / plan.diameter)
    assert np.array_equal(fit_to_plan(field, 112, plan, field_size=224), fit_field(field, 112))


def test_another_magnification_is_resized_to_the_training_scale_and_flagged(field):
    zoomed = cv2.resize(field[56:168, 56:168], (224, 224), interpolation=cv2.INTER_LINEAR)  # twice the magnification
    plan = plan_scale(zoomed, 224, TRAINING)
    assert plan.reason.startswith("scale_adjusted: red cells") and "state the pixel size" in plan.reason
    assert 0.4 < plan.rescaled_by < 0.65
    refitted = fit_to_plan(zoomed, 224, plan, field_size=224)
    assert abs(red_cell_diameter(refitted) - TRAINING[1]) < 3.5
    close = cv2.resize(field[80:121, 80:121], (224, 224), interpolation=cv2.INTER_LINEAR)  # 5x: a cell or two
    plan = plan_scale(close, 224, TRAINING)
    assert plan.reason.startswith("scale_unknown") and plan.rescaled_by is None
    plan = plan_scale(field, 224, (2.0, 3.0, 4.0))  # cells 5-6x the training size: beyond repair
    assert plan.reason.startswith("scale_out_of_range") and plan.rescaled_by is None


def test_a_stated_pixel_size_decides_without_measuring(field):
    training_um = RED_CELL_UM / TRAINING[1]
    same = plan_scale(field, 224, TRAINING, pixel_size_um=training_um)
    assert same.factor == pytest.approx(1.0) and same.reason is None and same.diameter is None
    finer = plan_scale(field, 224, TRAINING, pixel_size_um=training_um / 2)  # a 2x objective: shrink by 2
    assert finer.factor == pytest.approx(0.5) and finer.rescaled_by == pytest.approx(0.5) and finer.reason is None
    blank = np.full((224, 224, 3), 230, np.uint8)
    assert plan_scale(blank, 224, TRAINING).reason.startswith("scale_unknown")
    assert plan_scale(blank, 224, TRAINING, pixel_size_um=training_um).reason is None
    with pytest.raises(ValueError, match="positive"):
        plan_scale(field, 224, TRAINING, pixel_size_um=0.0)


def test_pixel_sizes_outside_the_plausible_range_are_refused():
    assert check_pixel_size("0.25") == 0.25
    for value in (0, -1, PIXEL_SIZE_RANGE_UM[1] * 2):
        with pytest.raises(ValueError, match="outside"):
            check_pixel_size(value)
