"""Readers and discovery: what ``hybridcn batch INPUT...`` turns into a list of fields.

An INPUT is one of
- a folder per slide of field images (slide id = folder name);
- a folder of slide folders (slide id = the sub-folder's path below the INPUT, e.g. ``S1`` or ``P7/S1``);
- a CSV manifest with ``slide_id,path`` columns (a path is a field image or a folder of them; relative
  paths are read from the manifest's folder);
- a single large image (TIFF/BigTIFF, PNG, JPEG; with OpenSlide installed also ``.svs``, ``.ndpi``,
  ``.mrxs``...), cut into model-size tiles whose coordinates are kept (slide id = file stem).
  With OpenSlide installed, whole-slide images (the formats only it reads, a ``.svs/.tif/.tiff`` in a
  scanner's own format, and pyramidal tiled TIFFs) are read through it: it decodes their JPEG and
  JPEG 2000 tiles with its own libraries. Other TIFFs are read by tifffile.
Images inside folders and manifests are fields, like an upload to ``/v1/classify``, except ones over the
decoder's pixel budget, which are tiled. ``tile='always'`` tiles every image, ``'never'`` tiles none.

Tiles are read region by region (TIFF chunks decoded on demand, so a BigTIFF never sits in memory);
PNG, JPEG and BMP slides, and TIFFs stored as one strip, cannot be read by region: they are decoded
whole, once per worker process that reads their tiles.

Memory and work are bounded at discovery, from the header alone, before any pixel is decoded:
- a slide over ``max_slide_pixels`` (default 4 Gpx; ``HYBRIDCN_MAX_SLIDE_PIXELS``, ``--max-slide-pixels``)
  is refused with :class:`InputError`. Memory does not grow with a slide read by region, but the work
  and the tile list do: 4 Gpx is about 80,000 tiles of 224 px (27 MB of tile list, some 15 minutes at
  the 94 fields/s of ``bench/bench_batch.py``), a 40x scan of a 16 x 16 mm smear area;
- what cannot be read by region is refused above :data:`MAX_WHOLE_READ_BYTES` decoded (120 MB: an RGB8
  image of the decoder's 40 Mpx field budget), as are TIFFs whose strips or tiles are larger than that.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import cv2
import numpy as np

from batch.ledger import FIELD, TILE, FieldSpec
from preprocessing import InvalidImageError
from preprocessing.decode import DEFAULT_MAX_PIXELS, default_max_decoded_bytes, to_uint8
from preprocessing.scale import check_pixel_size

FIELD_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
TIFF_SUFFIXES = (".tif", ".tiff", ".svs")
OPENSLIDE_SUFFIXES = (".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide")
TILE_MODES = ("auto", "always", "never")
#: Images in folders larger than this on disk have their header read to decide whether to tile them.
_PROBE_BYTES = 1 << 20
#: The environment variable that sets the default slide pixel budget.
MAX_SLIDE_PIXELS_ENV = "HYBRIDCN_MAX_SLIDE_PIXELS"
#: Default slide pixel budget (width x height): see the module docstring.
DEFAULT_MAX_SLIDE_PIXELS = 4_000_000_000
#: Most bytes decoded at once from a slide that cannot be read by region (or one TIFF strip or tile):
#: the decoder's budget for a field, an RGB8 image of 40 Mpx.
MAX_WHOLE_READ_BYTES = default_max_decoded_bytes(DEFAULT_MAX_PIXELS)
_CONVERT_HINT = ("convert it to a tiled TIFF, which is read tile by tile (e.g. vips tiffsave IN OUT.tif --tile "
                 "--compression deflate --bigtiff)")


class InputError(ValueError):
    """An INPUT cannot be used (missing, unreadable, empty, a bad manifest); raised before any work."""


def default_max_slide_pixels() -> int:
    """The slide pixel budget: ``HYBRIDCN_MAX_SLIDE_PIXELS`` if set (``_`` allowed: ``8_000_000_000``), else 4 Gpx."""
    raw = os.environ.get(MAX_SLIDE_PIXELS_ENV, "").strip().replace("_", "")
    if not raw:
        return DEFAULT_MAX_SLIDE_PIXELS
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{MAX_SLIDE_PIXELS_ENV} must be a whole number of pixels, got {raw!r}") from None
    if value <= 0:
        raise ValueError(f"{MAX_SLIDE_PIXELS_ENV} must be positive, got {value}")
    return value


def openslide_available() -> bool:
    try:
        import openslide  # noqa: F401
    except (ImportError, OSError):  # OSError: the Python package without the OpenSlide library
        return False
    return True


def is_whole_slide_tiff(path: str | Path) -> bool:
    """Whether OpenSlide, not tifffile, should read this TIFF: a scanner's format, or a tiled pyramid.

    OpenSlide calls every tiled TIFF ``generic-tiff``; a single-level one is an ordinary large image,
    which tifffile reads without OpenSlide. A pyramid (levels as further tiled pages, as libvips and
    scanners write them) is a whole-slide image, whose tiles are usually JPEG: OpenSlide decodes those
    with its own libjpeg, tifffile only with the optional imagecodecs package.
    """
    if not openslide_available():
        return False
    import openslide

    try:
        vendor = openslide.OpenSlide.detect_format(str(path))
        if vendor is None:
            return False
        if vendor != "generic-tiff":
            return True
        with openslide.OpenSlide(str(path)) as slide:
            return slide.level_count > 1
    except (openslide.OpenSlideError, OSError):
        return False


# ---------------------------------------------------------------------------------------------- tiling

def tile_grid(width: int, height: int, tile: int) -> list[tuple[int, int, int, int]]:
    """``(x, y, w, h)`` tiles of side ``tile`` that cover a ``width`` x ``height`` image, row by row.

    Tiles do not overlap, except the last column and row, which are moved back to end at the image
    edge so that no tile needs padding; an image side shorter than ``tile`` gives tiles that short.
    """
    if width <= 0 or height <= 0 or tile <= 0:
        raise ValueError(f"need a positive image size and tile size, got {width}x{height}, tile {tile}")

    def starts(length: int) -> list[int]:
        if length <= tile:
            return [0]
        positions = list(range(0, length - tile + 1, tile))
        if positions[-1] + tile < length:
            positions.append(length - tile)
        return positions

    tw, th = min(tile, width), min(tile, height)
    return [(x, y, tw, th) for y in starts(height) for x in starts(width)]


# --------------------------------------------------------------------------------------------- readers

class TiffRegionReader:
    """Regions of a TIFF/BigTIFF's full-resolution page, decoding only the tiles or strips they touch."""

    def __init__(self, path: str | Path) -> None:
        import tifffile

        self._tif = tifffile.TiffFile(str(path))
        page = self._tif.pages[0]
        self._page = page
        self.width, self.height = int(page.imagewidth), int(page.imagelength)
        self._chunked = page.planarconfig == 1 and page.imagedepth == 1 and len(page.dataoffsets) > 1
        if page.is_tiled:
            self._chunk = (int(page.tilelength), int(page.tilewidth))
        else:
            self._chunk = (min(int(page.rowsperstrip or self.height), self.height), self.width)
        self._full: np.ndarray | None = None
        itemsize = page.dtype.itemsize if page.dtype is not None else max(1, -(-int(page.bitspersample) // 8))
        sample_bytes = int(page.samplesperpixel) * itemsize
        #: Bytes decoded at once: a strip or tile, or the whole page when it is one chunk (or planar).
        self.decode_bytes = (self._chunk[0] * self._chunk[1] * sample_bytes if self._chunked
                             else self.width * self.height * int(page.imagedepth or 1) * sample_bytes)
        self.description = "a strip or tile at a time" if self._chunked else "as a whole (one strip, or planar)"

    def _decode(self, index: int) -> tuple[np.ndarray, int, int]:
        page = self._page
        handle = self._tif.filehandle
        handle.seek(page.dataoffsets[index])
        data = handle.read(page.databytecounts[index])
        try:
            segment, indices, _ = page.decode(data, index, jpegtables=page.jpegtables)
        except Exception as error:  # tifffile raises many types; missing codecs among them
            raise InvalidImageError("unsupported_format", f"cannot decode TIFF chunk {index} "
                                    f"(compression {page.compression!r}): {error}; JPEG/JPEG2000 TIFFs need "
                                    "the imagecodecs package") from error
        if segment is None:
            raise InvalidImageError("truncated", f"TIFF chunk {index} is empty")
        return segment[0], int(indices[2]), int(indices[3])

    def read(self, x: int, y: int, width: int, height: int) -> np.ndarray:
        _check_whole_read(self, "TIFF")
        if not self._chunked:
            if self._full is None:
                self._full = _rgb8(self._page.asarray(maxworkers=1))
            return self._full[y : y + height, x : x + width]
        rows, cols = self._chunk
        per_row = -(-self.width // cols)
        out: np.ndarray | None = None
        for cy in range(y // rows, (y + height - 1) // rows + 1):
            for cx in range(x // cols, (x + width - 1) // cols + 1):
                segment, top, left = self._decode(cy * per_row + cx)
                if segment.ndim == 2:
                    segment = segment[..., None]
                if out is None:
                    out = np.zeros((height, width, segment.shape[-1]), segment.dtype)
                y0, y1 = max(y, top), min(y + height, top + segment.shape[0], self.height)
                x0, x1 = max(x, left), min(x + width, left + segment.shape[1], self.width)
                if y1 > y0 and x1 > x0:
                    out[y0 - y : y1 - y, x0 - x : x1 - x] = segment[y0 - top : y1 - top, x0 - left : x1 - left]
        return _rgb8(out)

    def close(self) -> None:
        self._tif.close()


class OpenSlideRegionReader:
    """Level-0 regions through OpenSlide (only when ``import openslide`` works), alpha composited on white."""

    def __init__(self, path: str | Path) -> None:
        import openslide

        self._slide = openslide.OpenSlide(str(path))
        self.width, self.height = (int(v) for v in self._slide.dimensions)
        self.decode_bytes = 0  # regions of the requested size only
        self.description = "region by region"

    def read(self, x: int, y: int, width: int, height: int) -> np.ndarray:
        region = np.asarray(self._slide.read_region((x, y), 0, (width, height)))
        return _rgb8(region)

    def close(self) -> None:
        self._slide.close()


class ArrayRegionReader:
    """A PNG/JPEG/BMP slide decoded once by OpenCV, then sliced; refused from its header alone if its RGB8
    image would be over :data:`MAX_WHOLE_READ_BYTES` (these formats cannot be read by region)."""

    def __init__(self, path: str | Path) -> None:
        self.width, self.height = image_size(path)
        self.decode_bytes = 3 * self.width * self.height
        self.description = "as a whole (PNG, JPEG and BMP cannot be read by region)"
        _check_whole_read(self, Path(path).suffix.lstrip(".").upper() or "image")
        data = np.fromfile(str(path), np.uint8)
        bgr = cv2.imdecode(data, cv2.IMREAD_COLOR)
        del data
        if bgr is None:
            raise InvalidImageError("not_an_image", f"{path} is not a readable PNG/JPEG/BMP image")
        self._rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB, dst=bgr)  # in place: one copy of the slide
        self.height, self.width = self._rgb.shape[:2]

    def read(self, x: int, y: int, width: int, height: int) -> np.ndarray:
        return self._rgb[y : y + height, x : x + width]

    def close(self) -> None:
        self._rgb = np.empty((0, 0, 3), np.uint8)


def _check_whole_read(reader, kind: str) -> None:
    if reader.decode_bytes > MAX_WHOLE_READ_BYTES:
        raise InvalidImageError(
            "too_large_decoded",
            f"this {kind} slide ({reader.width}x{reader.height}) is read {reader.description}: "
            f"{reader.decode_bytes / 1e6:.0f} MB decoded at once, over the limit of "
            f"{MAX_WHOLE_READ_BYTES / 1e6:.0f} MB; {_CONVERT_HINT}")


def _rgb8(array: np.ndarray) -> np.ndarray:
    """An image array as RGB8, alpha composited on white; converted in blocks of rows (no full-size float)."""
    array = to_uint8(np.asarray(array))
    if array.ndim == 2:
        array = array[..., None]
    channels = array.shape[-1]
    if channels == 3:
        return np.ascontiguousarray(array)
    out = np.empty((*array.shape[:2], 3), np.uint8)
    step = max(1, (1 << 20) // max(1, array.shape[1]))
    for top in range(0, array.shape[0], step):
        block = array[top : top + step]
        if channels in (2, 4):  # composite alpha on white, as decode_image does
            alpha = block[..., -1:].astype(np.float32) / 255.0
            color = block[..., :3] if channels == 4 else block[..., :1]
            out[top : top + step] = (color * alpha + 255.0 * (1 - alpha)).round().astype(np.uint8)
        else:
            out[top : top + step] = block[..., :3] if channels > 3 else block
    return out


def open_region_reader(path: str | Path):
    """The reader for a slide image: OpenSlide for whole-slide images, tifffile for other TIFFs, else OpenCV.

    By suffix, then, for ``.svs/.tif/.tiff``, by content (:func:`is_whole_slide_tiff`).
    """
    suffix = Path(path).suffix.lower()
    if suffix in OPENSLIDE_SUFFIXES and suffix not in TIFF_SUFFIXES:
        if not openslide_available():
            raise InvalidImageError("unsupported_format", f"{path}: {suffix} slides need OpenSlide "
                                    "(pip install openslide-python openslide-bin); TIFF, PNG and JPEG need nothing")
        return OpenSlideRegionReader(path)
    if suffix in TIFF_SUFFIXES:
        if is_whole_slide_tiff(path):
            return OpenSlideRegionReader(path)
        try:
            return TiffRegionReader(path)
        except InvalidImageError:
            raise
        except Exception as error:
            raise InvalidImageError("not_an_image", f"{path} is not a readable TIFF: {error}") from error
    return ArrayRegionReader(path)


def image_size(path: str | Path) -> tuple[int, int]:
    """``(width, height)`` from the header alone (no pixels decoded, no pixel-count limit)."""
    from PIL import BmpImagePlugin, Image, JpegImagePlugin, PngImagePlugin

    suffix = Path(path).suffix.lower()
    if suffix in TIFF_SUFFIXES or suffix in OPENSLIDE_SUFFIXES:
        reader = open_region_reader(path)
        try:
            return reader.width, reader.height
        finally:
            reader.close()
    with open(path, "rb") as handle:
        magic = handle.read(8)
    # The format's own class reads the header without Image.open's decompression-bomb refusal:
    # slides are far larger than any upload, and their pixels are never decoded here.
    plugin = {b"\x89PNG": PngImagePlugin.PngImageFile, b"\xff\xd8": JpegImagePlugin.JpegImageFile,
              b"BM": BmpImagePlugin.BmpImageFile}
    for prefix, cls in plugin.items():
        if magic.startswith(prefix):
            with cls(str(path)) as image:
                return image.size
    with Image.open(path) as image:
        return image.size


def check_decodable(path: str | Path) -> None:
    """Open a slide image and read its first tile, so that a missing codec fails before the queue starts."""
    reader = open_region_reader(path)
    try:
        reader.read(0, 0, min(64, reader.width), min(64, reader.height))
    finally:
        reader.close()


# ------------------------------------------------------------------------------------------- discovery

@dataclass(frozen=True)
class DiscoveryOptions:
    tile_size: int = 224
    tile: str = "auto"
    max_field_pixels: int = DEFAULT_MAX_PIXELS
    max_slide_pixels: int = field(default_factory=default_max_slide_pixels)
    pixel_size_um: float | None = None  # of every input without its own (a manifest's pixel_size_um column)
    training_pixel_size_um: float | None = None  # of the model's fields: with a pixel size, tiles cover a field

    def tile_side(self, pixel_size_um: float | None) -> int:
        """Tile side in slide pixels: the area of one training field when the slide's pixel size is known."""
        if pixel_size_um is None or self.training_pixel_size_um is None:
            return self.tile_size
        return max(16, round(self.tile_size * self.training_pixel_size_um / pixel_size_um))

    def __post_init__(self) -> None:
        if self.tile not in TILE_MODES:
            raise ValueError(f"tile mode must be one of {', '.join(TILE_MODES)}, got {self.tile!r}")
        if self.tile_size < 16:
            raise ValueError(f"tile size must be at least 16 px, got {self.tile_size}")
        if self.max_slide_pixels <= 0:
            raise ValueError(f"max_slide_pixels must be positive, got {self.max_slide_pixels}")


def slide_tiles(path: Path, slide_id: str, tile_size: int, *, max_slide_pixels: int | None = None,
                pixel_size_um: float | None = None) -> list[FieldSpec]:
    """One pending field per tile of a slide image; raises :class:`InputError` if it cannot be read.

    The slide's size comes from its header: one over ``max_slide_pixels`` (default
    :func:`default_max_slide_pixels`), or one that cannot be read by region and is over
    :data:`MAX_WHOLE_READ_BYTES` decoded, is refused before any pixel is decoded.
    """
    budget = default_max_slide_pixels() if max_slide_pixels is None else max_slide_pixels
    try:
        width, height = image_size(path)
    except (InvalidImageError, OSError, ValueError, SyntaxError) as error:
        raise InputError(f"{path}: cannot read this slide image: {error}") from error
    if width * height > budget:
        raise InputError(f"{path}: the slide is {width}x{height} = {width * height:,} pixels, over the slide budget of "
                         f"{budget:,} (raise it with --max-slide-pixels or {MAX_SLIDE_PIXELS_ENV})")
    try:
        check_decodable(path)  # refuses, from the header, what would be decoded whole over the limit
    except InvalidImageError as error:
        if error.code == "too_large_decoded":
            raise InputError(f"{path}: {error.message}") from error
        raise InputError(f"{path}: cannot read this slide image: {error}") from error
    except (OSError, ValueError, SyntaxError) as error:
        raise InputError(f"{path}: cannot read this slide image: {error}") from error
    return [FieldSpec(slide_id, str(path), TILE, x, y, w, h, pixel_size_um)
            for x, y, w, h in tile_grid(width, height, tile_size)]


def _is_image(name: str) -> bool:
    return Path(name).suffix.lower() in FIELD_SUFFIXES or Path(name).suffix.lower() in OPENSLIDE_SUFFIXES


def _too_big_for_a_field(path: Path, options: DiscoveryOptions) -> bool:
    try:
        if path.stat().st_size < _PROBE_BYTES:
            return False
        width, height = image_size(path)
    except Exception:  # an unreadable field is reported when it is processed
        return False
    return width * height > options.max_field_pixels


def image_specs(path: Path, slide_id: str, options: DiscoveryOptions, pixel_size_um: float | None = None
                ) -> list[FieldSpec]:
    """A field image of a folder or manifest: one field, or its tiles (see the module docstring)."""
    pixel_size_um = options.pixel_size_um if pixel_size_um is None else pixel_size_um
    tile = options.tile == "always" or (options.tile == "auto" and _too_big_for_a_field(path, options))
    if tile and path.is_file():
        return slide_tiles(path, slide_id, options.tile_side(pixel_size_um), max_slide_pixels=options.max_slide_pixels,
                           pixel_size_um=pixel_size_um)
    return [FieldSpec(slide_id, str(path), FIELD, pixel_size_um=pixel_size_um)]


def iter_folder_specs(root: Path, options: DiscoveryOptions) -> Iterator[FieldSpec]:
    """Every image below ``root``, as found (a folder of any size is never listed whole in memory)."""
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        images = sorted(f for f in files if _is_image(f) and not f.startswith("."))
        if not images:
            continue
        here = Path(directory)
        slide_id = root.name if here == root else here.relative_to(root).as_posix()
        for name in images:
            yield from image_specs(here / name, slide_id, options)


def folder_specs(root: Path, options: DiscoveryOptions) -> list[FieldSpec]:
    """Every image below ``root``; each folder that holds images directly is one slide."""
    return list(iter_folder_specs(root, options))


def manifest_specs(manifest: Path, options: DiscoveryOptions) -> list[FieldSpec]:
    """The fields of a ``slide_id,path[,pixel_size_um]`` CSV; every path is checked before anything runs.

    ``pixel_size_um`` (um per pixel, optional, blank for unknown) fits that row's images at the training
    scale: slides are cut into tiles that cover one training field each.
    """
    try:
        with open(manifest, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            columns = [c.strip() for c in reader.fieldnames or []]
            if "slide_id" not in columns or "path" not in columns:
                raise InputError(f"{manifest}: a manifest needs the columns slide_id,path; found {columns}")
            entries = [(line, {k.strip(): (v or "").strip() for k, v in row.items() if k})
                       for line, row in enumerate(reader, start=2)]
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise InputError(f"{manifest}: cannot read the manifest: {error}") from error
    specs: list[FieldSpec] = []
    problems = []
    for line, row in entries:
        slide_id, raw = row.get("slide_id", ""), row.get("path", "")
        if not slide_id or not raw:
            problems.append(f"line {line}: slide_id and path must both be set")
            continue
        try:
            pixel_size = check_pixel_size(row["pixel_size_um"]) if row.get("pixel_size_um") else None
        except ValueError as error:
            problems.append(f"line {line}: {error}")
            continue
        path = Path(raw).expanduser()
        path = (path if path.is_absolute() else manifest.parent / path).resolve()
        row_options = options if pixel_size is None else replace(options, pixel_size_um=pixel_size)
        if path.is_dir():
            found = [replace(s, slide_id=slide_id) for s in folder_specs(path, row_options)]
            if not found:
                problems.append(f"line {line}: folder {path} holds no images")
            specs.extend(found)
        elif path.is_file() and os.access(path, os.R_OK):
            specs.extend(image_specs(path, slide_id, row_options))
        else:
            problems.append(f"line {line}: {path} does not exist or is not readable")
    if problems:
        raise InputError(f"{manifest}: " + "; ".join(problems[:10]) + (" ..." if len(problems) > 10 else ""))
    if not specs:
        raise InputError(f"{manifest}: the manifest lists no fields")
    return specs


def check_inputs(inputs: Sequence[str | Path]) -> None:
    """:class:`InputError` naming every INPUT that does not exist or cannot be read (cheap: no listing)."""
    if not inputs:
        raise InputError("no INPUT given")
    problems = []
    for raw in inputs:
        path = Path(raw).expanduser()
        if not path.exists():
            problems.append(f"{raw}: no such file or folder")
        elif not os.access(path, os.R_OK) or (path.is_dir() and not os.access(path, os.X_OK)):
            problems.append(f"{raw}: permission denied")
    if problems:
        raise InputError("cannot read the inputs: " + "; ".join(problems))


def iter_discover(inputs: Sequence[str | Path], options: DiscoveryOptions) -> Iterator[FieldSpec]:
    """The fields of every INPUT as they are found (possibly repeated; the ledger keeps each once).

    Every INPUT is checked to exist and be readable before the first field is yielded; a folder without
    images or an unreadable slide raises :class:`InputError` when discovery reaches it, which a ledger
    registering the fields in one transaction turns into "nothing registered".
    """
    check_inputs(inputs)
    for raw in inputs:
        path = Path(raw).expanduser().resolve()
        if path.is_dir():
            found = False
            for spec in iter_folder_specs(path, options):
                found = True
                yield spec
            if not found:
                raise InputError(f"{raw}: the folder holds no images ({', '.join(FIELD_SUFFIXES)})")
        elif path.suffix.lower() == ".csv":
            yield from manifest_specs(path, options)
        elif options.tile == "never":
            yield FieldSpec(path.stem, str(path), FIELD, pixel_size_um=options.pixel_size_um)
        else:
            yield from slide_tiles(path, path.stem, options.tile_side(options.pixel_size_um),
                                   max_slide_pixels=options.max_slide_pixels, pixel_size_um=options.pixel_size_um)


def discover(inputs: Sequence[str | Path], options: DiscoveryOptions) -> list[FieldSpec]:
    """The fields of every INPUT, de-duplicated, or :class:`InputError` naming each unusable INPUT."""
    return list(dict.fromkeys(iter_discover(inputs, options)))
