"""The gateway as its image runs it, ``uvicorn --workers 2``: jobs submitted to any worker are seen by all,
run one at a time, and end done (a per-process queue showed other workers' queued jobs as failed)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from engine.triton_server import free_port
from hybridcn.synth import synth_field
from tests.conftest import encode

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM to uvicorn's supervisor (it ends its workers), then SIGKILL to the group if anything is left."""
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


def test_jobs_with_two_gateway_workers(triton_server, tmp_path):
    port = free_port()
    env = {**os.environ, "HYBRIDCN_TRITON_URL": triton_server.grpc_url, "HYBRIDCN_BATCH_JOBS_DIR": str(tmp_path),
           "HYBRIDCN_PREPROCESS_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "uvicorn", "gateway.app:create_app", "--factory", "--host",
                                "127.0.0.1", "--port", str(port), "--workers", "2", "--log-level", "warning"],
                               cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        else:
            pytest.fail("the gateway workers did not get ready")
        ids = []
        for j in range(3):  # a new connection each: the kernel spreads them over the two workers
            files = [("files", (f"f{i}.png", encode(synth_field(i, seed=700 + 10 * j + i).image), "image/png"))
                     for i in range(2)]
            response = httpx.post(f"{base}/v1/jobs", files=files, data={"slide_id": f"slide-{j}"}, timeout=60)
            assert response.status_code == 202, response.text
            ids.append(response.json()["id"])
        seen: dict[str, set] = {job: set() for job in ids}
        at_once = 0
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            jobs = {job: httpx.get(f"{base}/v1/jobs/{job}", timeout=30).json() for job in ids}
            for job, body in jobs.items():
                seen[job].add((body["status"], body["detail"]))
            at_once = max(at_once, sum(1 for b in jobs.values() if (b["status"], b["detail"]) == ("running", None)))
            if all(b["status"] != "running" for b in jobs.values()):
                break
            time.sleep(0.2)
        listed = {j["id"] for j in httpx.get(f"{base}/v1/jobs", timeout=30).json()["jobs"]}
    finally:
        _stop(process)
    assert all(body["status"] == "done" and body["done"] == 2 for body in jobs.values()), jobs
    assert all("failed" not in {status for status, _ in states} for states in seen.values()), seen
    assert at_once <= 1  # one job at a time over both processes
    assert set(ids) <= listed
