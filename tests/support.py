"""Helpers shared by tests and benchmarks: synthetic queues of hard-linked fields, a gateway in its own process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import cv2
import httpx

from engine.triton_server import free_port
from hybridcn.synth import synth_field

ROOT = Path(__file__).resolve().parents[1]


def write_originals(root: Path, count: int, seed: int) -> list[Path]:
    """``count`` distinct synthetic PNG fields (classes in turn) under ``root``."""
    paths = []
    for i in range(count):
        path = root / f"o{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(path), cv2.cvtColor(synth_field(i % 4, seed=seed + i).image, cv2.COLOR_RGB2BGR))
        paths.append(path)
    return paths


def link_queue(root: Path, originals: list[Path], fields: int, per_slide: int) -> list[tuple[str, str]]:
    """A queue of ``fields`` fields, ``per_slide`` per slide folder, hard-linked from ``originals`` under distinct
    names (each is read and inferred as usual; only the disk is spared); ``(slide_id, path)`` of each."""
    made = []
    for index in range(fields):
        slide = f"S{index // per_slide:05d}"
        path = root / slide / f"f{index % per_slide:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        os.link(originals[index % len(originals)], path)
        made.append((slide, str(path)))
    return made


@contextmanager
def gateway_process(env: Mapping[str, str], *uvicorn_args: str, ready_s: float = 120.0
                    ) -> Iterator[tuple[subprocess.Popen, str, int]]:
    """The gateway under uvicorn in a process (group) of its own on a free port: ``(process, base URL, port)``.

    Ready when ``/readyz`` answers 200; ended with SIGTERM (uvicorn ends its workers), then SIGKILL to the group.
    """
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "uvicorn", "gateway.app:create_app", "--factory", "--host",
                                "127.0.0.1", "--port", str(port), "--log-level", "warning", *uvicorn_args],
                               cwd=ROOT, env={**os.environ, **env}, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + ready_s
        while True:
            try:
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the gateway did not get ready (exit status {process.poll()})")
            time.sleep(0.3)
        yield process, base, port
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait(timeout=10)
