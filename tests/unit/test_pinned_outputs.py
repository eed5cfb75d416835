"""The same probabilities on the same inputs as before the engine/contract refactor (pinned values).

The fields are the project's own synthetic ones, encoded as PNG, through the served preparation and the
shipped ONNX graphs on ONNX Runtime (the graphs Triton runs). A change to preprocessing, field fitting or
interpretation that moves a probability shows here.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from engine.field import interpret, prepare_bytes
from engine.model import ServedModel
from export.runtime import OnnxEnsemble
from hybridcn.synth import synth_field

ROOT = Path(__file__).resolve().parents[2]
PINNED = json.loads((ROOT / "tests" / "data" / "pinned_fields.json").read_text())


@pytest.fixture(scope="module")
def served():
    repository = ROOT / "model_repository"
    model = ServedModel.from_repository(repository)
    if model.model_version != PINNED["model_version"]:
        pytest.fail(f"shipped model {model.model_version} is not the pinned {PINNED['model_version']}: re-pin "
                    "tests/data/pinned_fields.json deliberately when the shipped model changes")
    return model, OnnxEnsemble(repository)


@pytest.mark.parametrize("pinned", PINNED["fields"], ids=lambda p: f"class{p['class_index']}-seed{p['seed']}")
def test_probabilities_and_cells_are_unchanged(served, pinned):
    model, ensemble = served
    field = synth_field(pinned["class_index"], seed=pinned["seed"], size=pinned["size"]).image
    ok, png = cv2.imencode(".png", cv2.cvtColor(field, cv2.COLOR_RGB2BGR))
    assert ok
    prepared = prepare_bytes(png.tobytes(), model)
    output = ensemble.infer(prepared.preprocessed[None])
    np.testing.assert_allclose(output.probabilities[0], pinned["probabilities"], atol=1e-5)
    result = interpret(prepared, output, model)
    assert result.label == pinned["label"] and result.cell_count == pinned["cell_count"]
