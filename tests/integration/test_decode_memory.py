"""Bounded memory under concurrency (issue 23, item 1): 16 hostile decodes at once grow a process by <= 1 GB.

Each decode within the limits costs up to ~280 MB (an RGB8 image at the 40 Mpx field budget); the
process-wide gate (``HYBRIDCN_DECODE_MEMORY_BYTES``, default 640 MiB) lets only as many run at once as
fit. Measured as the growth of ``ru_maxrss`` in a fresh interpreter.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import pytest

from tests.conftest import run_python

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
_BLOCK = 1 << 22


def zero_png(width: int, height: int, color_type: int = 2) -> bytes:
    """A valid PNG of zeros, a few hundred kB whatever its size (see tests/unit/test_decode_limits.py)."""
    total = (1 + width * {0: 1, 2: 3, 6: 4}[color_type]) * height
    compressor = zlib.compressobj(9)
    first = compressor.compress(bytes(_BLOCK)) + compressor.flush(zlib.Z_FULL_FLUSH)
    blocks, rest = divmod(total, _BLOCK)
    stream = first[:2] + first[2:] * blocks + zlib.compress(bytes(rest), 9)[2:-4]
    stream += struct.pack(">I", ((total % 65521) << 16) | 1)

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", stream) + chunk(b"IEND", b"")


_CHILD = r"""
import json, resource, sys
from concurrent.futures import ThreadPoolExecutor
from preprocessing import InvalidImageError, decode_image
from tests.conftest import run_python
paths = sys.argv[1:]
payloads = [open(p, "rb").read() for p in paths]
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

def one(data):
    try:
        return "x".join(map(str, decode_image(data).shape))
    except InvalidImageError as error:
        return error.code

with ThreadPoolExecutor(len(payloads)) as pool:
    outcomes = list(pool.map(one, payloads))
growth = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024 / 1e6
print(json.dumps({"outcomes": outcomes, "growth_mb": growth}))
"""


def _run(paths: list[Path], **env: str) -> dict:
    return run_python(_CHILD, *map(str, paths), timeout=300, **env)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("concurrent")
    made = {"largest_field": (8000, 5000, 2), "too_many_pixels": (8000, 8000, 2), "bomb": (20000, 20000, 0)}
    paths = {}
    for name, (width, height, color) in made.items():
        paths[name] = folder / f"{name}.png"
        paths[name].write_bytes(zero_png(width, height, color))
    return paths


def test_sixteen_concurrent_largest_fields_stay_within_1_gb(files):
    result = _run([files["largest_field"]] * 16)
    assert result["outcomes"] == ["5000x8000x3"] * 16
    assert result["growth_mb"] <= 1000, result


def test_sixteen_concurrent_hostile_uploads_stay_within_1_gb(files):
    mix = [files["largest_field"], files["too_many_pixels"], files["bomb"], files["largest_field"]] * 4
    result = _run(mix)
    assert sorted(set(result["outcomes"])) == ["5000x8000x3", "too_many_pixels"]
    assert result["growth_mb"] <= 1000, result


def test_the_decode_memory_is_configurable(files):
    # 300 MiB: one largest field at a time (each peaks at about 285 MB)
    result = _run([files["largest_field"]] * 6, HYBRIDCN_DECODE_MEMORY_BYTES=str(300 * 2**20))
    assert result["outcomes"] == ["5000x8000x3"] * 6
    assert result["growth_mb"] <= 340, result
