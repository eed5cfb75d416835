"""The integrator contract over real gRPC: the README's tensor table and example, complete answers from the
raw-bytes ensemble, parity of REST and both ensembles, fixed ports from ``hybridcn serve``."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import cv2
import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from engine.contract import ensemble_tensors, readme_table, tensor_table
from engine.field import prepare_array
from engine.model import ServedModel
from engine.triton_server import free_port, wait_until
from export.repository import ENSEMBLE, RAW_ENSEMBLE
from hybridcn.synth import synth_field
from preprocessing import decode_image
from tests.conftest import REPOSITORY, ROOT, encode

pytestmark = pytest.mark.integration
README = ROOT / "README.md"


def _images() -> list[tuple[str, bytes]]:
    """Fields as labs send them: PNG and JPEG, at the training size and at another scanner's size."""
    big = cv2.resize(synth_field(3, seed=71).image, (300, 260), interpolation=cv2.INTER_CUBIC)
    return [("png", encode(synth_field(0, seed=70).image)), ("jpeg", encode(synth_field(2, seed=72).image, ".jpg")),
            ("large-jpeg", encode(big, ".jpg")), ("png-pro", encode(synth_field(3, seed=73).image))]


def test_the_readme_tensor_table_is_the_served_one(triton_server):
    assert readme_table(README) == tensor_table(REPOSITORY), "regenerate it with `python -m engine.contract`"
    client = grpcclient.InferenceServerClient(triton_server.grpc_url)
    for name in (ENSEMBLE, RAW_ENSEMBLE):
        max_batch, rows = ensemble_tensors(REPOSITORY, name)
        metadata = client.get_model_metadata(name, as_json=True)
        served = {(d, t["name"], t["datatype"], tuple(int(x) for x in t["shape"]))
                  for d, key in (("input", "inputs"), ("output", "outputs")) for t in metadata[key]}
        assert served == {(d, t, kind, tuple(shape)) for d, t, kind, shape in rows}
        assert client.get_model_config(name, as_json=True)["config"]["max_batch_size"] == max_batch


def test_rest_and_both_ensembles_agree_and_the_raw_one_answers_completely(gateway, triton_server):
    model = ServedModel.from_repository(REPOSITORY)
    client = grpcclient.InferenceServerClient(triton_server.grpc_url)
    for name, data in _images():
        rest = httpx.post(f"{gateway.url}/v1/classify", content=data, timeout=60).json()
        tensor = grpcclient.InferInput("image_bytes", [1, 1], "BYTES")
        tensor.set_data_from_numpy(np.array([[data]], dtype=object))
        raw = client.infer(RAW_ENSEMBLE, [tensor])
        served = json.loads(raw.as_numpy("result")[0, 0])
        # the documented uint8 recipe
        field = prepare_array(decode_image(data), model).preprocessed[None]
        image = grpcclient.InferInput("image", list(field.shape), "UINT8")
        image.set_data_from_numpy(field)
        uint8 = client.infer(ENSEMBLE, [image]).as_numpy("probabilities")[0]

        expected = np.array([rest["probabilities"][c] for c in model.classes])
        assert np.abs(raw.as_numpy("probabilities")[0] - expected).max() <= 1e-5, name
        assert np.abs(uint8 - expected).max() <= 1e-5, name
        for key in ("label", "needs_review", "review_threshold", "qc", "cell_count", "cells", "model_version", "scale",
                    "pixel_size_um", "rescaled_by"):
            assert served.get(key) == rest.get(key), (name, key)
        assert [r.split(":")[0] for r in served["review_reasons"]] == [r.split(":")[0] for r in rest["review_reasons"]]
        assert abs(served["ood_score"] - rest["ood_score"]) <= 1e-3 * max(1.0, rest["ood_score"])
        assert np.abs(np.array([served["probabilities"][c] for c in model.classes]) - expected).max() <= 1e-5
        assert bool(raw.as_numpy("needs_review")[0, 0]) == rest["needs_review"]
        assert int(raw.as_numpy("cell_count")[0, 0]) == rest["cell_count"]


def test_a_bad_upload_names_the_gateways_error_code(triton_server):
    client = grpcclient.InferenceServerClient(triton_server.grpc_url)
    tensor = grpcclient.InferInput("image_bytes", [1, 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[b"not an image at all"]], dtype=object))
    with pytest.raises(Exception, match="not_an_image"):
        client.infer(RAW_ENSEMBLE, [tensor])


def _raw_request(images: list[bytes], pixel_sizes: list[float] | None = None) -> list:
    tensor = grpcclient.InferInput("image_bytes", [len(images), 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[data] for data in images], dtype=object))
    if pixel_sizes is None:
        return [tensor]
    stated = grpcclient.InferInput("pixel_size_um", [len(images), 1], "FP32")
    stated.set_data_from_numpy(np.array([[v] for v in pixel_sizes], np.float32))
    return [tensor, stated]


def test_the_raw_ensemble_takes_an_optional_pixel_size_as_rest_does(gateway, triton_server):
    """A field at twice the training magnification: stated, it is fitted like REST's ``?pixel_size_um``;
    left out, it is measured from the red cells; a stated size that cannot be right fails the request."""
    client = grpcclient.InferenceServerClient(triton_server.grpc_url)
    field = synth_field(1, seed=74).image
    zoomed = encode(np.ascontiguousarray(np.kron(field[56:168, 56:168], np.ones((2, 2, 1), np.uint8))))
    training_um = httpx.get(f"{gateway.url}/v1/model", timeout=10).json()["pixel_size_um"]
    stated = float(np.float32(training_um / 2))
    for pixel_sizes, params in (([stated], {"pixel_size_um": stated}), (None, {})):
        raw = client.infer(RAW_ENSEMBLE, _raw_request([zoomed], pixel_sizes))
        served = json.loads(raw.as_numpy("result")[0, 0])
        rest = httpx.post(f"{gateway.url}/v1/classify", params=params, content=zoomed, timeout=60).json()
        assert served["pixel_size_um"] == pytest.approx(rest["pixel_size_um"], rel=1e-6), pixel_sizes
        assert served.get("rescaled_by") == rest.get("rescaled_by") and served["label"] == rest["label"]
        np.testing.assert_allclose(raw.as_numpy("probabilities")[0], list(rest["probabilities"].values()), atol=1e-5)
    assert served["pixel_size_um"] != pytest.approx(stated, abs=1e-3)  # measured, not the stated value
    # one size per image in a batch; a size out of range or not a number fails its request only
    pair = client.infer(RAW_ENSEMBLE, _raw_request([zoomed, zoomed], [stated, training_um]))
    first, second = (json.loads(r[0]) for r in pair.as_numpy("result"))
    assert first["pixel_size_um"] == pytest.approx(stated, abs=1e-4)  # results round to 4 decimals
    assert second["pixel_size_um"] == pytest.approx(training_um, abs=1e-4)
    for bad in (0.0, float("nan"), 50.0):
        with pytest.raises(Exception, match="bad_pixel_size"):
            client.infer(RAW_ENSEMBLE, _raw_request([zoomed], [bad]))
    assert client.infer(RAW_ENSEMBLE, _raw_request([zoomed])).as_numpy("result").shape == (1, 1)


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_serve_on_fixed_ports_and_the_readme_example_runs_verbatim(tmp_path):
    """``hybridcn serve --grpc-port 8001`` (the README's port), then the README's Python example as written."""
    if not _port_free(8001):
        pytest.fail("port 8001, the README example's, is taken on this machine")
    port, http_port = free_port(), free_port()
    log = open(tmp_path / "serve.log", "wb")
    command = [sys.executable, "-m", "hybridcn.cli", "serve", "--port", str(port), "--grpc-port", "8001",
               "--triton-http-port", str(http_port)]
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        def ready() -> bool:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(ready, timeout_s=180, interval_s=0.5)
        endpoints = httpx.get(f"http://127.0.0.1:{port}/readyz").json()["endpoints"]
        assert endpoints["gateway"] == f"http://127.0.0.1:{port}"
        assert endpoints["triton_grpc"] == "127.0.0.1:8001" and endpoints["triton_http"] == f"127.0.0.1:{http_port}"
        assert "gRPC 127.0.0.1:8001" in (tmp_path / "serve.log").read_text()

        example = re.search(r"```python\n(.*?)```", README.read_text().split("### Triton gRPC, for integrators")[1],
                            re.S).group(1)
        (tmp_path / "field.jpg").write_bytes(encode(synth_field(1, seed=80).image, ".jpg"))
        (tmp_path / "example.py").write_text(example)
        run = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, run.stderr
        assert "needs review:" in run.stdout and any(c in run.stdout for c in ("Benign", "Early", "Pre", "Pro"))
    finally:
        os.killpg(server.pid, signal.SIGINT)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()
    time.sleep(0.5)
    assert _port_free(8001)  # the embedded Triton went with it
