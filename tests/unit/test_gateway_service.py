"""The gateway's CPU steps for a model that runs below the field's resolution: what people see and the
cell coordinates stay in field pixels, the networks get the smaller field."""

from __future__ import annotations

import base64
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np

from engine.field import interpret, prepare_array
from engine.model import ServedModel
from engine.overlays import field_images
from export.runtime import EnsembleOutput
from hybridcn.synth import synth_field
from preprocessing import split_cells

ROOT = Path(__file__).resolve().parents[2]


def _png_size(url: str) -> tuple[int, int]:
    data = np.frombuffer(base64.b64decode(url.split(",", 1)[1]), np.uint8)
    image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    return image.shape[1], image.shape[0]


def _half_resolution_model() -> ServedModel:
    model = ServedModel.from_repository(ROOT / "model_repository")
    manifest = model.manifest.model_copy(update={"profile": {**model.manifest.profile, "image_size": 112}})
    return replace(model, manifest=manifest, field_size=224)


def _square_mask(size: int, box: tuple[int, int, int, int]) -> np.ndarray:
    mask = np.zeros((1, size, size), np.uint8)
    x, y, w, h = box
    mask[0, y : y + h, x : x + w] = 255
    return mask


def test_a_half_resolution_model_gets_the_small_field_and_people_the_full_one():
    model = _half_resolution_model()
    field = synth_field(2, seed=3).image
    prepared = prepare_array(field, model)
    assert prepared.original.shape == prepared.preprocessed.shape == (112, 112, 3)
    assert prepared.display.shape == (224, 224, 3) and np.array_equal(prepared.display, field)


def test_cells_are_reported_in_field_pixels():
    model = _half_resolution_model()
    prepared = prepare_array(synth_field(1, seed=4).image, model)
    mask = _square_mask(112, (10, 20, 30, 40))
    output = EnsembleOutput(np.array([[0.1, 0.2, 0.6, 0.1]], np.float32), np.zeros((1, 4), np.float32), mask,
                            np.zeros_like(mask))
    result = interpret(prepared, output, model)
    assert result.label == "Pre" and result.cell_count == 1
    (cell,) = result.cells
    (measured,) = split_cells(mask[0])[1]  # in the model's pixels
    assert cell.bbox == [2 * v for v in measured.bbox] and cell.area == 4 * measured.area
    assert cell.centroid == [round(2 * v, 1) for v in measured.centroid]


def test_overlays_are_drawn_at_the_field_size():
    display = synth_field(0, seed=5).image
    mask = _square_mask(112, (30, 30, 20, 20))[0]
    images = field_images(display, display[::2, ::2].copy(), mask, mask)
    assert _png_size(images.original) == _png_size(images.mask) == _png_size(images.attention) == (224, 224)
    assert _png_size(images.preprocessed) == (112, 112) and len(images.cells) == 1
