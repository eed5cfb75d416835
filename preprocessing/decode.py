"""Readers: bytes or files to 8-bit RGB arrays, with the checks an upload endpoint needs.

Memory is bounded before any pixel is decoded. The header alone gives the size, and an image is refused
when its pixel count is over ``max_pixels`` (``too_many_pixels``) or its decoded raster is over
``max_decoded_bytes`` (``too_large_decoded``): width x height x samples per pixel x bytes per sample, so
a 16-bit RGB TIFF counts 6 bytes a pixel and a float one 12. Only the first page of a multi-page TIFF
and the first frame of an animated PNG is read; the others are ignored, never decoded. Conversion to
RGB8 runs in blocks of rows (no full-size float or second full-size copy), so a decode costs about the
decoder's raster plus the RGB8 result (:attr:`ImageHeader.working_bytes`), and a process-wide gate
(:class:`DecodeMemoryGate`, ``HYBRIDCN_DECODE_MEMORY_BYTES``) keeps the sum over concurrent decodes
bounded: a decode waits while the ones running would leave too little. So that what a decode frees
goes back to the system, the first decode in a process fixes glibc's mmap threshold at 4 MiB (see
:func:`_return_freed_memory`; ``MALLOC_MMAP_THRESHOLD_`` in the environment takes precedence).
"""

from __future__ import annotations

import ctypes
import io
import os
import re
import sys
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, UnidentifiedImageError

from preprocessing.errors import InvalidImageError

#: Default pixel budget (width x height) for one field: 40 Mpx (e.g. 7300 x 5500), far above a microscope
#: field (224 px to a few thousand px a side), far below what a decompression bomb asks for.
DEFAULT_MAX_PIXELS = 40_000_000
SUPPORTED_FORMATS = ("JPEG", "PNG", "TIFF", "BMP")
#: The environment variable that sets the process-wide decode memory (bytes) shared by concurrent decodes.
DECODE_MEMORY_ENV = "HYBRIDCN_DECODE_MEMORY_BYTES"
#: Default of ``HYBRIDCN_DECODE_MEMORY_BYTES``: two decodes of the largest default field at once (an RGB
#: 40 Mpx one reserves 292 MB and peaks at 280 MB), any number of small ones (a 1 Mpx one reserves 19 MB).
DEFAULT_DECODE_MEMORY_BYTES = 640 * 2**20

#: Pixels converted per block of rows (a few MB of temporaries, whatever the image size).
_BLOCK_PIXELS = 1 << 18
#: Bytes a block of pixels costs in temporaries at most (crop, RGBA composite, their arrays) ...
_BLOCK_BYTES_PER_PIXEL = 32
#: ... and the decoder's own state, in a working-set estimate.
_DECODER_BYTES = 4 * 2**20
#: glibc's mmap threshold after the first decode: allocations from 4 MiB up are mapped and unmapped.
_MMAP_THRESHOLD = 4 * 2**20
_HIGH_DEPTH_GRAY = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
_ALPHA_MODES = ("RGBA", "LA", "PA")
_CONVERTED_MODES = ("P", "CMYK", "YCbCr", "LAB", "HSV")
#: (samples per pixel, bytes per sample) of a Pillow mode, as decoded.
_MODE_SAMPLES = {
    "1": (1, 1), "L": (1, 1), "P": (1, 1), "LA": (2, 1), "PA": (2, 1), "RGB": (3, 1), "YCbCr": (3, 1),
    "LAB": (3, 1), "HSV": (3, 1), "RGBA": (4, 1), "CMYK": (4, 1), "I;16": (1, 2), "I;16B": (1, 2),
    "I;16L": (1, 2), "I;16N": (1, 2), "I": (1, 4), "F": (1, 4),
}
#: Bytes per pixel Pillow holds in memory for a mode (three 8-bit samples are stored in four bytes).
_MODE_STORAGE = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2}
_ORIENTATIONS = {
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.swapaxes(0, 1),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: a[::-1, ::-1].swapaxes(0, 1),
    8: lambda a: np.rot90(a, 1),
}


def default_max_decoded_bytes(max_pixels: int) -> int:
    """The decoded-size budget when none is given: an RGB8 image at the pixel budget (3 bytes a pixel),
    and never more than at :data:`DEFAULT_MAX_PIXELS` (120 MB), whatever ``max_pixels`` a caller raises."""
    return 3 * min(max_pixels, DEFAULT_MAX_PIXELS)


@dataclass(frozen=True)
class ImageHeader:
    """What the header of an encoded image says, read without decoding a pixel (first page/frame only)."""

    format: str | None
    width: int
    height: int
    mode: str
    channels: int
    bytes_per_sample: int
    #: A TIFF with three or more samples over 8 bits, which tifffile (not Pillow) decodes.
    tiff_high_depth: bool = False

    @property
    def pixels(self) -> int:
        return self.width * self.height

    @property
    def decoded_bytes(self) -> int:
        """The decoded raster: width x height x samples per pixel x bytes per sample."""
        return self.pixels * self.channels * self.bytes_per_sample

    @property
    def working_bytes(self) -> int:
        """An upper bound of the memory :func:`decode_image` uses on this image.

        The decoder's raster (Pillow keeps three samples in four bytes) plus the 8-bit result (gray or
        RGB), then the result and its oriented copy, or gray and its RGB expansion, whichever is more,
        plus block buffers.
        """
        slack = _BLOCK_BYTES_PER_PIXEL * min(self.pixels, _BLOCK_PIXELS) + _DECODER_BYTES
        if self.tiff_high_depth:
            return self.decoded_bytes + 3 * self.pixels + slack
        gray = self.mode in ("L", "1") or self.mode in _HIGH_DEPTH_GRAY
        raster = self.pixels * _MODE_STORAGE.get(self.mode, 4)
        per_pixel_after = 4 if gray else 6
        return max(raster + (1 if gray else 3) * self.pixels, per_pixel_after * self.pixels) + slack


class DecodeMemoryGate:
    """Admits concurrent decodes while the sum of their working sets stays within ``capacity`` bytes.

    A decode that would pass the capacity waits for running ones to finish; one larger than the whole
    capacity waits until it runs alone. Decodes never nest, so waiting cannot deadlock.
    """

    def __init__(self, capacity: int) -> None:
        if capacity <= 0:
            raise ValueError(f"decode memory must be positive, got {capacity}")
        self.capacity = capacity
        self._used = 0
        self._condition = threading.Condition()

    @property
    def used(self) -> int:
        return self._used

    @contextmanager
    def reserve(self, nbytes: int) -> Iterator[None]:
        nbytes = max(0, min(int(nbytes), self.capacity))
        with self._condition:
            while self._used + nbytes > self.capacity:
                self._condition.wait()
            self._used += nbytes
        try:
            yield
        finally:
            with self._condition:
                self._used -= nbytes
                self._condition.notify_all()


_gate: DecodeMemoryGate | None = None
_gate_lock = threading.Lock()
_allocator_set = False


def _return_freed_memory() -> None:
    """Fix glibc's mmap threshold at 4 MiB, once per process (not where ``MALLOC_MMAP_THRESHOLD_`` is set).

    glibc maps large allocations and unmaps them when freed, but raises that threshold (up to 32 MiB) each
    time it unmaps one; from then on buffers below it come from the malloc arena of the thread that asked,
    and stay resident there after they are freed. With one arena per thread, 16 threads decoding large
    images kept about 0.5-1 GB this way (Pillow allocates images in 16 MiB blocks). A fixed threshold
    keeps every decode-sized buffer mapped, so freeing it returns it to the system. No-op off glibc.
    """
    global _allocator_set
    if _allocator_set:
        return
    _allocator_set = True
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(ctypes.c_int(-3), ctypes.c_int(_MMAP_THRESHOLD))  # -3: M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc (musl has no libc.so.6 / no mallopt)
        pass


def decode_memory_gate() -> DecodeMemoryGate:
    """The process-wide gate, sized by ``HYBRIDCN_DECODE_MEMORY_BYTES`` (default 640 MiB) on first use."""
    global _gate
    with _gate_lock:
        if _gate is None:
            raw = os.environ.get(DECODE_MEMORY_ENV, "").strip().replace("_", "")
            try:
                capacity = int(raw) if raw else DEFAULT_DECODE_MEMORY_BYTES
            except ValueError:
                capacity = 0
            if capacity <= 0:
                raise ValueError(f"{DECODE_MEMORY_ENV} must be a positive number of bytes, got {raw!r}")
            _gate = DecodeMemoryGate(capacity)
        return _gate


def probe_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageHeader:
    """The header of an encoded image (no pixel decoded); raises :class:`InvalidImageError` if unreadable."""
    if not data:
        raise InvalidImageError("empty", "the upload is empty (0 bytes)")
    image, header = _open(data, max_pixels)
    image.close()
    return header


def decode_image(
    data: bytes,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_side: int = 16,
    max_decoded_bytes: int | None = None,
    gate: DecodeMemoryGate | None = None,
) -> np.ndarray:
    """Decode an encoded JPEG/PNG/TIFF/BMP into an ``(H, W, 3)`` uint8 RGB array.

    EXIF orientation is applied; grayscale is replicated to three channels; alpha is composited on
    white; 16-bit and float data are rescaled to 8 bits by their own range. Pixel count and decoded
    size are read from the header and checked against ``max_pixels`` and ``max_decoded_bytes``
    (default :func:`default_max_decoded_bytes`) before any pixel is decoded, so a decompression bomb
    costs nothing; only the first page of a multi-page TIFF (first frame of an animation) is decoded.
    The decode waits its turn at ``gate`` (default :func:`decode_memory_gate`). Raises
    :class:`InvalidImageError` with a reason code.
    """
    if not data:
        raise InvalidImageError("empty", "the upload is empty (0 bytes)")
    image, header = _open(data, max_pixels)
    try:
        width, height = header.width, header.height
        if header.pixels > max_pixels:
            raise InvalidImageError(
                "too_many_pixels", f"image is {width}x{height} = {header.pixels} pixels, over the limit of {max_pixels}"
            )
        if header.format not in SUPPORTED_FORMATS:
            raise InvalidImageError(
                "unsupported_format",
                f"format {header.format!r} is not supported; send one of {', '.join(SUPPORTED_FORMATS)}",
            )
        budget = default_max_decoded_bytes(max_pixels) if max_decoded_bytes is None else max_decoded_bytes
        if header.decoded_bytes > budget:
            raise InvalidImageError(
                "too_large_decoded",
                f"image is {width}x{height} with {header.channels} samples of {header.bytes_per_sample} bytes = "
                f"{header.decoded_bytes} bytes decoded, over the limit of {budget} bytes",
            )
        gate = gate or decode_memory_gate()
        if not _allocator_set:
            with _gate_lock:
                _return_freed_memory()
        with gate.reserve(header.working_bytes):
            if not header.tiff_high_depth:
                _load(image, len(data))
            if min(width, height) < min_side:
                raise InvalidImageError("too_small", f"image is {width}x{height}; each side must be >= {min_side} px")
            if header.tiff_high_depth:
                image.close()
                return _read_tiff_high_depth(data)
            array = _pil_to_8bit(image)
            orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
            image.close()  # frees Pillow's raster before the copies below
            if orientation in _ORIENTATIONS:
                array = np.ascontiguousarray(_ORIENTATIONS[orientation](array))
            if array.ndim == 2:
                rgb = np.empty((*array.shape, 3), np.uint8)
                rgb[...] = array[..., None]
                array = rgb
            return np.ascontiguousarray(array)
    finally:
        image.close()


def read_image_file(
    path: str | Path, *, max_pixels: int = DEFAULT_MAX_PIXELS, max_decoded_bytes: int | None = None
) -> np.ndarray:
    """Read and decode one image file (see :func:`decode_image`)."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise InvalidImageError("unreadable", f"cannot read {path}: {exc.strerror or exc}") from exc
    return decode_image(data, max_pixels=max_pixels, max_decoded_bytes=max_decoded_bytes)


def to_uint8(array: np.ndarray) -> np.ndarray:
    """Rescale an integer or float array to uint8 by its dtype's range (floats by their own max).

    32- and 64-bit integers are scaled by their own max. Runs in blocks of rows: the only full-size
    allocation is the uint8 result.
    """
    array = np.asarray(array)
    if array.dtype == np.uint8:
        return array
    if array.dtype == bool:
        out = array.astype(np.uint8)  # not a view: Pillow's mode-1 arrays hold 255 for True
        out *= 255
        return out
    out = np.empty(array.shape, np.uint8)
    if array.size == 0:
        return out
    if np.issubdtype(array.dtype, np.integer):
        top = float(np.iinfo(array.dtype).max)
        if array.dtype.itemsize >= 4:
            top = float(max(int(array.max()), 1))
    else:
        top = _float_top(array)
    for rows in _row_blocks(array):
        out[rows] = _scale(array[rows], top)
    return out


# ---------------------------------------------------------------------------------------------- helpers

def _open(data: bytes, max_pixels: int) -> tuple[Image.Image, ImageHeader]:
    """Pillow's lazy image (header read, no pixel decoded) and what it says; TIFFs also through tifffile."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, SyntaxError) as exc:
        raise InvalidImageError(
            "not_an_image", f"not a readable JPEG/PNG/TIFF/BMP image ({len(data)} bytes)"
        ) from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        claimed = re.search(r"\((\d+) pixels\)", str(exc))
        size = f"{claimed.group(1)} pixels" if claimed else "too many pixels"
        raise InvalidImageError(
            "too_many_pixels", f"image header claims {size}, over the limit of {max_pixels} (decompression bomb?)"
        ) from exc
    except (OSError, ValueError) as exc:
        raise InvalidImageError("truncated", f"image data is corrupt or truncated: {exc}") from exc
    width, height = image.size
    channels, sample_bytes = _MODE_SAMPLES.get(image.mode, (4, 1))
    header = ImageHeader(image.format, width, height, image.mode, channels, sample_bytes)
    if image.format == "TIFF":
        header = _tiff_header(data, header)
    return image, header


def _tiff_header(data: bytes, header: ImageHeader) -> ImageHeader:
    """The first page's size, samples and sample type from tifffile (never reads the other pages)."""
    import tifffile

    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tif:
            page = tif.pages.first
            samples = int(page.samplesperpixel)
            bits = int(page.bitspersample)
            itemsize = page.dtype.itemsize if page.dtype is not None else max(1, -(-bits // 8))
            width, height, depth = int(page.imagewidth), int(page.imagelength), int(page.imagedepth or 1)
    except Exception:  # tifffile raises many types for broken files; Pillow's reading then decides
        return header
    if (width, height) != (header.width, header.height):
        return header
    return ImageHeader(
        header.format, width, height, header.mode,
        max(header.channels, samples * depth), max(header.bytes_per_sample, itemsize),
        tiff_high_depth=samples >= 3 and bits > 8,
    )


def _load(image: Image.Image, size: int) -> None:
    try:
        image.load()
    except (UnidentifiedImageError, SyntaxError) as exc:
        raise InvalidImageError("not_an_image", f"not a readable JPEG/PNG/TIFF/BMP image ({size} bytes)") from exc
    except (OSError, ValueError) as exc:
        raise InvalidImageError("truncated", f"image data is corrupt or truncated: {exc}") from exc


def _pil_blocks(image: Image.Image) -> Iterator[tuple[int, int, Image.Image]]:
    width, height = image.size
    rows = max(1, _BLOCK_PIXELS // max(width, 1))
    for top in range(0, height, rows):
        bottom = min(height, top + rows)
        yield top, bottom, image.crop((0, top, width, bottom))


def _pil_to_8bit(image: Image.Image) -> np.ndarray:
    """A loaded image as ``(H, W)`` gray or ``(H, W, 3)`` RGB uint8, converted block by block."""
    mode = image.mode
    width, height = image.size
    if mode in ("L", "1") or mode in _HIGH_DEPTH_GRAY:
        gray = np.empty((height, width), np.uint8)
        if mode in ("L", "1"):
            for top, bottom, block in _pil_blocks(image):
                gray[top:bottom] = to_uint8(np.asarray(block))
            return gray
        if mode == "I":
            top_value = float(max(int(image.getextrema()[1]), 1))
        elif mode == "F":
            top_value = max((_float_top(np.asarray(block)) for _, _, block in _pil_blocks(image)), default=1.0)
        else:
            top_value = 65535.0
        for top, bottom, block in _pil_blocks(image):
            gray[top:bottom] = _scale(np.asarray(block), top_value)
        return gray
    rgb = np.empty((height, width, 3), np.uint8)
    if mode == "RGB":
        for top, bottom, block in _pil_blocks(image):
            rgb[top:bottom] = np.asarray(block)
    elif mode in _ALPHA_MODES or (mode == "P" and "transparency" in image.info):
        for top, bottom, block in _pil_blocks(image):
            rgba = block.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            rgb[top:bottom] = np.asarray(Image.alpha_composite(background, rgba).convert("RGB"))
    elif mode in _CONVERTED_MODES:
        for top, bottom, block in _pil_blocks(image):
            rgb[top:bottom] = np.asarray(block.convert("RGB"))
    else:
        raise InvalidImageError("unsupported_mode", f"pixel mode {mode!r} is not supported")
    return rgb


def _row_blocks(array: np.ndarray) -> Iterator[slice]:
    per_row = max(1, int(np.prod(array.shape[1:], dtype=np.int64)))
    rows = max(1, _BLOCK_PIXELS // per_row)
    for top in range(0, array.shape[0], rows):
        yield slice(top, top + rows)


def _float_top(array: np.ndarray) -> float:
    """The scale of a float array: 1 if its finite-ised max is <= 1 (a [0, 1] image), else that max."""
    biggest = -np.inf
    with np.errstate(invalid="ignore"):
        for rows in _row_blocks(array):
            block = array[rows]
            if block.size:
                biggest = max(biggest, float(np.nan_to_num(block.astype(np.float64)).max()))
    return 1.0 if biggest <= 1.0 else biggest


def _scale(block: np.ndarray, top: float) -> np.ndarray:
    """One block to uint8: ``round(clip(value * 255 / top, 0, 255))``, NaN as 0, in float64."""
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        values = block.astype(np.float64)
        if not np.issubdtype(block.dtype, np.integer):
            values = np.nan_to_num(values, copy=False)
        values *= 255.0 / top
        np.clip(values, 0, 255, out=values)
        return values.round().astype(np.uint8)


def _read_tiff_high_depth(data: bytes) -> np.ndarray:
    """The first page of a TIFF with three or more samples over 8 bits, as RGB8 (other pages never read)."""
    import tifffile

    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tif:
            array = tif.pages.first.asarray(maxworkers=1)
    except Exception as exc:  # tifffile raises many types for broken files
        raise InvalidImageError("truncated", f"TIFF data is corrupt: {exc}") from exc
    if array.ndim == 3 and array.shape[0] in (3, 4) and array.shape[-1] not in (3, 4):
        array = np.moveaxis(array, 0, -1)
    if array.ndim != 3 or array.shape[-1] < 3:
        raise InvalidImageError("unsupported_mode", f"TIFF array of shape {array.shape} is not an RGB image")
    return to_uint8(array[..., :3])
