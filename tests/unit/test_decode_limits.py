"""Bounded memory (issue 23, item 1): hostile images are refused from their header, or decoded within budget.

The hostile files are made at test time, small on disk: zlib streams of zeros built from one compressed
block repeated, so an 8000 x 8000 image costs kilobytes and milliseconds to write. Peak memory is the
growth of ``ru_maxrss`` in a fresh interpreter per case (the maximum is per process).
"""

from __future__ import annotations

import io
import json
import struct
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from batch.inputs import (
    DEFAULT_MAX_SLIDE_PIXELS,
    MAX_SLIDE_PIXELS_ENV,
    DiscoveryOptions,
    InputError,
    default_max_slide_pixels,
    discover,
)
from batch.options import BatchOptions
from preprocessing import InvalidImageError, decode_image
from preprocessing.decode import (
    DEFAULT_MAX_PIXELS,
    DecodeMemoryGate,
    default_max_decoded_bytes,
    probe_image,
    to_uint8,
)
from tests.conftest import run_python

ROOT = Path(__file__).resolve().parents[2]
#: The issue's bound for one request within the limits.
MAX_GROWTH_MB = 300
#: A refusal reads the header only: no raster is ever allocated.
REFUSAL_GROWTH_MB = 64
_BLOCK = 1 << 22


# -------------------------------------------------------------------------------------- hostile files

def zero_deflate(total: int) -> bytes:
    """A zlib stream of ``total`` zero bytes: one compressed 4 MiB block repeated (each ends in a full flush)."""
    compressor = zlib.compressobj(9)
    first = compressor.compress(bytes(_BLOCK)) + compressor.flush(zlib.Z_FULL_FLUSH)
    header, body = first[:2], first[2:]
    blocks, rest = divmod(total, _BLOCK)
    tail = zlib.compress(bytes(rest), 9)[2:-4]  # deflate blocks of the rest, the last one final
    return header + body * blocks + tail + struct.pack(">I", ((total % 65521) << 16) | 1)  # Adler-32 of zeros


def _chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def zero_png(width: int, height: int, color_type: int = 2, bit_depth: int = 8) -> bytes:
    """A valid PNG of zeros (color type 0 gray, 2 RGB, 6 RGBA), a few hundred kB whatever its size."""
    channels = {0: 1, 2: 3, 4: 2, 6: 4}[color_type]
    row = 1 + width * channels * bit_depth // 8
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zero_deflate(row * height))
            + _chunk(b"IEND", b""))


def zero_tiff(path: Path, width: int, height: int, *, samples: int = 1, dtype=np.uint16, pages: int = 1,
              strip: bool = False) -> Path:
    """A zlib TIFF of zeros: tiles of 512 px, or (``strip``) the whole page as one pre-compressed strip."""
    shape = (height, width) if samples == 1 else (height, width, samples)
    photometric = "rgb" if samples >= 3 else "minisblack"
    with tifffile.TiffWriter(path) as tif:
        for _ in range(pages):
            if strip:
                size = width * height * samples * np.dtype(dtype).itemsize
                tif.write(iter([zero_deflate(size)]), shape=shape, dtype=dtype, rowsperstrip=height,
                          compression="zlib", photometric=photometric, metadata=None)
            else:  # every tile the same pre-compressed bytes
                tile = zlib.compress(bytes(512 * 512 * samples * np.dtype(dtype).itemsize), 9)
                count = -(-height // 512) * -(-width // 512)
                tif.write((tile for _ in range(count)), shape=shape, dtype=dtype, tile=(512, 512),
                          compression="zlib", photometric=photometric, metadata=None)
    return path


# ----------------------------------------------------------------------------------- peak memory probe

_CHILD = r"""
import json, resource, sys
import tifffile  # imported once per process, not per request
from preprocessing import InvalidImageError, decode_image
from batch.inputs import DiscoveryOptions, InputError, discover
mode, path, kwargs = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
data = open(path, "rb").read() if mode == "decode" else None
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
result = {}
try:
    if mode == "decode":
        result["shape"] = list(decode_image(data, **kwargs).shape)
    else:
        result["tiles"] = len(discover([path], DiscoveryOptions(**kwargs)))
except InvalidImageError as error:
    result["code"] = error.code
except InputError as error:
    result["code"], result["message"] = "InputError", str(error)
result["growth_mb"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024 / 1e6
print(json.dumps(result))
"""


def peak(mode: str, path: Path, **kwargs) -> dict:
    """Run one decode (or discovery) in a fresh interpreter; its result and peak RSS growth in MB."""
    return run_python(_CHILD, mode, str(path), json.dumps(kwargs))


@pytest.fixture(scope="module")
def hostile(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("hostile")
    files = {
        "tiff16_8000": zero_tiff(folder / "tiff16_8000.tif", 8000, 8000),
        "tiff16_rgb_20_pages": zero_tiff(folder / "pages.tif", 1920, 1920, samples=3, pages=20),
        "tiff16_rgb_20mp": zero_tiff(folder / "rgb16.tif", 5000, 4000, samples=3),
    }
    for name, (width, height, color) in {"png_rgb_8000": (8000, 8000, 2), "png_gray_20000": (20000, 20000, 0),
                                         "png_rgb_40mp": (8000, 5000, 2)}.items():
        files[name] = folder / f"{name}.png"
        files[name].write_bytes(zero_png(width, height, color))
    return files


@pytest.mark.parametrize(
    ("name", "kwargs", "code"),
    [
        # the 376 kB TIFF: was +3.3 GB and 11.7 s inside the old 64 Mpx limit
        ("tiff16_8000", {}, "too_many_pixels"),
        ("tiff16_8000", {"max_pixels": 64_000_000}, "too_large_decoded"),  # 128 MB of 16-bit samples
        ("png_rgb_8000", {}, "too_many_pixels"),  # was +0.42 GB
        ("png_rgb_8000", {"max_pixels": 64_000_000}, "too_large_decoded"),  # 192 MB of RGB8
        ("png_gray_20000", {}, "too_many_pixels"),  # a decompression bomb: 390 kB -> 400 MB
    ],
)
def test_hostile_images_are_refused_from_the_header(hostile, name, kwargs, code):
    assert hostile[name].stat().st_size < 1_000_000
    result = peak("decode", hostile[name], **kwargs)
    assert result.get("code") == code, result
    assert result["growth_mb"] <= REFUSAL_GROWTH_MB, result


@pytest.mark.parametrize(
    ("name", "shape"),
    [
        ("tiff16_rgb_20_pages", [1920, 1920, 3]),  # was read whole (+443 MB) and refused: now its first page
        ("tiff16_rgb_20mp", [4000, 5000, 3]),  # 16-bit RGB at the decoded budget (120 MB of samples)
        ("png_rgb_40mp", [5000, 8000, 3]),  # RGB8 at the pixel budget: the largest default field
    ],
)
def test_images_within_the_limits_decode_within_300_mb(hostile, name, shape):
    result = peak("decode", hostile[name])
    assert result.get("shape") == shape, result
    assert result["growth_mb"] <= MAX_GROWTH_MB, result


def test_a_huge_png_slide_is_refused_at_discovery_before_any_decode(tmp_path):
    """The issue's 1 MB 16000 x 16000 PNG slide (was +2.75 GB and 5,184 tiles)."""
    path = tmp_path / "slide.png"
    path.write_bytes(zero_png(16000, 16000))
    started = time.perf_counter()
    with pytest.raises(InputError, match=r"768 MB decoded at once, over the limit of 120 MB; convert it to a tiled"):
        discover([path], DiscoveryOptions())
    with pytest.raises(InputError, match=r"256,000,000 pixels, over the slide budget of 100,000,000 .*"
                                         r"--max-slide-pixels or HYBRIDCN_MAX_SLIDE_PIXELS"):
        discover([path], DiscoveryOptions(max_slide_pixels=100_000_000))
    assert time.perf_counter() - started < 5
    result = peak("discover", path)
    assert result["code"] == "InputError" and result["growth_mb"] <= REFUSAL_GROWTH_MB, result


def test_slides_that_cannot_be_read_by_region_count_what_they_decode_whole(tmp_path):
    # one strip of 8000 x 8000 RGB8: 192 MB decoded at once, refused; a tiled one of the same size is read by region
    strip = zero_tiff(tmp_path / "strip.tif", 8000, 8000, samples=3, dtype=np.uint8, strip=True)
    with pytest.raises(InputError, match=r"read as a whole \(one strip, or planar\): 192 MB decoded at once, "
                                         r"over the limit of 120 MB"):
        discover([strip], DiscoveryOptions())
    tiled = zero_tiff(tmp_path / "tiled.tif", 8000, 8000, samples=3, dtype=np.uint8)
    result = peak("discover", tiled, tile_size=1000)
    assert result.get("tiles") == 64 and result["growth_mb"] <= REFUSAL_GROWTH_MB, result
    # a small PNG slide is still decoded whole and tiled
    small = tmp_path / "small.png"
    small.write_bytes(zero_png(2000, 1000))
    assert len(discover([small], DiscoveryOptions(tile_size=500))) == 8


# ---------------------------------------------------------------------------------- header and decode

def _tiff_bytes(pages: list[np.ndarray], **kwargs) -> bytes:
    buffer = io.BytesIO()
    with tifffile.TiffWriter(buffer) as tif:
        for page in pages:
            tif.write(page, **kwargs)
    return buffer.getvalue()


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_multipage_tiffs_decode_their_first_page_only(dtype):
    top = np.iinfo(dtype).max
    pages = [np.full((40, 50, 3), value, dtype) for value in (top, 0, top // 2)]
    decoded = decode_image(_tiff_bytes(pages, photometric="rgb"))
    assert decoded.shape == (40, 50, 3) and (decoded == 255).all()
    gray = decode_image(_tiff_bytes([p[..., 0] for p in pages[::-1]]))  # first page top // 2
    assert gray.shape == (40, 50, 3) and abs(int(gray[0, 0, 0]) - 127) <= 1


def test_animated_png_decodes_its_first_frame():
    frames = [Image.new("RGB", (40, 30), color) for color in ((200, 10, 10), (10, 200, 10), (10, 10, 200))]
    buffer = io.BytesIO()
    frames[0].save(buffer, "PNG", save_all=True, append_images=frames[1:], duration=100)
    decoded = decode_image(buffer.getvalue())
    assert decoded.shape == (30, 40, 3) and (decoded == (200, 10, 10)).all()


def test_the_decoded_size_counts_samples_and_their_bytes():
    rgb16 = _tiff_bytes([np.zeros((100, 120, 3), np.uint16)], photometric="rgb")
    header = probe_image(rgb16)
    assert (header.width, header.height, header.channels, header.bytes_per_sample) == (120, 100, 3, 2)
    assert header.decoded_bytes == 72_000 and header.tiff_high_depth
    assert probe_image(_tiff_bytes([np.zeros((100, 120), np.float32)])).decoded_bytes == 48_000
    assert probe_image(zero_png(120, 100, 0)).decoded_bytes == 12_000
    assert probe_image(zero_png(120, 100, 6)).decoded_bytes == 48_000
    assert decode_image(rgb16, max_decoded_bytes=72_000).shape == (100, 120, 3)
    with pytest.raises(InvalidImageError, match=r"too_large_decoded: image is 120x100 with 3 samples of 2 bytes = "
                                                r"72000 bytes decoded, over the limit of 71999 bytes"):
        decode_image(rgb16, max_decoded_bytes=71_999)
    # the default: RGB8 at the pixel budget, never above the default pixel budget's
    assert DEFAULT_MAX_PIXELS == 40_000_000
    assert default_max_decoded_bytes(1_000_000) == 3_000_000
    assert default_max_decoded_bytes(64_000_000) == default_max_decoded_bytes(DEFAULT_MAX_PIXELS) == 120_000_000
    with pytest.raises(InvalidImageError, match="too_large_decoded"):
        decode_image(zero_png(2000, 1000), max_pixels=1_000_000_000, max_decoded_bytes=5_000_000)


def test_to_uint8_in_blocks_matches_the_whole_array_formula():
    rng = np.random.default_rng(3)
    arrays = [
        rng.integers(0, 65536, (1500, 900), np.uint16),
        rng.integers(-50, 1_000_000, (1200, 1000), np.int32),
        rng.random((900, 1300, 3)).astype(np.float32) * 4,
    ]
    arrays[2][5, 5, 1] = np.nan
    for array in arrays:
        if np.issubdtype(array.dtype, np.integer):
            top = float(np.iinfo(array.dtype).max) if array.itemsize < 4 else float(max(int(array.max()), 1))
            expected = np.clip(array.astype(np.float64) * (255.0 / top), 0, 255).round().astype(np.uint8)
        else:
            finite = np.nan_to_num(array.astype(np.float64))
            top = 1.0 if finite.max() <= 1.0 else float(finite.max())
            expected = np.clip(finite * (255.0 / top), 0, 255).round().astype(np.uint8)
        np.testing.assert_array_equal(to_uint8(array), expected)
    assert to_uint8(np.array([[True, False]])).tolist() == [[255, 0]]


def test_the_memory_gate_bounds_concurrent_reservations():
    gate = DecodeMemoryGate(100)
    seen, lock = [], threading.Lock()

    def work(size: int) -> None:
        with gate.reserve(size):
            with lock:
                seen.append(gate.used)
            time.sleep(0.01)

    threads = [threading.Thread(target=work, args=(size,)) for size in [40, 40, 40, 70, 30, 500, 10] * 3]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert len(seen) == len(threads) and max(seen) <= 100 and gate.used == 0
    with pytest.raises(ValueError, match="positive"):
        DecodeMemoryGate(0)


# ------------------------------------------------------------------------------------ slide pixel budget

def test_the_slide_budget_is_read_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv(MAX_SLIDE_PIXELS_ENV, raising=False)
    assert default_max_slide_pixels() == DEFAULT_MAX_SLIDE_PIXELS == 4_000_000_000
    monkeypatch.setenv(MAX_SLIDE_PIXELS_ENV, "2_000_000")
    assert default_max_slide_pixels() == 2_000_000
    assert DiscoveryOptions().max_slide_pixels == 2_000_000
    assert BatchOptions(out_dir=tmp_path).max_slide_pixels == 2_000_000
    assert BatchOptions(out_dir=tmp_path, max_slide_pixels=5).max_slide_pixels == 5
    path = tmp_path / "slide.png"
    path.write_bytes(zero_png(2000, 1500))
    with pytest.raises(InputError, match="3,000,000 pixels, over the slide budget of 2,000,000"):
        discover([path], DiscoveryOptions())
    for bad in ("lots", "-3"):
        monkeypatch.setenv(MAX_SLIDE_PIXELS_ENV, bad)
        with pytest.raises(ValueError, match=MAX_SLIDE_PIXELS_ENV):
            default_max_slide_pixels()


def test_the_batch_command_takes_max_slide_pixels(monkeypatch, tmp_path):
    import argparse

    from batch.cli import add_batch_arguments

    monkeypatch.setenv(MAX_SLIDE_PIXELS_ENV, "7000000")
    parser = argparse.ArgumentParser()
    add_batch_arguments(parser, default_repository=tmp_path)
    assert parser.parse_args(["in", "--out", "o", "--max-slide-pixels", "123"]).max_slide_pixels == 123
    assert parser.parse_args(["in", "--out", "o"]).max_slide_pixels is None  # then BatchOptions reads the env
    assert "HYBRIDCN_MAX_SLIDE_PIXELS" in parser.format_help()
