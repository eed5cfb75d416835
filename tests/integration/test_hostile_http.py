"""The gateway under hostile HTTP, over a real socket: bodies bounded while they stream, stalled bodies cut,
overload answered with 503 at once, cross-site posts refused, every error with a code."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading

import httpx
import pytest

from engine.triton_server import free_port
from gateway.app import create_app
from gateway.settings import GatewaySettings
from hybridcn.synth import synth_field
from tests.conftest import REPOSITORY, ROOT, LiveGateway, encode

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def strict(triton_server, tmp_path_factory):
    """A gateway with small limits: 200 kB uploads, 100k pixels, a 1 s body deadline, 2 requests at once."""
    settings = GatewaySettings(repository=REPOSITORY, triton_url=triton_server.grpc_url, max_upload_bytes=200_000,
                               body_timeout_s=1.0, max_queue=2, batch_jobs_dir=tmp_path_factory.mktemp("jobs"),
                               max_job_files=3, max_pixels=100_000)
    live = LiveGateway(create_app(settings), free_port()).start()
    yield live
    live.stop()


@pytest.fixture(scope="module")
def png() -> bytes:
    return encode(synth_field(1, seed=60).image)


def test_a_chunked_body_over_the_limit_is_refused_while_it_streams(strict):
    sent = {"bytes": 0}

    def chunks():
        for _ in range(400):  # 400 x 64 kB = 25 MB if nobody stopped it
            sent["bytes"] += 65536
            yield b"\0" * 65536

    try:
        response = httpx.post(f"{strict.url}/v1/classify", content=chunks(), timeout=30)
    except httpx.HTTPError:  # the server may close the connection while the client still sends
        assert sent["bytes"] < 25 * 1024 * 1024
        return
    assert response.status_code == 413 and response.json()["code"] == "too_large"


def test_a_body_that_stalls_is_cut_at_the_deadline(strict):
    host, port = strict.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                     b"Content-Length: 100000\r\n\r\n0123456789")
        answer = b""
        while b"body_timeout" not in answer and (chunk := sock.recv(4096)):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 408") and b"body_timeout" in answer


def test_overload_gets_503_with_retry_after_and_admitted_requests_succeed(strict, png):
    results: list[httpx.Response] = []
    lock = threading.Lock()

    def send() -> None:
        response = httpx.post(f"{strict.url}/v1/classify", content=png, timeout=60)
        with lock:
            results.append(response)

    threads = [threading.Thread(target=send) for _ in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    codes = sorted(r.status_code for r in results)
    assert set(codes) <= {200, 503} and codes.count(200) >= 2 and codes.count(503) >= 1, codes
    for response in results:
        if response.status_code == 503:
            assert response.json()["code"] == "overloaded" and response.headers["retry-after"] == "1"
    assert httpx.post(f"{strict.url}/v1/classify", content=png, timeout=60).status_code == 200  # and it recovers


def test_two_field_images_in_one_classify_request_are_refused(strict, png):
    files = [("file", ("a.png", png, "image/png")), ("other", ("b.png", png, "image/png"))]
    response = httpx.post(f"{strict.url}/v1/classify", files=files, timeout=30)
    assert response.status_code == 422 and response.json()["code"] == "too_many_files"


def test_a_cross_site_post_is_refused_and_the_same_site_one_is_not(strict, png):
    foreign = httpx.post(f"{strict.url}/v1/jobs", files=[("files", ("a.png", png, "image/png"))],
                         headers={"Origin": "https://evil.example"}, timeout=30)
    assert foreign.status_code == 403 and foreign.json()["code"] == "cross_origin"
    own = httpx.post(f"{strict.url}/v1/classify", content=png, headers={"Origin": strict.url}, timeout=60)
    assert own.status_code == 200


def test_too_many_job_files_are_refused(strict, png):
    files = [("files", (f"f{i}.png", png, "image/png")) for i in range(4)]
    response = httpx.post(f"{strict.url}/v1/jobs", files=files, timeout=30)
    assert response.status_code == 413 and response.json()["code"] == "too_many_files"


def test_every_error_has_a_code_and_methods_are_listed(strict):
    invalid = httpx.post(f"{strict.url}/v1/classify?images=maybe", content=b"x", timeout=30)
    assert invalid.status_code == 422 and invalid.json()["code"] == "invalid_request"
    options = httpx.options(f"{strict.url}/v1/classify", timeout=30)
    assert options.status_code == 204 and options.headers["allow"] == "OPTIONS, POST"
    assert "access-control-allow-origin" not in options.headers  # CORS stays off
    wrong = httpx.delete(f"{strict.url}/v1/jobs", timeout=30)
    assert wrong.status_code in (404, 405) and wrong.json()["code"] in ("not_found", "method_not_allowed")
    long = httpx.get(f"{strict.url}/v1/jobs/nojob/files/{'x' * 300}", timeout=30)
    assert long.status_code == 404 and long.json()["code"]
    missing = httpx.get(f"{strict.url}/v1/no-such-route", timeout=30)
    assert missing.status_code == 404


def test_the_gateways_pixel_limit_is_its_own_setting(strict):
    import cv2

    big = encode(cv2.resize(synth_field(2, seed=61).image, (400, 400)))  # 160k pixels, small on disk
    response = httpx.post(f"{strict.url}/v1/classify", content=big, timeout=30)
    assert response.status_code == 413 and response.json()["code"] == "too_many_pixels"


@pytest.fixture(scope="module")
def keyed(triton_server, tmp_path_factory):
    settings = GatewaySettings(repository=REPOSITORY, triton_url=triton_server.grpc_url, api_keys=["k-one", "k-two"],
                               rate_per_minute=3, batch_jobs_dir=tmp_path_factory.mktemp("jobs"))
    live = LiveGateway(create_app(settings), free_port()).start()  # readiness is open without a key
    yield live
    live.stop()


def test_api_keys_guard_the_api_and_each_key_has_a_rate_limit(keyed, png):
    missing = httpx.get(f"{keyed.url}/v1/model", timeout=30)
    assert missing.status_code == 401 and missing.json()["code"] == "unauthorized"
    assert httpx.get(f"{keyed.url}/v1/model", headers={"X-API-Key": "k-nope"}, timeout=30).status_code == 401
    assert httpx.get(f"{keyed.url}/healthz", timeout=30).status_code == 200  # probes stay open
    assert httpx.get(f"{keyed.url}/v1/model", headers={"X-API-Key": "k-one"}, timeout=30).status_code == 200
    bearer = httpx.post(f"{keyed.url}/v1/classify", content=png, headers={"Authorization": "Bearer k-one"},
                        timeout=60)
    assert bearer.status_code == 200
    statuses = [httpx.get(f"{keyed.url}/v1/model", headers={"X-API-Key": "k-one"}, timeout=30) for _ in range(2)]
    limited = statuses[-1]
    assert limited.status_code == 429 and limited.json()["code"] == "rate_limited"
    assert int(limited.headers["retry-after"]) >= 1
    other = httpx.get(f"{keyed.url}/v1/model", headers={"X-API-Key": "k-two"}, timeout=30)
    assert other.status_code == 200  # limits are per key


def test_serving_beyond_loopback_without_keys_is_refused(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "HYBRIDCN_API_KEYS"}
    result = subprocess.run([sys.executable, "-m", "hybridcn.cli", "serve", "--host", "0.0.0.0", "--port",
                             str(free_port())], capture_output=True, text=True, timeout=60, cwd=ROOT, env=env)
    assert result.returncode == 1 and "needs API keys" in result.stderr and "Traceback" not in result.stderr


@pytest.fixture(scope="module")
def keyed_jobs(triton_server, tmp_path_factory):
    settings = GatewaySettings(repository=REPOSITORY, triton_url=triton_server.grpc_url, api_keys=["k-lab"],
                               batch_jobs_dir=tmp_path_factory.mktemp("keyed-jobs"))
    live = LiveGateway(create_app(settings), free_port()).start()
    yield live
    live.stop()


def test_with_keys_report_links_are_signed_and_open_without_a_key(keyed_jobs, png):
    import time
    from urllib.parse import urljoin

    from gateway.report_links import make_token

    key = {"X-API-Key": "k-lab"}
    with httpx.Client(base_url=keyed_jobs.url, timeout=60) as client:
        created = client.post("/v1/jobs", files=[("files", ("a.png", png, "image/png"))], data={"slide_id": "S1"},
                              headers=key)
        assert created.status_code == 202, created.text
        job_id = created.json()["id"]
        deadline = time.monotonic() + 180
        while (job := client.get(f"/v1/jobs/{job_id}", headers=key).json())["status"] == "running":
            assert time.monotonic() < deadline
            time.sleep(0.3)
        assert job["status"] == "done" and f"/v1/jobs/{job_id}/shared/" in job["report"]
        index = client.get(job["report"])  # a new browser tab: no key
        assert index.status_code == 200 and "S1" in index.text
        slide = client.get(urljoin(keyed_jobs.url + job["report"], job["slides"][0]["report"].split("/shared/")[1]
                                   .split("/", 1)[1]))  # the index's relative link to the slide page
        assert slide.status_code == 200, slide.text
        assert client.get(f"/v1/jobs/{job_id}/files/index.html").status_code == 401  # the plain route needs a key
        token = job["report"].split("/shared/")[1].split("/")[0]
        forged = client.get(f"/v1/jobs/{job_id}/shared/{token[:-2]}xx/index.html")
        assert forged.status_code == 403 and forged.json()["code"] == "bad_link"
        expired = make_token(["k-lab"], job_id, ttl_s=-7200)
        assert client.get(f"/v1/jobs/{job_id}/shared/{expired}/index.html").status_code == 403
        other_keys = make_token(["k-other"], job_id)
        assert client.get(f"/v1/jobs/{job_id}/shared/{other_keys}/index.html").status_code == 403
        elsewhere = client.get(f"/v1/jobs/{job_id}/shared/{token}/../../etc/passwd")
        assert elsewhere.status_code in (401, 403, 404)  # never the file
