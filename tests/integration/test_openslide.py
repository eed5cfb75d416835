"""Whole-slide images through OpenSlide: a synthetic pyramidal tiled TIFF, read by OpenSlide, classified by
``hybridcn batch`` through the real embedded Triton.

The slide is a generic tiled TIFF (OpenSlide's ``generic-tiff`` format: level 0 and two halvings as tiled
pages), written by tifffile, named ``.tif``: that is what libvips and many scanners write, and what
:func:`batch.inputs.is_whole_slide_tiff` sends to OpenSlide. No vendor format is faked.
"""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

from batch.inputs import (
    DiscoveryOptions,
    OpenSlideRegionReader,
    TiffRegionReader,
    discover,
    is_whole_slide_tiff,
    open_region_reader,
    tile_grid,
)
from batch.ledger import DONE, LEDGER_FILE, SKIPPED, TILE, SQLiteLedger
from engine.model import ServedModel
from hybridcn.synth import synth_field
from preprocessing import field_qc

openslide = pytest.importorskip("openslide")  # pinned in requirements.txt; skipped only outside that venv

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
REPOSITORY = ROOT / "model_repository"
# Fields (F) and empty glass (.); the last column and row are glass, so the edge tiles, moved back over
# them to cover the margin, are glass too.
LAYOUT = ["F.F.", ".FF.", "...."]
MARGIN = (60, 30)  # right, below
GLASS = (238, 236, 242)  # a faintly tinted empty slide, not pure white


@pytest.fixture(scope="module")
def size() -> int:
    return ServedModel.from_repository(REPOSITORY).field_size


def _stained_field(seed: int, size: int) -> np.ndarray:
    """A synthetic field that the field QC does not call empty (some sparse synthetic fields are)."""
    for attempt in range(seed, seed + 50):
        image = synth_field(attempt % 4, seed=attempt, size=size).image
        if not field_qc(image).empty:
            return image
    raise AssertionError("no synthetic field with enough stain")


def _pyramid(image: np.ndarray, levels: int = 3) -> list[np.ndarray]:
    out = [image]
    for _ in range(levels - 1):
        out.append(np.ascontiguousarray(out[-1][::2, ::2]))
    return out


@pytest.fixture(scope="module")
def slide(tmp_path_factory, size) -> tuple[Path, np.ndarray]:
    rng = np.random.default_rng(3)
    height, width = len(LAYOUT) * size + MARGIN[1], len(LAYOUT[0]) * size + MARGIN[0]
    glass = np.array(GLASS, np.int16) + rng.integers(-2, 3, (height, width, 3))
    image = glass.clip(0, 255).astype(np.uint8)
    for row, line in enumerate(LAYOUT):
        for col, cell in enumerate(line):
            if cell == "F":
                image[row * size : (row + 1) * size, col * size : (col + 1) * size] = \
                    _stained_field(4000 + 100 * (row * 4 + col), size)
    path = tmp_path_factory.mktemp("wsi") / "smear-07.tif"
    with tifffile.TiffWriter(path) as tif:
        for level, pixels in enumerate(_pyramid(image)):
            tif.write(pixels, photometric="rgb", compression="zlib", tile=(256, 256),
                      subfiletype=1 if level else 0)  # 1: a reduced-resolution copy of level 0
    return path, image


def test_openslide_reads_the_pyramid_as_a_generic_tiled_tiff(slide):
    path, image = slide
    assert openslide.__library_version__  # the C library from openslide-bin loads
    assert openslide.OpenSlide.detect_format(str(path)) == "generic-tiff"
    with openslide.OpenSlide(str(path)) as wsi:
        assert wsi.level_count == 3
        assert wsi.dimensions == (image.shape[1], image.shape[0])
    assert is_whole_slide_tiff(path)
    reader = open_region_reader(path)
    pages = TiffRegionReader(path)  # tifffile's level 0, the same pixels by another decoder
    try:
        assert isinstance(reader, OpenSlideRegionReader)
        assert (reader.width, reader.height) == (image.shape[1], image.shape[0])
        for x, y, w, h in [(0, 0, 224, 224), (100, 90, 300, 200), (reader.width - 224, reader.height - 224, 224, 224),
                           (255, 255, 2, 2)]:
            region = reader.read(x, y, w, h)
            assert region.dtype == np.uint8 and region.shape == (h, w, 3)
            np.testing.assert_array_equal(region, pages.read(x, y, w, h))
            np.testing.assert_array_equal(region, image[y : y + h, x : x + w])
    finally:
        reader.close()
        pages.close()


def test_a_single_level_tiled_tiff_stays_with_tifffile(tmp_path, slide):
    """OpenSlide opens any tiled TIFF; one without a pyramid is an ordinary large image, no slide."""
    _, image = slide
    flat = tmp_path / "flat.tif"
    tifffile.imwrite(flat, image, photometric="rgb", compression="zlib", tile=(256, 256))
    assert openslide.OpenSlide.detect_format(str(flat)) == "generic-tiff"
    assert not is_whole_slide_tiff(flat)
    reader = open_region_reader(flat)
    try:
        assert isinstance(reader, TiffRegionReader)
    finally:
        reader.close()


def test_hybridcn_batch_classifies_the_fields_of_the_slide_and_skips_the_glass(slide, size, triton_server, tmp_path):
    path, image = slide
    height, width = image.shape[:2]
    grid = tile_grid(width, height, size)
    assert [(s.x, s.y, s.width, s.height) for s in discover([path], DiscoveryOptions(tile_size=size))] == grid
    fields = {(col * size, row * size) for row, line in enumerate(LAYOUT) for col, cell in enumerate(line)
              if cell == "F"}

    out = tmp_path / "out"
    command = [sys.executable, "-m", "hybridcn.cli", "batch", str(path), "--out", str(out),
               "--triton", triton_server.grpc_url, "--workers", "1", "--progress", "log", "--gallery", "1"]
    finished = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-2000:]

    with SQLiteLedger(out / LEDGER_FILE, readonly=True) as ledger:
        rows = ledger.rows()
    assert sorted((r.spec.x, r.spec.y, r.spec.width, r.spec.height) for r in rows) == sorted(grid)
    status = {(r.spec.x, r.spec.y): r.status for r in rows}
    assert {xy for xy, s in status.items() if s == DONE} == fields
    assert {xy for xy, s in status.items() if s == SKIPPED} == {(x, y) for x, y, _, _ in grid} - fields

    with open(out / "results.csv", newline="") as handle:
        results = list(csv.DictReader(handle))
    assert {(int(r["tile_x"]), int(r["tile_y"])) for r in results} == fields
    assert {(r["slide_id"], r["kind"], r["status"], r["tile_w"], r["tile_h"]) for r in results} == \
        {("smear-07", TILE, DONE, str(size), str(size))}
    with open(out / "slides.csv", newline="") as handle:
        (summary,) = list(csv.DictReader(handle))
    assert (summary["done"], summary["background_skipped"]) == (str(len(fields)), str(len(grid) - len(fields)))
