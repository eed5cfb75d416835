"""The out-of-distribution check: the served graph computes the fitted score, and the field's review says so."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest

from engine.field import interpret, out_of_distribution, prepare_array
from engine.model import ServedModel
from export.ood import fit_density, held_out_scores, threshold_from, write_ood_graph
from export.runtime import OnnxEnsemble, onnx_session
from hybridcn.synth import synth_field
from preprocessing.fieldstats import STATISTICS, blob_scale, field_statistics
from preprocessing.probes import PROBES, nucleated_cores, probe_field

ROOT = Path(__file__).resolve().parents[2]


def test_the_onnx_graph_computes_the_fitted_mahalanobis_score(tmp_path):
    rng = np.random.default_rng(0)
    train = rng.normal(size=(400, 12)) * np.arange(1, 13) + 5  # dimensions on different scales
    density = fit_density(train)
    assert np.mean(density.score(train)) == pytest.approx(1.0, abs=0.15)  # about 1 for training-like rows
    session = onnx_session(write_ood_graph(density, tmp_path / "ood.onnx"))
    probe = np.vstack([train[:5], train[:5] + 40]).astype(np.float32)
    (served,) = session.run(["ood_score"], {"features": probe})
    np.testing.assert_allclose(served[:, 0], density.score(probe), rtol=1e-4)
    assert served[5:].min() > 10 * served[:5].max()  # far rows score far higher


def test_held_out_scores_leave_each_fold_out_of_its_own_fit():
    rng = np.random.default_rng(1)
    features = rng.normal(size=(300, 4))
    folds = np.repeat(np.arange(3), 100)
    held = held_out_scores(features, folds)
    assert held.mean() > fit_density(features).score(features).mean()  # unseen rows are farther
    assert threshold_from(held, 0.98) == pytest.approx(np.quantile(held, 0.98))


def test_probes_are_deterministic_and_field_sized():
    field = synth_field(1, seed=3).image
    for kind in PROBES:
        image = probe_field(field, kind, seed=0, field=2)
        assert image.shape == field.shape and image.dtype == np.uint8, kind
        assert np.array_equal(image, probe_field(field, kind, seed=0, field=2)), kind


def test_the_single_cell_probe_crops_the_white_cell_not_a_clump_of_red_cells():
    # a pale field of red cells, touching in a long clump on the left, and one purple white cell at (160, 60)
    field = np.full((224, 224, 3), (246, 242, 238), np.uint8)
    for x in range(16, 112, 14):
        for y in (40, 54, 68, 82, 96, 110, 124, 138, 152, 166):
            cv2.circle(field, (x, y), 8, (205, 175, 190), -1)
    cv2.circle(field, (160, 60), 14, (120, 70, 170), -1)
    cores = nucleated_cores(field)
    assert len(cores) == 1 and abs(cores[0][0] + cores[0][2] / 2 - 160) <= 2
    probe = probe_field(field, "single_cell", seed=0, field=0)
    purple = (probe[..., 2].astype(int) - probe[..., 1] > 60) & (probe[..., 1] < 110)
    # the crop is twice the cell's side, so the cell fills about pi/16 of it, centred; no red-cell clump
    assert purple[100:124, 100:124].all() and 0.12 < purple.mean() < 0.3


def test_the_cell_scale_follows_the_magnification():
    field = synth_field(2, seed=1, size=224).image

    def scale(rgb: np.ndarray) -> float:
        return blob_scale(cv2.cvtColor(rgb, cv2.COLOR_RGB2LAB)[..., 0].astype(np.float32))

    # half the magnification: every blob half as wide
    assert 1.6 < scale(field) / scale(probe_field(field, "zoom_out_2x", seed=0, field=0)) < 2.4
    assert field_statistics(field).shape == (len(STATISTICS),)


def test_the_shipped_model_flags_a_synthetic_field_and_says_why():
    model = ServedModel.from_repository(ROOT / "model_repository")
    assert model.manifest.ood is not None
    prepared = prepare_array(synth_field(0, seed=7).image, model)
    output = OnnxEnsemble(ROOT / "model_repository").infer(prepared.preprocessed[None])
    result = interpret(prepared, output, model)
    assert result.needs_review and result.ood_score > 1
    assert any(reason.startswith("out_of_distribution: score") for reason in result.review_reasons)


def test_without_a_fitted_check_there_is_no_score():
    model = ServedModel.from_repository(ROOT / "model_repository")
    bare = replace(model, manifest=model.manifest.model_copy(update={"ood": None}))
    assert out_of_distribution(bare, np.zeros(len(STATISTICS), np.float32), np.ones((1, 1))) == (None, [])


def test_the_shipped_model_fits_a_field_at_the_training_scale_from_a_stated_or_measured_pixel_size():
    model = ServedModel.from_repository(ROOT / "model_repository")
    check = model.manifest.ood
    assert check.red_cell_diameter is not None
    assert check.pixel_size_um == pytest.approx(7.5 / check.red_cell_diameter[1])
    field = synth_field(1, seed=4, size=224).image
    zoomed = cv2.resize(field[56:168, 56:168], (224, 224), interpolation=cv2.INTER_LINEAR)  # twice the magnification
    ensemble = OnnxEnsemble(ROOT / "model_repository")

    def classify(image: np.ndarray, **kwargs):
        prepared = prepare_array(image, model, **kwargs)
        return interpret(prepared, ensemble.infer(prepared.preprocessed[None]), model), prepared

    measured, _ = classify(zoomed)
    assert any(r.startswith("scale_adjusted: red cells") for r in measured.review_reasons)
    assert 0.4 < measured.rescaled_by < 0.7 and measured.scale > check.red_cell_diameter[2]
    stated, prepared = classify(zoomed, pixel_size_um=check.pixel_size_um / 2)
    assert stated.rescaled_by == pytest.approx(0.5) and stated.pixel_size_um == pytest.approx(check.pixel_size_um / 2,
                                                                                              rel=1e-3)
    assert not any(r.startswith("scale_") for r in stated.review_reasons) and stated.scale is None
    assert prepared.display.shape == (224, 224, 3) and prepared.original.shape == (112, 112, 3)
    plain, _ = classify(field, pixel_size_um=check.pixel_size_um)  # at the training pixel size nothing is resized
    assert plain.rescaled_by is None
