"""Readers: bytes or files to 8-bit RGB arrays, with the checks an upload endpoint needs."""

from __future__ import annotations

import io
import re
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from preprocessing.errors import InvalidImageError

#: Default pixel budget (width x height) for one decoded upload: 64 Mpx, far above a field,
#: far below what a decompression bomb asks for.
DEFAULT_MAX_PIXELS = 64_000_000
SUPPORTED_FORMATS = ("JPEG", "PNG", "TIFF", "BMP")


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, min_side: int = 16) -> np.ndarray:
    """Decode an encoded JPEG/PNG/TIFF/BMP into an ``(H, W, 3)`` uint8 RGB array.

    EXIF orientation is applied; grayscale is replicated to three channels; alpha is composited on
    white; 16-bit and float data are rescaled to 8 bits by their own range. The pixel count is read
    from the header and checked against ``max_pixels`` before any pixel is decoded, so a
    decompression bomb costs nothing. Raises :class:`InvalidImageError` with a reason code.
    """
    if not data:
        raise InvalidImageError("empty", "the upload is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise InvalidImageError(
                    "too_many_pixels",
                    f"image is {width}x{height} = {width * height} pixels, over the limit of {max_pixels}",
                )
            if image.format not in SUPPORTED_FORMATS:
                raise InvalidImageError(
                    "unsupported_format",
                    f"format {image.format!r} is not supported; send one of {', '.join(SUPPORTED_FORMATS)}",
                )
            image.load()
    except InvalidImageError:
        raise
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
    if min(width, height) < min_side:
        raise InvalidImageError("too_small", f"image is {width}x{height}; each side must be >= {min_side} px")
    if image.format == "TIFF" and _is_multichannel_high_depth(image):
        array = _read_tiff_high_depth(data)
    else:
        image = ImageOps.exif_transpose(image)
        array = _pil_to_rgb8(image)
    return np.ascontiguousarray(array)


def read_image_file(path: str | Path, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read and decode one image file (see :func:`decode_image`)."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise InvalidImageError("unreadable", f"cannot read {path}: {exc.strerror or exc}") from exc
    return decode_image(data, max_pixels=max_pixels)


def to_uint8(array: np.ndarray) -> np.ndarray:
    """Rescale an integer or float array to uint8 by its dtype's range (floats by their own max)."""
    if array.dtype == np.uint8:
        return array
    if array.dtype == bool:
        return array.astype(np.uint8) * 255
    if np.issubdtype(array.dtype, np.integer):
        top = float(np.iinfo(array.dtype).max)
        if array.dtype in (np.int32, np.uint32, np.int64, np.uint64):
            top = float(max(int(array.max()), 1))
        return np.clip(array.astype(np.float64) * (255.0 / top), 0, 255).round().astype(np.uint8)
    with np.errstate(invalid="ignore", divide="ignore"):
        finite = np.nan_to_num(array.astype(np.float64))
        top = 1.0 if finite.max() <= 1.0 else float(finite.max())
        return np.clip(finite * (255.0 / top), 0, 255).round().astype(np.uint8)


def _pil_to_rgb8(image: Image.Image) -> np.ndarray:
    mode = image.mode
    if mode in ("RGB",):
        return np.asarray(image)
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(background, rgba).convert("RGB"))
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        gray = to_uint8(np.asarray(image))
        return np.repeat(gray[..., None], 3, axis=2)
    if mode == "1":
        return np.repeat((np.asarray(image).astype(np.uint8) * 255)[..., None], 3, axis=2)
    if mode in ("L", "P", "CMYK", "YCbCr", "LAB", "HSV"):
        return np.asarray(image.convert("RGB"))
    raise InvalidImageError("unsupported_mode", f"pixel mode {mode!r} is not supported")


def _is_multichannel_high_depth(image: Image.Image) -> bool:
    bits = image.tag_v2.get(258) if hasattr(image, "tag_v2") else None
    if isinstance(bits, tuple | list):
        return len(bits) >= 3 and max(bits) > 8
    return False


def _read_tiff_high_depth(data: bytes) -> np.ndarray:
    import tifffile

    try:
        array = tifffile.imread(io.BytesIO(data))
    except Exception as exc:  # tifffile raises many types for broken files
        raise InvalidImageError("truncated", f"TIFF data is corrupt: {exc}") from exc
    if array.ndim == 3 and array.shape[0] in (3, 4) and array.shape[-1] not in (3, 4):
        array = np.moveaxis(array, 0, -1)
    if array.ndim != 3 or array.shape[-1] < 3:
        raise InvalidImageError("unsupported_mode", f"TIFF array of shape {array.shape} is not an RGB image")
    return to_uint8(array[..., :3])
