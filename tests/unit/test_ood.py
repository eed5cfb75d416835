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
from preprocessing.probes import PROBES, probe_field

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
    assert out_of_distribution(bare, np.zeros(len(STATISTICS), np.float32), np.ones((1, 1))) == (None, None, [])
