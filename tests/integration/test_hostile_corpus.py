"""A hostile corpus made at test time (over 300 cases: truncated and mutated images, decompression bombs,
odd modes, polyglots, multipart and protocol tricks, raw sockets) against a gateway process of its own:
no server error, a ``code`` in every error, the process alive throughout, and its memory bounded
(<= 300 MB over its baseline for the corpus one request at a time, <= 1 GB for 16 bombs at once)."""

from __future__ import annotations

import io
import random
import socket
import struct
import zipfile
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest
import tifffile
from PIL import Image

from hybridcn.synth import synth_field
from tests.support import gateway_process

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
MB = 1 << 20


@dataclass
class Case:
    name: str
    files: list[tuple[str, tuple[str, bytes, str]]] = field(default_factory=list)
    path: str = "/v1/classify"
    data: dict[str, str] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)
    content: bytes | None = None
    method: str = "POST"


def _png(image: np.ndarray) -> bytes:
    ok, data = cv2.imencode(".png", image)
    assert ok
    return data.tobytes()


def _pil(image: Image.Image, kind: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, kind, **options)
    return buffer.getvalue()


def _tiff(array: np.ndarray, **options) -> bytes:
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, array, **options)
    return buffer.getvalue()


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def _png_header_bomb(width: int, height: int, bits: int = 8, colour: int = 2) -> bytes:
    """A valid PNG header claiming a huge image, with a small zlib stream of zeros."""
    ihdr = struct.pack(">IIBBBBB", width, height, bits, colour, 0, 0, 0)
    idat = zlib.compress(b"\0" * 100_000, 9)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def _jpeg_with_size(jpeg: bytes, width: int, height: int) -> bytes:
    """A JPEG whose SOF marker claims another size."""
    at = jpeg.find(b"\xff\xc0")
    return jpeg[: at + 5] + struct.pack(">HH", height, width) + jpeg[at + 9:]


def _field(seed: int) -> np.ndarray:
    return cv2.cvtColor(synth_field(seed % 4, seed=seed).image, cv2.COLOR_RGB2BGR)


def image_cases(rng: random.Random) -> Iterator[Case]:
    rgb = cv2.cvtColor(_field(5), cv2.COLOR_BGR2RGB)
    formats = {"png": (_png(_field(5)), "image/png"),
               "jpg": (_pil(Image.fromarray(rgb), "JPEG", quality=90), "image/jpeg"),
               "tif": (_tiff(rgb), "image/tiff"),
               "bmp": (_pil(Image.fromarray(rgb), "BMP"), "image/bmp")}
    for ext, (data, mime) in formats.items():
        for cut in sorted(rng.sample(range(1, len(data) - 1), 28)) + [0, len(data) // 2]:  # truncated
            yield Case(f"truncated-{ext}-{cut}", [("file", (f"t.{ext}", data[:cut], mime))])
        for i in range(24):  # mutated: random bytes flipped, a header field or the body
            mutated = bytearray(data)
            for _ in range(rng.choice([1, 4, 32])):
                mutated[rng.randrange(len(mutated))] = rng.randrange(256)
            yield Case(f"mutated-{ext}-{i}", [("file", (f"m.{ext}", bytes(mutated), mime))])
    png, jpeg = formats["png"][0], formats["jpg"][0]
    bombs = {
        "png-60000x60000": _png_header_bomb(60_000, 60_000),
        "png-16bit-20000x20000": _png_header_bomb(20_000, 20_000, bits=16),
        "png-1x100000000": _png_header_bomb(1, 100_000_000),
        "png-zero-size": _png_header_bomb(0, 0),
        "jpeg-65000x65000": _jpeg_with_size(jpeg, 65_000, 65_000),
        "jpeg-zero-size": _jpeg_with_size(jpeg, 0, 0),
        "tiff-16bit-8000x8000-deflate": _tiff(np.zeros((8000, 8000), np.uint16), compression="zlib"),
        "tiff-20-pages": _tiff(np.zeros((20, 2000, 2000), np.uint16), compression="zlib"),
        "tiff-float64-3000x3000": _tiff(np.zeros((3000, 3000, 3), np.float64), compression="zlib", photometric="rgb"),
        "png-8000x8000-flat": _png(np.zeros((8000, 8000, 3), np.uint8)),
        "zip-bomb-as-png": _zip_bomb(),
    }
    for name, data in bombs.items():
        yield Case(f"bomb-{name}", [("file", (f"b.{name.split('-')[0]}", data, "image/png"))])
    odd = {
        "gray": _png(cv2.cvtColor(_field(6), cv2.COLOR_BGR2GRAY)),
        "png16": _png(_field(6).astype(np.uint16) * 257),
        "rgba": _pil(Image.fromarray(rgb).convert("RGBA"), "PNG"),
        "palette": _pil(Image.fromarray(rgb).convert("P"), "PNG"),
        "1bit": _pil(Image.fromarray(rgb).convert("1"), "PNG"),
        "la": _pil(Image.fromarray(rgb).convert("LA"), "PNG"),
        "cmyk-jpeg": _pil(Image.fromarray(rgb).convert("CMYK"), "JPEG"),
        "float-tiff": _tiff(rgb.astype(np.float32) / 255, photometric="rgb"),
        "int32-tiff": _tiff(rgb.astype(np.int32) - 128, photometric="rgb"),
        "2x2": _png(_field(6)[:2, :2]),
        "1x4000": _png(np.full((1, 4000, 3), 200, np.uint8)),
        "4000x1": _png(np.full((4000, 1, 3), 200, np.uint8)),
        "all-white": _png(np.full((224, 224, 3), 255, np.uint8)),
        "all-black": _png(np.zeros((224, 224, 3), np.uint8)),
        "noise": _png(np.random.default_rng(1).integers(0, 256, (224, 224, 3), np.uint8)),
        "progressive-jpeg": _pil(Image.fromarray(rgb), "JPEG", progressive=True),
        "tiff-4-channels": _tiff(np.dstack([rgb, rgb[..., :1]])),
        "tiff-planar": _tiff(np.moveaxis(rgb, -1, 0), photometric="rgb", planarconfig="separate"),
    }
    for name, data in odd.items():
        yield Case(f"odd-{name}", [("file", (f"o.{'jpg' if 'jpeg' in name else 'tif' if 'tiff' in name else 'png'}",
                                             data, "application/octet-stream"))])
    polyglots = {
        "empty": b"", "one-byte": b"\x89", "html": b"<html><script>alert(1)</script></html>",
        "png-magic-then-html": b"\x89PNG\r\n\x1a\n<script>alert(1)</script>",
        "pdf": b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF", "svg": b"<svg onload=alert(1)></svg>",
        "gif": b"GIF89a" + b"\0" * 100, "webp-header": b"RIFF\x10\0\0\0WEBPVP8 " + b"\0" * 16,
        "elf": b"\x7fELF" + b"\0" * 60, "json": b'{"a": [1, 2, 3]}', "nul-bytes": b"\0" * 4096,
        "png-then-zip": png + _zip_bomb(), "jpeg-then-png": jpeg + png,
        "random-1k": rng.randbytes(1024), "random-100k": rng.randbytes(100_000),
        "tiff-magic-only": b"II*\0" + b"\xff" * 64, "bmp-header-lie": b"BM" + struct.pack("<I", 10**9) + b"\0" * 60,
        "jpeg-soi-only": b"\xff\xd8\xff", "png-iend-only": b"\x89PNG\r\n\x1a\n" + _chunk(b"IEND", b""),
        "utf16-text": "not an image".encode("utf-16"),
    }
    for name, data in polyglots.items():
        yield Case(f"polyglot-{name}", [("file", ("p.png", data, "image/png"))])


def _zip_bomb() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("zeros.png", b"\0" * (50 * MB))
    return buffer.getvalue()


def request_cases(rng: random.Random) -> Iterator[Case]:
    png = _png(_field(7))
    boundary = "XyZ"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.png\"\r\n"
            "Content-Type: image/png\r\n\r\n").encode() + png + f"\r\n--{boundary}--\r\n".encode()
    multipart = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    yield Case("two-files", [("file", ("a.png", png, "image/png")), ("file", ("b.png", png, "image/png"))])
    yield Case("wrong-field-name", [("image", ("a.png", png, "image/png"))])
    yield Case("no-file", data={"x": "1"})
    yield Case("no-filename", [("file", ("", png, "image/png"))])
    yield Case("path-traversal-filename", [("file", ("../../../etc/passwd", png, "image/png"))])
    yield Case("long-filename", [("file", ("a" * 5000 + ".png", png, "image/png"))])
    yield Case("unicode-filename", [("file", ("\u202eevil\u0000.png", png, "image/png"))])
    yield Case("content-type-lie", [("file", ("a.png", png, "text/html"))])
    yield Case("boundary-mismatch", content=body.replace(b"--XyZ--", b"--Other--"), headers=multipart)
    yield Case("no-closing-boundary", content=body[:-8], headers=multipart)
    yield Case("no-boundary-parameter", content=body, headers={"Content-Type": "multipart/form-data"})
    yield Case("huge-part-header", content=body.replace(b"Content-Type: image/png",
                                                        b"X-Pad: " + b"a" * 200_000), headers=multipart)
    yield Case("json-body", content=b'{"file": "x"}', headers={"Content-Type": "application/json"})
    yield Case("urlencoded-body", content=b"file=abc", headers={"Content-Type": "application/x-www-form-urlencoded"})
    yield Case("raw-png-body", content=png, headers={"Content-Type": "image/png"})
    yield Case("bad-content-length", content=body, headers={**multipart, "Content-Length": "abc"})
    yield Case("negative-content-length", content=body, headers={**multipart, "Content-Length": "-5"})
    yield Case("many-parts", content=b"".join(
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"f{i}\"\r\n\r\nx\r\n".encode() for i in range(3000))
        + f"--{boundary}--\r\n".encode(), headers=multipart)
    yield Case("nested-multipart", [("file", ("a.png", body, f"multipart/mixed; boundary={boundary}"))])
    yield Case("review-threshold-param", [("file", ("a.png", png, "image/png"))], data={"threshold": "nan"})
    for method in ("GET", "PUT", "DELETE", "PATCH", "TRACE", "PROPFIND"):
        yield Case(f"method-{method}", method=method)
    for path in ("/v1/classify/../../etc/passwd", "/v1/classify%00", "/" + "a" * 10_000, "/v1/jobs/" + "x" * 300,
                 "/v1/jobs/..%2F..%2Fetc%2Fpasswd/files/x", "/v1/jobs/%2e%2e/files/ledger.sqlite",
                 "/v1/jobs/abc/files/" + "%2F" * 300, "/static/../../pyproject.toml", "/%ff%fe",
                 "/v1/model?x=" + "y" * 8000):
        yield Case(f"path-{path[:30]}", path=path, method="GET")
    jobs = [("files", ("a.png", png, "image/png"))]
    yield Case("job-bad-slide-id", jobs, path="/v1/jobs", data={"slide_id": "../../etc"})
    yield Case("job-slide-id-script", jobs, path="/v1/jobs", data={"slide_id": "<script>alert(1)</script>"})
    yield Case("job-unsupported-type", [("files", ("a.exe", b"MZ" + b"\0" * 100, "application/x-msdownload"))],
               path="/v1/jobs")
    yield Case("job-no-files", path="/v1/jobs", data={"slide_id": "x"})
    yield Case("job-tile-not-bool", jobs, path="/v1/jobs", data={"tile": "maybe"})
    yield Case("job-too-many-files", [("files", (f"f{i}.png", png, "image/png")) for i in range(12)], path="/v1/jobs")
    yield Case("job-cross-site", jobs, path="/v1/jobs", headers={"Origin": "https://evil.example"})
    yield Case("classify-cross-site", [("file", ("a.png", png, "image/png"))],
               headers={"Origin": "https://evil.example", "Sec-Fetch-Site": "cross-site"})


RAW = [
    b"GARBAGE\r\n\r\n", b"GET / HTTP/9.9\r\n\r\n", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\0" * 64,
    b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"X-A: b\r\n" * 2000 + b"\r\n",
    b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Long: " + b"a" * 100_000 + b"\r\n\r\n",
    b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\nContent-Length: 20\r\n\r\n0123456789",
    b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n",
    b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Bad\x00Header: 1\r\n\r\n", b"\r\n" * 1000, b"GET\r\n\r\n",
    b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /readyz HTTP/1.1\r\nHost: x\r\n\r\n" * 20,
]


def _raw(port: int, payload: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        try:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
            received = b""
            while chunk := sock.recv(65536):
                received += chunk
        except OSError:  # the server closed on us: a fine answer to garbage
            return b""
    return received


def _memory_kb(pid: int, key: str) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(status.split(f"{key}:")[1].split()[0])


@pytest.fixture(scope="module")
def gateway(triton_server, tmp_path_factory):
    """A gateway in a process of its own (its memory is measured), on the session's Triton."""
    env = {"HYBRIDCN_TRITON_URL": triton_server.grpc_url, "HYBRIDCN_PREPROCESS_THREADS": "2",
           "HYBRIDCN_BATCH_JOBS_DIR": str(tmp_path_factory.mktemp("corpus-jobs")), "HYBRIDCN_MAX_JOB_FILES": "10",
           "HYBRIDCN_MAX_QUEUE": "64"}
    with gateway_process(env) as running:
        yield running


def test_hostile_corpus(gateway):
    process, base, port = gateway
    rng = random.Random(2026)
    cases = [*image_cases(rng), *request_cases(rng)]
    assert len(cases) + len(RAW) >= 300
    with httpx.Client(base_url=base, timeout=60) as client:
        warm = client.post("/v1/classify", files={"file": ("w.png", _png(_field(1)), "image/png")})
        assert warm.status_code == 200, warm.text
        baseline = _memory_kb(process.pid, "VmRSS")
        problems = []
        for case in cases:
            try:
                response = client.request(case.method, case.path, files=case.files or None, data=case.data or None,
                                          content=case.content, headers=case.headers)
            except httpx.HTTPError as error:  # a refused or cut connection is an answer too, never a crash
                assert process.poll() is None, f"{case.name}: the gateway died ({error})"
                continue
            if response.status_code >= 500:
                problems.append(f"{case.name}: {response.status_code} {response.text[:200]}")
            elif response.status_code >= 400 and "json" in response.headers.get("content-type", ""):
                if "code" not in response.json():
                    problems.append(f"{case.name}: {response.status_code} without a code: {response.text[:200]}")
        for payload in RAW:
            answer = _raw(port, payload)
            if answer.startswith(b"HTTP/1.1 5"):
                problems.append(f"raw {payload[:30]!r}: {answer[:100]!r}")
        assert problems == []
        assert process.poll() is None
        assert client.get("/healthz").status_code == 200
        assert client.post("/v1/classify", files={"file": ("w.png", _png(_field(2)), "image/png")}).status_code == 200
        sequential_peak = _memory_kb(process.pid, "VmHWM") - baseline

        # 16 bombs at once, each inside the documented limits (a 16-bit 8000x8000 TIFF of zeros, 40 Mpx PNGs)
        bombs = [_tiff(np.zeros((8000, 5000), np.uint16), compression="zlib"),
                 _png(np.zeros((6300, 6300, 3), np.uint8))]

        def send(i: int) -> int:
            return client.post("/v1/classify", files={"file": (f"b{i}.tif" if i % 2 == 0 else f"b{i}.png",
                                                              bombs[i % 2], "application/octet-stream")}).status_code

        with ThreadPoolExecutor(16) as pool:
            codes = list(pool.map(send, range(16)))
        assert all(code < 500 or code == 503 for code in codes), codes
        concurrent_peak = _memory_kb(process.pid, "VmHWM") - baseline
    assert process.poll() is None
    print(f"corpus: {len(cases) + len(RAW)} cases; gateway peak over baseline: sequential "
          f"{sequential_peak / 1024:.0f} MB, 16 bombs at once {concurrent_peak / 1024:.0f} MB; codes {codes}")
    assert sequential_peak <= 300 * 1024
    assert concurrent_peak <= 1024 * 1024
