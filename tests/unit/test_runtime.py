"""The in-process ONNX Runtime sessions that the Triton Python backend also uses."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from engine.field import prepare_array
from engine.model import ServedModel
from export.runtime import onnx_session
from hybridcn.synth import synth_field
from hybridcn.tensors import FEATURE_OUTPUTS, HEAD_OUTPUTS, SEGMENTATION_OUTPUTS

REPOSITORY = Path(__file__).resolve().parents[2] / "model_repository"


def _run_shipped_model(flush_denormals: bool, fields: np.ndarray) -> list[np.ndarray]:
    sessions = [onnx_session(REPOSITORY / name / "1" / "model.onnx", threads=1, flush_denormals=flush_denormals)
                for name in ("segmentation", "features", "head")]
    mask, attention, segmented = sessions[0].run(list(SEGMENTATION_OUTPUTS), {"image": fields})
    (features,) = sessions[1].run(list(FEATURE_OUTPUTS), {"segmented_image": segmented})
    probabilities, feature_attention = sessions[2].run(list(HEAD_OUTPUTS), {"features": features})
    return [mask, attention, features, probabilities, feature_attention]


def test_flushing_subnormals_leaves_the_shipped_model_outputs_unchanged():
    model = ServedModel.from_repository(REPOSITORY)
    fields = np.stack([prepare_array(synth_field(i % 4, seed=300 + i).image, model).preprocessed for i in range(4)])
    exact = _run_shipped_model(False, fields)
    flushed = _run_shipped_model(True, fields)
    for name, a, b in zip(["mask", "attention", "features", "probabilities", "feature_attention"], exact, flushed,
                          strict=True):
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-6, err_msg=name)
