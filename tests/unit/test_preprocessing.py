"""Pure preprocessing functions: decoding and validation, Reinhard, CLAHE, multiscale, z-score, QC, watershed."""

from __future__ import annotations

import io

import cv2
import numpy as np
import pytest
import tifffile
from PIL import Image

from hybridcn.synth import synth_field
from preprocessing import (
    InvalidImageError,
    PreprocessConfig,
    StainReference,
    decode_image,
    enhance_field,
    field_qc,
    fit_field,
    fit_stain_reference,
    preprocess_field,
    reinhard_normalize,
    split_cells,
)
from preprocessing.contrast import clahe_lightness, multiscale_enhance
from preprocessing.normalize import fit_zscore, zscore
from preprocessing.stain import blank_corner, corner_box, flatten_background, foreground_mask, lab_statistics


@pytest.fixture(scope="module")
def field() -> np.ndarray:
    return synth_field(2, seed=7).image


def _pil_bytes(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "TIFF", "BMP"])
def test_decode_formats_give_rgb_uint8(field, fmt):
    decoded = decode_image(_pil_bytes(Image.fromarray(field), fmt))
    assert decoded.shape == field.shape and decoded.dtype == np.uint8
    tolerance = 12 if fmt == "JPEG" else 0
    assert np.abs(decoded.astype(int) - field.astype(int)).mean() <= tolerance


def test_decode_applies_exif_orientation():
    image = np.zeros((40, 80, 3), np.uint8)
    image[:, :40] = 255  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    decoded = decode_image(_pil_bytes(Image.fromarray(image), "JPEG", exif=exif))
    assert decoded.shape == (80, 40, 3)
    assert decoded[:40].mean() > 200 and decoded[40:].mean() < 50


def test_decode_grayscale_and_alpha():
    gray = decode_image(_pil_bytes(Image.fromarray(np.full((32, 32), 77, np.uint8)), "PNG"))
    assert gray.shape == (32, 32, 3) and (gray == 77).all()
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:16, :, 3] = 255  # top opaque red, bottom transparent -> white
    decoded = decode_image(_pil_bytes(Image.fromarray(rgba, "RGBA"), "PNG"))
    assert tuple(decoded[0, 0]) == (200, 0, 0)
    assert tuple(decoded[-1, -1]) == (255, 255, 255)


def test_decode_16bit_tiffs_rescale_to_8bit():
    gray16 = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, gray16)
    decoded = decode_image(buffer.getvalue())
    assert decoded.dtype == np.uint8 and decoded.shape == (64, 64, 3)
    assert decoded.max() == round(gray16.max() * 255 / 65535)
    rgb16 = np.stack([gray16, gray16 // 2, np.full_like(gray16, 65535)], axis=-1)
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, rgb16, photometric="rgb")
    decoded = decode_image(buffer.getvalue())
    assert decoded.shape == (64, 64, 3) and (decoded[..., 2] == 255).all()


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"", "empty"),
        (b"hello, this is text and not an image", "not_an_image"),
        (b"GIF89a" + b"\x00" * 64, "not_an_image"),
    ],
)
def test_decode_rejects_bad_input_with_a_code(data, code):
    with pytest.raises(InvalidImageError, match=code):
        decode_image(data)


def test_decode_rejects_truncated_jpeg(field):
    data = _pil_bytes(Image.fromarray(field), "JPEG")
    with pytest.raises(InvalidImageError, match="truncated"):
        decode_image(data[: len(data) // 2])


def test_decode_rejects_decompression_bomb_before_decoding():
    # a tiny PNG whose header claims 20000 x 20000 pixels
    bomb = _pil_bytes(Image.new("L", (20000, 20000)), "PNG", optimize=True)
    assert len(bomb) < 1_000_000
    with pytest.raises(InvalidImageError, match="too_many_pixels.*400000000"):
        decode_image(bomb, max_pixels=10_000_000)


def test_decode_rejects_tiny_images():
    medium = _pil_bytes(Image.new("L", (5000, 5000)), "PNG", optimize=True)
    with pytest.raises(InvalidImageError, match="too_many_pixels.*5000x5000"):
        decode_image(medium, max_pixels=1_000_000)
    with pytest.raises(InvalidImageError, match="too_small"):
        decode_image(_pil_bytes(Image.new("RGB", (8, 8)), "PNG"))


def test_fit_field_resizes_and_refuses_strips(field):
    assert fit_field(field, 224) is field
    wide = cv2.resize(field, (448, 300))
    assert fit_field(wide, 224).shape == (224, 224, 3)
    with pytest.raises(InvalidImageError, match="bad_aspect_ratio"):
        fit_field(np.zeros((50, 1000, 3), np.uint8), 224)


def test_reinhard_matches_target_foreground_statistics(field):
    reference = StainReference(mean=(150.0, 140.0, 120.0), std=(40.0, 8.0, 10.0))
    normalized = reinhard_normalize(field, reference)
    mean, std = lab_statistics(normalized, foreground_mask(field))
    np.testing.assert_allclose(mean, reference.mean, atol=2.5)
    np.testing.assert_allclose(std, reference.std, rtol=0.12, atol=1.5)


def test_reinhard_ignores_background_and_corner(field):
    reference = fit_stain_reference([field])
    altered = field.copy()
    background = ~foreground_mask(field)
    altered[background] = (250, 250, 250)  # different pale background, same cells
    rows, cols = corner_box(field.shape, corner_fraction=(0.12, 0.3))
    altered[rows, cols] = 0  # a black scale-bar box
    mean_a, _ = lab_statistics(field, foreground_mask(field))
    mean_b, _ = lab_statistics(altered, foreground_mask(altered))
    np.testing.assert_allclose(mean_a, mean_b, atol=3.0)
    a = reinhard_normalize(field, reference)
    b = reinhard_normalize(altered, reference)
    cells = foreground_mask(field) & foreground_mask(altered)
    assert np.abs(a[cells].astype(int) - b[cells].astype(int)).mean() < 4



def test_fixed_lightness_threshold_keeps_cells_exactly_when_background_is_repainted(field):
    # with the threshold fixed, a repainted (pale, grey) background cannot move which pixels are cells,
    # so Reinhard's map, and the cells' normalised pixels, are exactly the same
    reference = fit_stain_reference([field], lightness_threshold=200)
    cells = foreground_mask(field, lightness_threshold=200)
    altered = field.copy()
    altered[~cells] = (236, 236, 236)
    np.testing.assert_array_equal(foreground_mask(altered, lightness_threshold=200), cells)
    a = reinhard_normalize(field, reference, lightness_threshold=200)
    b = reinhard_normalize(altered, reference, lightness_threshold=200)
    np.testing.assert_array_equal(a[cells], b[cells])
    config = PreprocessConfig(stain_lightness_threshold=200, enhance=False)
    np.testing.assert_array_equal(enhance_field(field, reference, config)[cells],
                                  enhance_field(altered, reference, config)[cells])

def test_blank_corner_paints_only_the_box(field):
    marked = field.copy()
    rows, cols = corner_box(field.shape, corner_fraction=(0.12, 0.3))
    marked[rows, cols] = 0
    out = blank_corner(marked)
    assert out[rows, cols].std(axis=(0, 1)).max() == 0 and out[rows, cols].mean() > 150
    outside = np.ones(field.shape[:2], bool)
    outside[rows, cols] = False
    assert (out[outside] == marked[outside]).all()


def test_clahe_raises_local_contrast_of_a_flat_field():
    rng = np.random.default_rng(0)
    low = (120 + rng.integers(-6, 7, (128, 128, 1))).repeat(3, axis=2).astype(np.uint8)
    out = clahe_lightness(low, clip_limit=3.0, tile_grid=4)
    assert out.dtype == np.uint8 and out.shape == low.shape
    assert out.std() > low.std() * 1.5
    with pytest.raises(ValueError, match="clip_limit"):
        clahe_lightness(low, clip_limit=0)


def test_multiscale_enhance_keeps_flat_regions_and_boosts_edges():
    image = np.full((64, 64, 3), 128, np.uint8)
    image[:, 32:] = 90
    out = multiscale_enhance(image, amount=1.0)
    assert abs(int(out[5, 5, 0]) - 128) <= 1 and abs(int(out[5, 60, 0]) - 90) <= 1
    edge_contrast = int(out[32, 30, 0]) - int(out[32, 33, 0])
    assert edge_contrast > 38  # 38 = the original step
    with pytest.raises(ValueError, match="differ in length"):
        multiscale_enhance(image, sigmas=(1.0,), weights=(0.5, 0.5))


def test_zscore_properties():
    values = np.random.default_rng(1).normal(5, 3, (100, 4))
    z = zscore(values, axis=0)
    np.testing.assert_allclose(z.mean(axis=0), 0, atol=1e-5)
    np.testing.assert_allclose(z.std(axis=0), 1, atol=1e-4)
    assert np.isfinite(zscore(np.ones((10, 3)), axis=0)).all()
    mean, std = fit_zscore(values)
    assert mean.dtype == np.float32 and std.shape == (4,)
    with pytest.raises(ValueError, match="samples>=2"):
        fit_zscore(values[:1])


def test_preprocess_field_is_deterministic_uint8(field):
    reference = fit_stain_reference([field])
    config = PreprocessConfig()
    a = preprocess_field(field, size=224, reference=reference, config=config)
    b = preprocess_field(field, size=224, reference=reference, config=config)
    assert a.dtype == np.uint8 and a.shape == (224, 224, 3) and (a == b).all()


def test_field_qc_flags(field):
    assert field_qc(field).flags == [] or field_qc(field).flags == ["blurred"]
    empty = np.full((224, 224, 3), 238, np.uint8)
    assert "empty" in field_qc(empty).flags
    blurred = cv2.GaussianBlur(field, (0, 0), 6)
    assert field_qc(blurred).blurred
    white = np.full((224, 224, 3), 255, np.uint8)
    assert field_qc(white).overexposed


def test_watershed_splits_touching_cells():
    mask = np.zeros((100, 140), np.uint8)
    cv2.circle(mask, (45, 50), 25, 255, -1)
    cv2.circle(mask, (90, 50), 25, 255, -1)  # overlaps the first
    cv2.circle(mask, (125, 90), 6, 255, -1)  # a small separate cell
    labels, cells = split_cells(mask, min_area=30)
    assert len(cells) == 3
    assert labels.max() == 3 and labels.dtype == np.int32
    big = sorted(cells, key=lambda c: -c.area)[:2]
    assert abs(big[0].centroid[0] - big[1].centroid[0]) > 30
    assert split_cells(np.zeros((20, 20), np.uint8))[1] == []


# The fast paths below replace plain numpy expressions; each must give exactly what the plain one gives,
# because the shipped model was trained on the outputs of the plain ones.


def _random_fields(count: int = 6) -> list[np.ndarray]:
    rng = np.random.default_rng(3)
    fields = [synth_field(i % 4, seed=100 + i).image for i in range(count)]
    fields.append(rng.integers(0, 256, (64, 80, 3), dtype=np.uint8))  # every chroma value, odd shape
    return fields


def test_chroma_exceeds_equals_float_hypot_test():
    from preprocessing.stain import chroma_exceeds

    a, b = np.meshgrid(np.arange(256, dtype=np.uint8), np.arange(256, dtype=np.uint8), indexing="ij")
    lab = np.stack([np.zeros_like(a), a, b], axis=-1)
    for limit in (25, 30):
        expected = np.hypot(a.astype(np.float32) - 128.0, b.astype(np.float32) - 128.0) > limit
        assert np.array_equal(chroma_exceeds(lab, limit), expected)


@pytest.mark.parametrize("count", [1, 2, 7, 1000, 1001])
def test_channel_medians_equal_numpy_median(count):
    from preprocessing.stain import _channel_medians

    pixels = np.random.default_rng(count).integers(0, 256, (count, 3), dtype=np.uint8)
    assert np.array_equal(_channel_medians(pixels), np.median(pixels, axis=0))


def test_reinhard_lookup_table_equals_per_pixel_float_transfer():
    reference = StainReference(mean=(150.0, 140.0, 120.0), std=(30.0, 8.0, 6.0))
    for image in _random_fields():
        lab8 = cv2.cvtColor(image, cv2.COLOR_RGB2LAB)
        mean, std = lab_statistics(image, foreground_mask(image))
        scale = (np.asarray(reference.std) / np.maximum(std, 1.0)).astype(np.float32)
        lab = (lab8.astype(np.float32) - mean.astype(np.float32)) * scale + np.asarray(reference.mean, np.float32)
        expected = cv2.cvtColor(np.clip(lab, 0, 255).round().astype(np.uint8), cv2.COLOR_LAB2RGB)
        assert np.array_equal(reinhard_normalize(image, reference), expected)


def test_lab_statistics_equal_numpy_masked_mean_and_std():
    for image in _random_fields():
        mask = foreground_mask(image)
        selected = cv2.cvtColor(image, cv2.COLOR_RGB2LAB).reshape(-1, 3).astype(np.float64)[mask.reshape(-1)]
        mean, std = lab_statistics(image, mask)
        np.testing.assert_allclose(mean, selected.mean(axis=0), rtol=1e-10)
        np.testing.assert_allclose(std, selected.std(axis=0), rtol=1e-8)


def test_watershed_cell_measures_match_their_definitions():
    rng = np.random.default_rng(5)
    mask = np.zeros((160, 200), np.uint8)
    for _ in range(25):
        center = (int(rng.integers(0, 200)), int(rng.integers(0, 160)))
        cv2.circle(mask, center, int(rng.integers(3, 22)), 255, -1)
    labels, cells = split_cells(mask, min_area=30)
    assert cells and [c.label for c in cells] == list(range(1, len(cells) + 1))
    for cell in cells:
        ys, xs = np.nonzero(labels == cell.label)
        assert cell.area == len(xs) >= 30
        assert cell.bbox == (xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1)
        assert cell.centroid == (xs.mean(), ys.mean())
    assert set(np.unique(labels)) == {0, *range(1, len(cells) + 1)}


def test_flattened_background_makes_the_model_input_ignore_background_colour():
    config = PreprocessConfig(flatten_background=True)
    reference = StainReference(mean=(150.0, 140.0, 120.0), std=(30.0, 8.0, 6.0))
    field = synth_field(1, seed=11).image
    background = ~foreground_mask(field)
    recoloured = field.copy()
    recoloured[background] = np.clip(field[background].astype(int) + (-25, 10, 20), 0, 255).astype(np.uint8)
    plain = enhance_field(field, reference, PreprocessConfig())
    plain_recoloured = enhance_field(recoloured, reference, PreprocessConfig())
    flat = enhance_field(field, reference, config)
    flat_recoloured = enhance_field(recoloured, reference, config)
    cells = ~background
    changed = lambda a, b: float(np.abs(a[cells].astype(int) - b[cells].astype(int)).mean())  # noqa: E731
    assert changed(flat, flat_recoloured) < 0.25 * changed(plain, plain_recoloured)
    flattened = flatten_background(field, level=200)
    assert (flattened[background] == 200).all() and np.array_equal(flattened[cells], field[cells])


def test_clahe_over_cells_only_ignores_the_background_and_keeps_it():
    field = synth_field(2, seed=12).image
    cells = foreground_mask(field)
    flat = field.copy()
    flat[~cells] = (250, 250, 250)
    a = clahe_lightness(field, cells=cells)
    b = clahe_lightness(flat, cells=cells)
    assert np.abs(a[cells].astype(int) - b[cells].astype(int)).max() <= 2  # Lab round trip of the chroma only
    assert np.abs(a[~cells].astype(int) - field[~cells].astype(int)).max() <= 2  # background left as it was
    plain_a, plain_b = clahe_lightness(field), clahe_lightness(flat)
    assert np.abs(plain_a[cells].astype(int) - plain_b[cells].astype(int)).mean() > 1.0  # what it fixes


def test_the_preprocessing_steps_are_named_in_the_order_they_run():
    from preprocessing.pipeline import PreprocessConfig

    assert PreprocessConfig().steps() == ["scale bar blanked", "Reinhard", "CLAHE", "multiscale"]
    assert PreprocessConfig(enhance=False, blank_corner=False).steps() == ["Reinhard"]
