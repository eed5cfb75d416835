"""The gateway as its image runs it, ``uvicorn --workers 2``: jobs submitted to any worker are seen by all,
run one at a time, and end done (a per-process queue showed other workers' queued jobs as failed)."""

from __future__ import annotations

import time

import httpx
import pytest

from batch.ledger import LEDGER_FILE, SQLiteLedger
from hybridcn.synth import synth_field
from tests.conftest import encode
from tests.support import gateway_process

pytestmark = pytest.mark.integration


def test_jobs_with_two_gateway_workers(triton_server, tmp_path):
    env = {"HYBRIDCN_TRITON_URL": triton_server.grpc_url, "HYBRIDCN_BATCH_JOBS_DIR": str(tmp_path),
           "HYBRIDCN_PREPROCESS_THREADS": "1"}
    with gateway_process(env, "--workers", "2") as (_, base, _port):
        ids = []
        for j in range(3):  # a new connection each: the kernel spreads them over the two workers
            files = [("files", (f"f{i}.png", encode(synth_field(i, seed=700 + 10 * j + i).image), "image/png"))
                     for i in range(2)]
            response = httpx.post(f"{base}/v1/jobs", files=files, data={"slide_id": f"slide-{j}"}, timeout=60)
            assert response.status_code == 202, response.text
            ids.append(response.json()["id"])
        seen: dict[str, set] = {job: set() for job in ids}
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            jobs = {job: httpx.get(f"{base}/v1/jobs/{job}", timeout=30).json() for job in ids}
            for job, body in jobs.items():
                seen[job].add((body["status"], body["detail"]))
            if all(b["status"] != "running" for b in jobs.values()):
                break
            time.sleep(0.2)
        listed = {j["id"] for j in httpx.get(f"{base}/v1/jobs", timeout=30).json()["jobs"]}
    assert all(body["status"] == "done" and body["done"] == 2 for body in jobs.values()), jobs
    assert all("failed" not in {status for status, _ in states} for states in seen.values()), seen
    # one job at a time over both processes: each run starts after the one before it finished (from the
    # ledgers, not from polls, which read the jobs one after another and can straddle a hand-over)
    runs = []
    for job in ids:
        with SQLiteLedger(tmp_path / job / LEDGER_FILE, readonly=True) as ledger:
            meta = ledger.get_meta()
        runs.append((meta["run_started"], meta["run_finished"]))
    runs.sort()
    assert all(later[0] >= earlier[1] for earlier, later in zip(runs, runs[1:], strict=False)), runs
    assert set(ids) <= listed
