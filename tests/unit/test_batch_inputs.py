"""Input discovery: slide folders, folders of slides, CSV manifests, and large images cut into tiles."""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile

from batch.inputs import (
    DiscoveryOptions,
    InputError,
    TiffRegionReader,
    discover,
    folder_specs,
    openslide_available,
    tile_grid,
)
from batch.ledger import FIELD, SKIPPED, TILE
from batch.worker import OK, ReaderCache, prepare_one
from engine.model import ServedModel
from hybridcn.synth import synth_field
from preprocessing import field_qc

ROOT = Path(__file__).resolve().parents[2]
S = 224
# A 3 x 4 grid of smear fields (F) and blank glass (.), plus a white margin of 60 px right and 30 px below.
LAYOUT = ["F.FF", "..F.", "FF.F"]


def _write(path: Path, rgb: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    return path


def _field(i: int) -> np.ndarray:
    return synth_field(i % 4, seed=500 + i).image


def _smear(i: int) -> np.ndarray:
    """A synthetic field that the field QC does not call empty (some sparse synthetic fields are)."""
    for seed in range(700 + 50 * i, 750 + 50 * i):
        image = synth_field(i % 4, seed=seed).image
        if not field_qc(image).empty:
            return image
    raise AssertionError("no synthetic field with enough stain")


@pytest.fixture(scope="module")
def slide_image() -> np.ndarray:
    image = np.full((len(LAYOUT) * S + 30, len(LAYOUT[0]) * S + 60, 3), 255, np.uint8)
    for row, line in enumerate(LAYOUT):
        for col, cell in enumerate(line):
            if cell == "F":
                image[row * S : (row + 1) * S, col * S : (col + 1) * S] = _smear(row * 4 + col)
    return image


@pytest.fixture(scope="module")
def model() -> ServedModel:
    return ServedModel.from_repository(ROOT / "model_repository")


def test_tile_grid_covers_every_pixel_once_or_more_without_leaving_the_image():
    for width, height, tile in [(956, 702, 224), (224, 224, 224), (1000, 100, 224), (448, 673, 224), (5, 7, 3)]:
        tiles = tile_grid(width, height, tile)
        cover = np.zeros((height, width), np.int32)
        for x, y, w, h in tiles:
            assert 0 <= x and 0 <= y and x + w <= width and y + h <= height
            assert (w, h) == (min(tile, width), min(tile, height))
            cover[y : y + h, x : x + w] += 1
        assert cover.min() >= 1, (width, height, tile)
        assert len(set(tiles)) == len(tiles)
    assert tile_grid(956, 702, 224)[:5] == [(0, 0, 224, 224), (224, 0, 224, 224), (448, 0, 224, 224),
                                            (672, 0, 224, 224), (732, 0, 224, 224)]
    with pytest.raises(ValueError, match="positive"):
        tile_grid(0, 10, 224)


@pytest.mark.parametrize("kind", ["tiled-bigtiff", "strips", "png"])
def test_region_reads_match_the_image(tmp_path, slide_image, kind):
    from batch.inputs import open_region_reader

    if kind == "png":
        path = _write(tmp_path / "slide.png", slide_image)
    else:
        path = tmp_path / "slide.tif"
        layout = dict(tile=(128, 128), bigtiff=True) if kind == "tiled-bigtiff" else dict(rowsperstrip=50)
        tifffile.imwrite(path, slide_image, photometric="rgb", compression="zlib", **layout)
    reader = open_region_reader(path)
    try:
        assert (reader.width, reader.height) == (slide_image.shape[1], slide_image.shape[0])
        for x, y, w, h in [(0, 0, 224, 224), (100, 90, 224, 224), (732, 478, 224, 224), (3, 5, 1, 1)]:
            np.testing.assert_array_equal(reader.read(x, y, w, h), slide_image[y : y + h, x : x + w])
    finally:
        reader.close()
    if kind == "tiled-bigtiff":
        assert isinstance(reader, TiffRegionReader)


def test_a_large_image_is_tiled_with_coordinates_and_background_tiles_are_skipped(tmp_path, slide_image, model):
    assert model.field_size == S  # the shipped model's fields: the Taleqani fields' size
    path = tmp_path / "slide-7.tif"
    tifffile.imwrite(path, slide_image, photometric="rgb", compression="zlib", tile=(256, 256), bigtiff=True)
    specs = discover([path], DiscoveryOptions(tile_size=S))
    height, width = slide_image.shape[:2]
    assert {s.slide_id for s in specs} == {"slide-7"} and {s.kind for s in specs} == {TILE}
    assert [(s.x, s.y, s.width, s.height) for s in specs] == tile_grid(width, height, S)
    readers = ReaderCache()
    outcomes = {(s.x, s.y): prepare_one(i, s, model, readers) for i, s in enumerate(specs)}
    readers.close()
    for row, line in enumerate(LAYOUT):
        for col, cell in enumerate(line):
            outcome = outcomes[(col * S, row * S)]
            if cell == "F":
                assert outcome.status == OK, (row, col, outcome.error)
                # a field in scanner pixels, fitted to what the networks see
                assert outcome.prepared.preprocessed.shape == (model.image_size, model.image_size, 3)
            else:
                assert outcome.status == SKIPPED and "background" in outcome.error, (row, col)
    # the white right margin's column overlaps blank cells only in row 1 (". ." at the end): skipped
    assert outcomes[(width - S, S)].status == SKIPPED


def test_a_png_slide_and_tile_never(tmp_path, slide_image):
    path = _write(tmp_path / "big.png", slide_image)
    tiles = discover([path], DiscoveryOptions(tile_size=300))
    assert len(tiles) == len(tile_grid(slide_image.shape[1], slide_image.shape[0], 300))
    assert discover([path], DiscoveryOptions(tile="never")) == [
        type(tiles[0])("big", str(path.resolve()), FIELD)]


def test_folder_per_slide_and_folder_of_slides(tmp_path):
    for slide in ("S1", "S2", "P7/S3"):
        for i in range(3):
            _write(tmp_path / "queue" / slide / f"f{i}.png", _field(i))
    (tmp_path / "queue" / "S1" / "notes.txt").write_text("not an image")
    (tmp_path / "queue" / "S1" / ".hidden.png").write_bytes(b"x")
    os.symlink(tmp_path / "nowhere.png", tmp_path / "queue" / "S2" / "gone.png")  # kept: fails when processed
    one = discover([tmp_path / "queue" / "S1"], DiscoveryOptions())
    assert [(s.slide_id, Path(s.source).name, s.kind) for s in one] == [("S1", f"f{i}.png", FIELD) for i in range(3)]
    many = discover([tmp_path / "queue"], DiscoveryOptions())
    by_slide = {}
    for spec in many:
        by_slide.setdefault(spec.slide_id, []).append(Path(spec.source).name)
    assert by_slide == {"P7/S3": ["f0.png", "f1.png", "f2.png"], "S1": ["f0.png", "f1.png", "f2.png"],
                        "S2": ["f0.png", "f1.png", "f2.png", "gone.png"]}
    assert all(Path(s.source).is_absolute() for s in many)
    # the same folder twice is the same fields once
    assert len(discover([tmp_path / "queue" / "S1", tmp_path / "queue" / "S1"], DiscoveryOptions())) == 3


def test_an_image_too_large_for_a_field_is_tiled_in_auto_mode(tmp_path):
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (700, 800, 3), dtype=np.uint8)  # incompressible: > 1 MB as PNG
    _write(tmp_path / "S1" / "huge.png", noise)
    _write(tmp_path / "S1" / "small.png", _field(0))
    specs = folder_specs(tmp_path / "S1", DiscoveryOptions(max_field_pixels=500_000))
    assert {Path(s.source).name: s.kind for s in specs} == {"huge.png": TILE, "small.png": FIELD}
    assert sum(s.kind == TILE for s in specs) == len(tile_grid(800, 700, 224))
    assert {s.kind for s in folder_specs(tmp_path / "S1", DiscoveryOptions(tile="always"))} == {TILE}


def test_csv_manifest_with_files_and_folders(tmp_path):
    _write(tmp_path / "data" / "a.png", _field(0))
    _write(tmp_path / "data" / "b.jpg", _field(1))
    for i in range(2):
        _write(tmp_path / "data" / "slideC" / f"c{i}.png", _field(i))
    manifest = tmp_path / "data" / "queue.csv"
    manifest.write_text("slide_id,path\nA,a.png\nA,b.jpg\nC,slideC\n")
    specs = discover([manifest], DiscoveryOptions())
    assert [(s.slide_id, Path(s.source).name) for s in specs] == [("A", "a.png"), ("A", "b.jpg"), ("C", "c0.png"),
                                                                 ("C", "c1.png")]


def test_manifest_pixel_sizes_reach_every_field_and_size_the_tiles(tmp_path):
    _write(tmp_path / "a.png", _field(0))
    _write(tmp_path / "folder" / "b.png", _field(1))
    _write(tmp_path / "slide.png", np.random.default_rng(0).integers(0, 255, (900, 900, 3), dtype=np.uint8))
    manifest = tmp_path / "queue.csv"
    manifest.write_text("slide_id,path,pixel_size_um\nA,a.png,0.25\nB,folder,\nS,slide.png,0.5\n")
    options = DiscoveryOptions(tile="auto", max_field_pixels=500_000, pixel_size_um=0.3, training_pixel_size_um=0.25)
    specs = discover([manifest], options)
    assert {Path(s.source).name: s.pixel_size_um for s in specs} == {"a.png": 0.25, "b.png": 0.3, "slide.png": 0.5}
    tiles = [s for s in specs if s.kind == TILE]
    # at twice the training pixel size a training field is half as many slide pixels across
    assert {(s.width, s.height) for s in tiles} == {(112, 112)} and len(tiles) == len(tile_grid(900, 900, 112))
    assert options.tile_side(None) == 224 and DiscoveryOptions(pixel_size_um=0.5).tile_side(0.5) == 224
    manifest.write_text("slide_id,path,pixel_size_um\nA,a.png,-1\nA,a.png,big\n")
    with pytest.raises(InputError, match=r"line 2: pixel size -1 um is outside .*line 3: could not convert"):
        discover([manifest], DiscoveryOptions())


def test_manifest_problems_are_reported_with_line_numbers(tmp_path):
    manifest = tmp_path / "queue.csv"
    manifest.write_text("slide_id,path\nA,missing.png\n,x.png\n")
    with pytest.raises(InputError, match=r"line 2: .*missing.png does not exist.*line 3: slide_id and path"):
        discover([manifest], DiscoveryOptions())
    manifest.write_text("slide,file\nA,a.png\n")
    with pytest.raises(InputError, match="needs the columns slide_id,path"):
        discover([manifest], DiscoveryOptions())


def test_unusable_inputs_fail_before_anything_runs(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no-such-folder: no such file or folder"):
        discover([tmp_path / "no-such-folder", tmp_path / "empty"], DiscoveryOptions())
    with pytest.raises(InputError, match="holds no images"):
        discover([tmp_path / "empty"], DiscoveryOptions())
    (tmp_path / "broken.tif").write_bytes(b"II*\x00 definitely not a tiff")
    with pytest.raises(InputError, match="broken.tif: cannot read this slide image"):
        discover([tmp_path / "broken.tif"], DiscoveryOptions())
    with pytest.raises(InputError, match="no INPUT"):
        discover([], DiscoveryOptions())


def test_openslide_formats_say_what_to_install(tmp_path, monkeypatch, slide_image):
    """Without OpenSlide (an install without requirements.txt's pins), its formats name what to install,
    and a pyramidal TIFF, which OpenSlide would read, is read by tifffile."""
    import batch.inputs

    monkeypatch.setattr(batch.inputs, "openslide_available", lambda: False)
    (tmp_path / "scan.ndpi").write_bytes(b"\x00" * 64)
    with pytest.raises(InputError, match="need OpenSlide"):
        discover([tmp_path / "scan.ndpi"], DiscoveryOptions())
    path = tmp_path / "pyramid.tif"
    with tifffile.TiffWriter(path) as tif:
        for level in range(2):
            tif.write(slide_image[:: 2**level, :: 2**level], photometric="rgb", compression="zlib",
                      tile=(128, 128), subfiletype=level)
    assert not batch.inputs.is_whole_slide_tiff(path)
    reader = batch.inputs.open_region_reader(path)
    try:
        assert isinstance(reader, TiffRegionReader)
        np.testing.assert_array_equal(reader.read(100, 90, 224, 224), slide_image[90:314, 100:324])
    finally:
        reader.close()


@pytest.mark.skipif(not openslide_available(), reason="OpenSlide is not installed (requirements.txt pins it)")
def test_openslide_reads_pyramidal_tiffs_and_tifffile_the_rest(tmp_path, slide_image):
    from batch.inputs import OpenSlideRegionReader, is_whole_slide_tiff, open_region_reader

    pyramid, flat, strips = tmp_path / "pyramid.tif", tmp_path / "flat.tif", tmp_path / "strips.tif"
    with tifffile.TiffWriter(pyramid) as tif:
        for level in range(2):
            tif.write(slide_image[:: 2**level, :: 2**level], photometric="rgb", compression="zlib",
                      tile=(128, 128), subfiletype=level)
    tifffile.imwrite(flat, slide_image, photometric="rgb", compression="zlib", tile=(128, 128))
    tifffile.imwrite(strips, slide_image, photometric="rgb", rowsperstrip=50)
    assert [is_whole_slide_tiff(p) for p in (pyramid, flat, strips)] == [True, False, False]
    for path, kind in [(pyramid, OpenSlideRegionReader), (flat, TiffRegionReader), (strips, TiffRegionReader)]:
        reader = open_region_reader(path)
        try:
            assert isinstance(reader, kind), path.name
            np.testing.assert_array_equal(reader.read(732, 478, 224, 224), slide_image[478:702, 732:956])
        finally:
            reader.close()
    (tmp_path / "broken.svs").write_bytes(b"II*\x00 not a slide")
    assert not is_whole_slide_tiff(tmp_path / "broken.svs")
