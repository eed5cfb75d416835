"""Occlusion evidence (``engine.occlusion``): it finds the region a model's answer rests on, and only that."""

from __future__ import annotations

import base64

import cv2
import numpy as np
import pytest

from engine.occlusion import MIN_PEAK, margins, occlusion_evidence, windows
from engine.overlays import field_images
from hybridcn.synth import synth_field

SIZE = 112
REGION = (slice(60, 90), slice(20, 50))  # rows, columns the toy model reads


def _field() -> np.ndarray:
    field = np.full((SIZE, SIZE, 3), 225, np.uint8)
    field[REGION] = (120, 60, 150)  # a stained "cell" on a pale background
    field[10:30, 70:100] = (140, 80, 160)  # a second one the model ignores
    return field


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _reads_region(batch: np.ndarray) -> np.ndarray:
    """A toy model: class 2's logit grows with how dark REGION is; nothing else matters."""
    darkness = 255.0 - batch[:, REGION[0], REGION[1]].astype(np.float64).mean(axis=(1, 2, 3))
    logits = np.zeros((len(batch), 4))
    logits[:, 2] = darkness / 10.0
    return _softmax(logits).astype(np.float32)


def test_windows_cover_every_pixel_with_overlap():
    side, corners = windows(SIZE)
    covered = np.zeros((SIZE, SIZE), int)
    for y, x in corners:
        covered[y : y + side, x : x + side] += 1
    assert side == 28 and len(corners) == 49 and covered.min() >= 1
    assert windows(100)[1][-1] == (100 - windows(100)[0],) * 2  # the last window ends at the edge


def test_margins_are_the_logit_difference_over_the_temperature_and_stay_finite():
    logits = np.array([[2.0, 0.5, -1.0, 0.0]])
    for temperature in (1.0, 0.7):
        p = _softmax(logits / temperature)
        assert margins(p, 0)[0] == pytest.approx((2.0 - 0.5) / temperature)
    assert np.isfinite(margins(np.array([[1.0, 0.0, 0.0, 0.0]], np.float32), 0)).all()


def test_the_map_is_brightest_where_the_model_looks_and_dark_on_the_ignored_cell():
    field = _field()
    evidence = occlusion_evidence(_reads_region, field, _reads_region(field[None])[0], batch=16)
    shown = evidence.to_uint8().astype(float)
    assert evidence.label_index == 2 and evidence.peak >= MIN_PEAK and shown.max() == 255
    looked = np.zeros((SIZE, SIZE), bool)
    looked[REGION] = True
    assert shown[looked].mean() >= 4 * shown[~looked].mean()
    assert shown[10:30, 70:100].max() == 0  # hiding the ignored cell changes nothing
    # faithful: hiding the map's top tenth costs the answer more than hiding a tenth elsewhere
    fill = np.array([225, 225, 225], np.uint8)
    top = evidence.values >= np.quantile(evidence.values, 0.9)
    elsewhere = np.roll(top, 56, axis=1)
    hidden = np.stack([np.where(top[..., None], fill, field), np.where(elsewhere[..., None], fill, field)])
    after = margins(_reads_region(hidden), 2)
    assert evidence.base_margin - after[0] > 10 * (evidence.base_margin - after[1])


def test_a_model_that_ignores_the_field_gets_a_dark_map_not_stretched_noise():
    def constant(batch: np.ndarray) -> np.ndarray:
        noise = np.random.default_rng(len(batch)).normal(0, 1e-4, (len(batch), 4))
        return _softmax(np.array([[0.0, 3.0, 0.0, 0.0]]) + noise).astype(np.float32)

    field = _field()
    evidence = occlusion_evidence(constant, field, constant(field[None])[0])
    assert evidence.peak < MIN_PEAK and evidence.to_uint8().max() <= 5


def test_the_evidence_layer_is_drawn_at_the_field_size():
    display = synth_field(0, seed=5).image
    field = display[::2, ::2].copy()
    evidence = occlusion_evidence(_reads_region, field, _reads_region(field[None])[0])
    mask = np.zeros((SIZE, SIZE), np.uint8)
    images = field_images(display, field, mask, mask, evidence=evidence)
    rgba = cv2.imdecode(np.frombuffer(base64.b64decode(images.evidence.split(",", 1)[1]), np.uint8),
                        cv2.IMREAD_UNCHANGED)
    assert rgba.shape == (224, 224, 4) and images.evidence_peak == pytest.approx(evidence.peak, abs=1e-4)
    alpha = rgba[..., 3].astype(float)  # the heat layer's alpha grows with the value
    assert alpha[120:180, 40:100].mean() > 3 * alpha[20:60, 140:200].mean()
    assert field_images(display, field, mask, mask).evidence is None
