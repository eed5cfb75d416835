"""The real embedded Triton over gRPC and HTTP, and the gateway over real HTTP."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from PIL import Image

from engine.client import TritonClient
from engine.field import prepare_array, prepare_bytes
from engine.model import ServedModel
from export.runtime import OUTPUTS, OnnxEnsemble
from tests.conftest import REPOSITORY, LiveGateway, encode

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def model() -> ServedModel:
    return ServedModel.from_repository(REPOSITORY)


@pytest.fixture(scope="module")
def preprocessed(fields, model) -> np.ndarray:
    return np.stack([prepare_array(f, model).preprocessed for f in fields])


@pytest.fixture(scope="module")
def in_process(preprocessed):
    return OnnxEnsemble(REPOSITORY).infer(preprocessed)


def _grpc_infer(url: str, images: np.ndarray) -> dict:
    client = grpcclient.InferenceServerClient(url)
    tensor = grpcclient.InferInput("image", list(images.shape), "UINT8")
    tensor.set_data_from_numpy(images)
    result = client.infer("hybridcn_nas", [tensor])
    return {name: result.as_numpy(name) for name in OUTPUTS}


def test_ensemble_over_grpc_matches_in_process_onnx_runtime(triton_server, preprocessed, in_process):
    served = _grpc_infer(triton_server.grpc_url, preprocessed)
    assert np.abs(served["probabilities"] - in_process.probabilities).max() <= 1e-5
    assert np.abs(served["feature_attention"] - in_process.feature_attention).max() <= 1e-5
    assert (served["mask"] == in_process.mask).all() and (served["attention"] == in_process.attention).all()


def test_ensemble_over_http_matches_in_process_onnx_runtime(triton_server, preprocessed, in_process):
    client = httpclient.InferenceServerClient(triton_server.http_url)
    tensor = httpclient.InferInput("image", list(preprocessed.shape), "UINT8")
    tensor.set_data_from_numpy(preprocessed, binary_data=True)
    result = client.infer("hybridcn_nas", [tensor])
    assert np.abs(result.as_numpy("probabilities") - in_process.probabilities).max() <= 1e-5
    assert client.is_model_ready("hybridcn_nas_raw")


def test_raw_ensemble_takes_jpeg_bytes_and_runs_the_same_preprocessing(triton_server, fields, model):
    jpeg = encode(fields[3], ".jpg")
    client = grpcclient.InferenceServerClient(triton_server.grpc_url)
    tensor = grpcclient.InferInput("image_bytes", [1, 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[jpeg]], dtype=object))
    result = client.infer("hybridcn_nas_raw", [tensor])
    local = prepare_bytes(jpeg, model).preprocessed
    assert (result.as_numpy("image")[0] == local).all()
    expected = OnnxEnsemble(REPOSITORY).infer(local[None]).probabilities
    assert np.abs(result.as_numpy("probabilities") - expected).max() <= 1e-5


def test_raw_ensemble_reports_a_bad_upload_and_keeps_serving(triton_server, fields):
    client = grpcclient.InferenceServerClient(triton_server.grpc_url)
    bad = grpcclient.InferInput("image_bytes", [1, 1], "BYTES")
    bad.set_data_from_numpy(np.array([[b"not an image at all"]], dtype=object))
    with pytest.raises(Exception, match="not_an_image"):
        client.infer("hybridcn_nas_raw", [bad])
    good = grpcclient.InferInput("image_bytes", [1, 1], "BYTES")
    good.set_data_from_numpy(np.array([[encode(fields[0])]], dtype=object))
    assert client.infer("hybridcn_nas_raw", [good]).as_numpy("probabilities").shape == (1, 4)


def test_concurrent_requests_share_one_channel(triton_server, preprocessed, in_process):
    client = TritonClient(triton_server.grpc_url)
    futures = [client.submit(preprocessed[i : i + 1]) for i in range(len(preprocessed))]
    served = np.concatenate([f.result(timeout=60).probabilities for f in futures])
    client.close()
    assert np.abs(served - in_process.probabilities).max() <= 1e-5


def test_gateway_classifies_multipart_and_raw_uploads(gateway, fields, model, in_process):
    png = encode(fields[1])
    raw = httpx.post(f"{gateway.url}/v1/classify", content=png, headers={"content-type": "image/png"}, timeout=60)
    assert raw.status_code == 200, raw.text
    body = raw.json()
    assert body["label"] in model.classes and set(body["probabilities"]) == set(model.classes)
    assert abs(sum(body["probabilities"].values()) - 1) < 1e-4
    assert body["probabilities"][body["label"]] == body["confidence"]
    np.testing.assert_allclose(list(body["probabilities"].values()), in_process.probabilities[1], atol=1e-5)
    assert body["model_version"] == model.model_version
    assert body["review_threshold"] == pytest.approx(model.review_threshold)
    assert isinstance(body["needs_review"], bool) and body["cell_count"] == len(body["cells"])
    assert {"decode", "preprocess", "triton", "postprocess", "total"} <= set(body["timings_ms"])
    multipart = httpx.post(f"{gateway.url}/v1/classify", params={"images": "true"},
                           files={"file": ("field.png", png, "image/png")}, timeout=60)
    assert multipart.status_code == 200
    assert multipart.json()["probabilities"] == body["probabilities"]
    assert multipart.json()["filename"] == "field.png"
    assert multipart.json()["images"]["mask"].startswith("data:image/png;base64,")


def test_explain_serves_the_occlusion_evidence_of_the_served_model(gateway, fields, model, preprocessed):
    """The evidence layer comes from the served ensemble: the same map as the in-process ONNX models give."""
    import base64

    import cv2

    from engine.occlusion import occlusion_evidence

    response = httpx.post(f"{gateway.url}/v1/classify", params={"explain": "true"}, content=encode(fields[2]),
                          timeout=120)
    assert response.status_code == 200, response.text
    body = response.json()
    images = body["images"]  # explain implies images
    assert images["mask"].startswith("data:image/png;base64,") and "explain" in body["timings_ms"]
    ensemble = OnnxEnsemble(REPOSITORY)
    local = occlusion_evidence(lambda x: ensemble.infer(x).probabilities, preprocessed[2],
                               ensemble.infer(preprocessed[2][None]).probabilities[0])
    assert images["evidence_peak"] == pytest.approx(local.peak, abs=1e-3) and local.peak > 0
    served = cv2.imdecode(np.frombuffer(base64.b64decode(images["evidence"].split(",", 1)[1]), np.uint8),
                          cv2.IMREAD_UNCHANGED)[..., 3].astype(int)
    expected = cv2.resize(local.to_uint8(), served.shape[::-1], interpolation=cv2.INTER_LINEAR)  # model -> field px
    assert np.abs(served - (expected.astype(np.float32) * 0.85).astype(int)).max() <= 2
    plain = httpx.post(f"{gateway.url}/v1/classify", params={"images": "true"}, content=encode(fields[2]), timeout=60)
    assert "evidence" not in plain.json()["images"] and plain.json()["label"] == body["label"]


def test_explain_requests_beyond_the_limit_are_refused_at_once_and_plain_ones_still_served(gateway, fields):
    """Each evidence map is ~50 classifications: past ``max_explaining`` (2) at once the gateway answers 503
    ``explain_busy`` with Retry-After instead of queueing, and classifications without explain go on."""
    import asyncio

    png = encode(fields[3])

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=120) as client:
            explain = [client.post(f"{gateway.url}/v1/classify", params={"explain": "true"}, content=png)
                       for _ in range(8)]
            plain = [client.post(f"{gateway.url}/v1/classify", content=png) for _ in range(2)]
            return await asyncio.gather(*explain, *plain)

    responses = asyncio.run(burst())
    explained, plain = responses[:8], responses[8:]
    assert all(r.status_code == 200 for r in plain)
    busy = [r for r in explained if r.status_code == 503]
    assert {r.status_code for r in explained} <= {200, 503} and 1 <= len(busy) <= 6
    assert all(r.json()["code"] == "explain_busy" and r.headers["retry-after"] == "2" for r in busy)
    assert all(r.json()["images"]["evidence"] for r in explained if r.status_code == 200)


def _tiff16(size: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray((np.arange(size * size).reshape(size, size) % 65535).astype(np.uint16)).save(buffer, "TIFF")
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("payload", "status", "code"),
    [
        (b"", 400, "empty"),
        (b"plain text, definitely not a smear", 415, "not_an_image"),
        ("truncated", 400, "truncated"),
        ("huge", 413, "too_many_pixels"),
        ("strip", 422, "bad_aspect_ratio"),
    ],
)
def test_gateway_rejects_bad_input_then_serves_the_next_request(gateway, fields, payload, status, code):
    if payload == "truncated":
        full = encode(fields[0], ".jpg")
        payload = full[: len(full) // 3]
    elif payload == "huge":
        buffer = io.BytesIO()
        Image.new("L", (12000, 12000)).save(buffer, "PNG")
        payload = buffer.getvalue()
    elif payload == "strip":
        payload = encode(np.full((40, 800, 3), 200, np.uint8))
    response = httpx.post(f"{gateway.url}/v1/classify", content=payload, timeout=60)
    assert response.status_code == status, response.text
    assert response.json()["code"] == code and response.json()["detail"]
    follow_up = httpx.post(f"{gateway.url}/v1/classify", content=encode(fields[2]), timeout=60)
    assert follow_up.status_code == 200


def test_gateway_accepts_a_16bit_tiff(gateway):
    response = httpx.post(f"{gateway.url}/v1/classify", content=_tiff16(256), timeout=60)
    assert response.status_code == 200, response.text


def test_gateway_refuses_oversized_uploads(triton_server, fields, tmp_path):
    from engine.triton_server import free_port
    from gateway.app import create_app
    from gateway.settings import GatewaySettings

    settings = GatewaySettings(repository=REPOSITORY, triton_url=triton_server.grpc_url, max_upload_bytes=10_000)
    live = LiveGateway(create_app(settings), free_port()).start()
    try:
        response = httpx.post(f"{live.url}/v1/classify", content=b"\xff" * 50_000, timeout=30)
        assert response.status_code == 413 and response.json()["code"] == "too_large"
    finally:
        live.stop()


def test_health_readiness_metrics_and_openapi(gateway, fields):
    assert httpx.get(f"{gateway.url}/healthz").json()["status"] == "ok"
    ready = httpx.get(f"{gateway.url}/readyz")
    assert ready.status_code == 200 and ready.json()["max_upload_bytes"] > 1_000_000
    httpx.post(f"{gateway.url}/v1/classify", content=encode(fields[0]), timeout=60)
    metrics = httpx.get(f"{gateway.url}/metrics").text
    assert "hybridcn_requests_total" in metrics
    assert 'hybridcn_stage_seconds_bucket{le="0.001",stage="triton"}' in metrics
    spec = httpx.get(f"{gateway.url}/openapi.json").json()
    assert "/v1/classify" in spec["paths"] and "/readyz" in spec["paths"]


def test_gateway_with_dead_triton_is_not_ready_and_says_so(fields):
    from engine.triton_server import free_port
    from gateway.app import create_app
    from gateway.settings import GatewaySettings

    dead = f"127.0.0.1:{free_port()}"
    settings = GatewaySettings(repository=REPOSITORY, triton_url=dead, triton_timeout_s=3)
    app = create_app(settings)
    port = free_port()
    live = LiveGateway(app, port)
    live.thread.start()
    try:
        for _ in range(100):
            try:
                if httpx.get(f"{live.url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            import time

            time.sleep(0.1)
        assert httpx.get(f"{live.url}/readyz", timeout=10).status_code == 503
        response = httpx.post(f"{live.url}/v1/classify", content=encode(fields[0]), timeout=30)
        assert response.status_code == 503 and response.json()["code"] == "inference_unavailable"
    finally:
        live.stop()


def test_cli_classify_reports_bad_files_and_continues(triton_server, fields, tmp_path):
    good = tmp_path / "good.png"
    good.write_bytes(encode(fields[0]))
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff garbage")
    result = subprocess.run(
        [sys.executable, "-m", "hybridcn.cli", "classify", str(bad), str(good), "--triton", triton_server.grpc_url,
         "--json"], capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 1
    assert "good.png" in result.stdout and '"label"' in result.stdout
    assert "bad.jpg" in result.stderr and "not_an_image" in result.stderr


def test_a_stated_pixel_size_fits_the_field_at_the_training_scale_over_rest_and_cli(gateway, triton_server, fields,
                                                                                   model, tmp_path):
    training_um = model.manifest.ood.pixel_size_um
    zoomed = np.ascontiguousarray(np.kron(fields[2][56:168, 56:168], np.ones((2, 2, 1), np.uint8)))  # 2x objective
    png = encode(zoomed)
    stated = httpx.post(f"{gateway.url}/v1/classify", params={"pixel_size_um": training_um / 2}, content=png,
                        timeout=60).json()
    assert stated["rescaled_by"] == pytest.approx(0.5) and stated["pixel_size_um"] == pytest.approx(training_um / 2,
                                                                                                    rel=1e-3)
    assert not any(r.startswith("scale_") for r in stated["review_reasons"])
    measured = httpx.post(f"{gateway.url}/v1/classify", content=png, timeout=60).json()
    assert any(r.startswith("scale_adjusted: red cells") for r in measured["review_reasons"]), measured
    refused = httpx.post(f"{gateway.url}/v1/classify", params={"pixel_size_um": 0}, content=png, timeout=60)
    assert refused.status_code == 422 and "pixel_size_um" in refused.text
    path = tmp_path / "zoomed.png"
    path.write_bytes(png)
    result = subprocess.run([sys.executable, "-m", "hybridcn.cli", "classify", str(path), "--triton",
                             triton_server.grpc_url, "--json", "--pixel-size", str(training_um / 2)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["rescaled_by"] == pytest.approx(0.5)
    wrong = subprocess.run([sys.executable, "-m", "hybridcn.cli", "classify", str(path), "--pixel-size", "-2"],
                           capture_output=True, text=True, timeout=60)
    assert wrong.returncode == 2 and "outside" in wrong.stderr
