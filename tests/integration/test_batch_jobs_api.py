"""The jobs API over real HTTP: upload two fields, follow the job to the end, read its reports."""

from __future__ import annotations

import time

import httpx
import pytest

from batch.ledger import LEDGER_FILE, FieldSpec, SQLiteLedger
from hybridcn.synth import synth_field
from tests.conftest import encode

pytestmark = pytest.mark.integration


def _jobs_dir(gateway):
    return gateway.server.config.app.state.gateway.settings.batch_jobs_dir


def _wait(client: httpx.Client, url: str, timeout: float = 180) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(url).json()
        if job["status"] != "running":
            return job
        time.sleep(0.3)
    raise AssertionError(f"job still running after {timeout}s: {job}")


def test_post_two_fields_poll_until_done_and_fetch_the_reports(gateway):
    files = [("files", (f"field-{i}.png", encode(synth_field(i + 1, seed=40 + i).image), "image/png"))
             for i in range(2)]
    with httpx.Client(base_url=gateway.url, timeout=60) as client:
        response = client.post("/v1/jobs", files=files, data={"slide_id": "slide-A"})
        assert response.status_code == 202, response.text
        created = response.json()
        assert created["status"] == "running" and response.headers["location"] == f"/v1/jobs/{created['id']}"
        job = _wait(client, f"/v1/jobs/{created['id']}")
        assert (job["status"], job["done"], job["failed"], job["total"]) == ("done", 2, 0, 2), job
        (slide,) = job["slides"]
        assert slide["slide_id"] == "slide-A" and sum(slide["class_counts"].values()) == 2
        assert slide["verdict"] in slide["class_counts"] and slide["report"].endswith(".html")

        index = client.get(job["report"])
        assert index.status_code == 200 and index.headers["content-type"].startswith("text/html")
        assert "slide-A" in index.text and "default-src 'none'" in index.headers["content-security-policy"]
        report = client.get(slide["report"])
        assert report.status_code == 200 and "data:image/jpeg;base64," in report.text
        results = client.get(f"/v1/jobs/{job['id']}/files/results.csv")
        assert results.status_code == 200 and len(results.text.strip().splitlines()) == 3

        listed = client.get("/v1/jobs").json()["jobs"]
        assert job["id"] in {j["id"] for j in listed}

        for path in ("..%2F..%2F..%2Fetc%2Fpasswd", "%2Fetc%2Fpasswd", LEDGER_FILE, ".lock", "inputs/../../x"):
            blocked = client.get(f"/v1/jobs/{job['id']}/files/{path}")
            assert blocked.status_code == 404, path
        assert client.get("/v1/jobs/no-such-job").status_code == 404
        assert client.get("/v1/jobs/..").status_code == 404


def test_bad_uploads_are_refused_with_a_reason(gateway):
    with httpx.Client(base_url=gateway.url, timeout=60) as client:
        wrong = client.post("/v1/jobs", files=[("files", ("notes.txt", b"hello", "text/plain"))])
        assert wrong.status_code == 415 and wrong.json()["code"] == "unsupported_format"
        slide = client.post("/v1/jobs", files=[("files", ("a.png", b"x", "image/png"))], data={"slide_id": "../x"})
        assert slide.status_code == 400 and slide.json()["code"] == "bad_slide_id"


def test_jobs_from_the_command_line_are_listed_and_an_interrupted_one_says_so(gateway):
    folder = _jobs_dir(gateway) / "cli-run-7"
    with SQLiteLedger(folder / LEDGER_FILE) as ledger:  # what a killed `hybridcn batch --out` leaves behind
        ledger.bind_model("compact-test")
        ledger.register([FieldSpec("S1", "/data/S1/a.png"), FieldSpec("S1", "/data/S1/b.png")])
        ledger.set_meta(run_state="running", run_pid="999999")
    with httpx.Client(base_url=gateway.url, timeout=60) as client:
        listed = {j["id"]: j for j in client.get("/v1/jobs").json()["jobs"]}
        job = listed["cli-run-7"]
        assert (job["status"], job["total"], job["pending"], job["report"]) == ("failed", 2, 2, None)
        assert job["detail"].startswith("interrupted")
        detail = client.get("/v1/jobs/cli-run-7").json()
        assert detail["slides"][0]["slide_id"] == "S1" and detail["slides"][0]["pending"] == 2


def test_a_job_whose_every_field_failed_is_failed_not_done(gateway):
    files = [("files", (f"broken-{i}.png", b"\x89PNG\r\n\x1a\n not really", "image/png")) for i in range(2)]
    with httpx.Client(base_url=gateway.url, timeout=60) as client:
        response = client.post("/v1/jobs", files=files, data={"slide_id": "slide-X"})
        assert response.status_code == 202, response.text
        job = _wait(client, f"/v1/jobs/{response.json()['id']}")
        assert (job["status"], job["done"], job["failed"]) == ("failed", 0, 2), job
        assert job["detail"].startswith("every field failed")
        (slide,) = job["slides"]
        assert slide["verdict_status"] == "failed" and slide["verdict"] is None
        assert slide["estimated_blast_cells"] == 0
