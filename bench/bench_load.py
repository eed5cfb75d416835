"""Gateway under load, loopback only and bounded in time: throughput and latency at several client counts.

Starts ``hybridcn serve`` (embedded Triton + gateway) on free 127.0.0.1 ports, then for each client count
runs that many concurrent clients posting synthetic fields for ``--seconds``. Admission control answers
what does not fit with 503 ``overloaded`` at once; the JSON gives, per level, admitted requests/s, the
latency of admitted requests (p50, p99), how many were turned away and how fast (p99), and the
throughput at the largest level as a share of the smallest (the goal: >= 0.95). Usage:
``python bench/bench_load.py [--clients 64 256] [--seconds 20]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine.triton_server import free_port, wait_until  # noqa: E402
from hybridcn.synth import synth_field  # noqa: E402


def payloads(count: int = 16) -> list[bytes]:
    return [cv2.imencode(".png", cv2.cvtColor(synth_field(i % 4, seed=2000 + i).image, cv2.COLOR_RGB2BGR))[1]
            .tobytes() for i in range(count)]


def quantile(values: list[float], q: float) -> float | None:
    return round(float(np.quantile(values, q)) * 1000, 1) if values else None


async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> tuple[int, float]:
    """One request on a kept-alive connection; returns (status, retry-after seconds)."""
    writer.write(request)
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
    await reader.readexactly(int(headers.get("content-length", "0")))
    return int(lines[0].split()[1]), float(headers.get("retry-after", "0") or 0)


async def level(port: int, clients: int, seconds: float, bodies: list[bytes]) -> dict:
    """``clients`` keep-alive connections posting in a loop; a raw HTTP/1.1 client, so that the load
    generator (on the same cores as the server) spends as little CPU as it can."""
    requests = [b"POST /v1/classify HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\n"
                b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body for body in bodies]
    admitted: list[float] = []
    refused: list[float] = []
    errors = 0
    deadline = time.monotonic() + seconds

    async def client(index: int) -> None:
        nonlocal errors
        turn, connection = index, None
        while time.monotonic() < deadline:
            try:
                connection = connection or await asyncio.open_connection("127.0.0.1", port)
                started = time.monotonic()
                status, retry = await _exchange(*connection, requests[turn % len(requests)])
            except (OSError, asyncio.IncompleteReadError, ValueError):
                errors += 1
                connection = None
                continue
            elapsed = time.monotonic() - started
            if status == 200:
                admitted.append(elapsed)
            elif status == 503:
                refused.append(elapsed)
                await asyncio.sleep(retry)  # a well-behaved client honours Retry-After
            else:
                errors += 1
            turn += clients
        if connection:
            connection[1].close()

    started = time.monotonic()
    await asyncio.gather(*(client(i) for i in range(clients)))
    wall = time.monotonic() - started
    return {"clients": clients, "seconds": round(wall, 1), "admitted_per_s": round(len(admitted) / wall, 2),
            "admitted": len(admitted), "admitted_p50_ms": quantile(admitted, 0.5),
            "admitted_p99_ms": quantile(admitted, 0.99), "refused": len(refused),
            "refused_p99_ms": quantile(refused, 0.99), "errors": errors}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args()
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "hybridcn.cli", "serve", "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        def ready() -> bool:
            try:
                return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(ready, timeout_s=180, interval_s=0.5)
        bodies = payloads()
        asyncio.run(level(port, 8, 3.0, bodies))  # warm-up
        levels = [asyncio.run(level(port, clients, args.seconds, bodies)) for clients in args.clients]
    finally:
        os.killpg(server.pid, signal.SIGINT)
        server.wait(timeout=60)
    first, last = levels[0], levels[-1]
    print(json.dumps({
        "levels": levels,
        "throughput_ratio_last_to_first": round(last["admitted_per_s"] / first["admitted_per_s"], 3),
        "cpu_cores": os.cpu_count(),
        "loadavg_1m": os.getloadavg()[0],
    }, indent=2))


if __name__ == "__main__":
    main()
