"""Shared fixtures: synthetic fields, the real embedded Triton, and the gateway over real HTTP."""

from __future__ import annotations

import threading
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest

from hybridcn.synth import synth_field

ROOT = Path(__file__).resolve().parent.parent
REPOSITORY = ROOT / "model_repository"
ARTIFACTS = ROOT / "test-artifacts"


def encode(rgb: np.ndarray, ext: str = ".png") -> bytes:
    ok, data = cv2.imencode(ext, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    assert ok
    return data.tobytes()


@pytest.fixture(scope="session")
def fields() -> np.ndarray:
    """Eight synthetic 224x224 fields, two per class, as uint8 RGB."""
    return np.stack([synth_field(i % 4, seed=100 + i).image for i in range(8)])


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS


@pytest.fixture(scope="session")
def triton_server():
    """The real embedded tritonserver serving the shipped repository on free 127.0.0.1 ports."""
    from engine.triton_server import EmbeddedTriton

    server = EmbeddedTriton(REPOSITORY, ready_timeout=180)
    server.start()
    yield server
    server.stop()


class LiveGateway:
    def __init__(self, app, port: int) -> None:
        import uvicorn

        self.url = f"http://127.0.0.1:{port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self, timeout: float = 120) -> LiveGateway:
        from engine.triton_server import wait_until

        self.thread.start()

        def ready() -> bool:
            try:
                return httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(ready, timeout_s=timeout, interval_s=0.2)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="session")
def gateway(triton_server, tmp_path_factory) -> LiveGateway:
    """The FastAPI gateway under uvicorn on a free port, talking gRPC to the session's Triton."""
    from engine.triton_server import free_port
    from gateway.app import create_app
    from gateway.settings import GatewaySettings

    settings = GatewaySettings(repository=REPOSITORY, triton_url=triton_server.grpc_url,
                               batch_jobs_dir=tmp_path_factory.mktemp("jobs"))
    live = LiveGateway(create_app(settings), free_port()).start()
    yield live
    live.stop()


def run_python(code: str, *args: str, timeout: float = 120, **env: str) -> dict:
    """Run ``code`` in a fresh interpreter (its own peak memory) and parse the JSON of its last output line."""
    import json
    import os
    import subprocess
    import sys

    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **env}
    done = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, env=environment, capture_output=True,
                          text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def postgres():
    """A throwaway PostgreSQL server (Debian's package) on a free loopback port, stopped by its pid at the end."""
    from tests.postgres_server import PostgresUnavailableError, ThrowawayPostgres

    try:
        server = ThrowawayPostgres()
    except PostgresUnavailableError as error:
        pytest.skip(str(error))
    with server:
        yield server


@pytest.fixture
def queue_url(postgres) -> str:
    """A new empty database on the session's PostgreSQL: one shared batch queue."""
    return postgres.create_database()
