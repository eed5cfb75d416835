"""docker-compose.yml for a GPU host: valid Compose, Triton mounts the GPU target repository, every service
has a health check; the Dockerfiles copy what exists and name their image's Python."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
# the newest ONNX IR version that NVIDIA's Triton image reads: around release 24.10 its ONNX Runtime backend is
# built on ONNX Runtime 1.19 (1.19.2 in 24.09's build), which loads IR <= 10 (measured with onnxruntime 1.19.2);
# onnxruntime 1.23.2, the newest with a wheel for the image's Python 3.10 (the CPU repository's Python steps),
# loads IR <= 11
TRITON_IMAGE_MAX_IR = 10


@pytest.fixture(scope="module")
def resolved() -> dict:
    if shutil.which("docker-compose") is None:
        pytest.skip("Debian's docker-compose is not installed (scripts/setup.sh installs it)")
    result = _config({"HYBRIDCN_API_KEYS": '["test-key"]'})
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


def _config(extra_env: dict[str, str]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "HYBRIDCN_API_KEYS"} | extra_env
    return subprocess.run(["docker-compose", "-f", str(ROOT / "docker-compose.yml"), "config"],
                          capture_output=True, text=True, cwd=ROOT, timeout=60, env=env)


def test_compose_refuses_to_start_the_gateway_without_api_keys(resolved):
    refused = _config({})
    assert refused.returncode != 0 and "HYBRIDCN_API_KEYS" in refused.stderr
    assert resolved["services"]["gateway"]["environment"]["HYBRIDCN_API_KEYS"] == '["test-key"]'


def test_the_gateway_image_requires_keys_and_the_app_enforces_it():
    from gateway.app import create_app
    from gateway.settings import GatewaySettings

    dockerfile = (ROOT / "deploy" / "gateway.Dockerfile").read_text()
    assert "HYBRIDCN_REQUIRE_API_KEYS=true" in dockerfile
    with pytest.raises(ValueError, match="HYBRIDCN_API_KEYS is empty"):
        create_app(GatewaySettings(require_api_keys=True))
    assert create_app(GatewaySettings(require_api_keys=True, api_keys=["k"])) is not None


def test_triton_serves_the_gpu_target_repository_on_a_gpu(resolved):
    triton = resolved["services"]["triton"]
    mounts = [v if isinstance(v, str) else f"{v['source']}:{v['target']}" for v in triton["volumes"]]
    assert any(m.split(":")[0].endswith("model_repository_gpu") and m.split(":")[1] == "/models" for m in mounts)
    assert "--model-repository=/models" in triton["command"]
    devices = triton["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]


def test_gateway_talks_to_triton_and_binds_loopback(resolved):
    gateway = resolved["services"]["gateway"]
    assert gateway["environment"]["HYBRIDCN_TRITON_URL"] == "triton:8001"
    assert "triton" in gateway["depends_on"]
    for service in resolved["services"].values():
        for port in service.get("ports", []):
            host_ip = port["host_ip"] if isinstance(port, dict) else port.split(":")[0]
            assert host_ip == "127.0.0.1"


def test_every_service_has_a_health_check(resolved):
    for name, service in resolved["services"].items():
        check = service.get("healthcheck", {})
        assert check.get("test") and not check.get("disable"), f"{name} has no health check"
        assert check["test"][0] in ("CMD", "CMD-SHELL")
    assert "/readyz" in " ".join(resolved["services"]["gateway"]["healthcheck"]["test"])
    assert resolved["services"]["gateway"]["depends_on"]["triton"]["condition"] == "service_healthy"


class _Status(BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):  # noqa: N802 (http.server's name)
        self.send_response(self.status if self.path == "/readyz" else 404)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("status, healthy", [(200, True), (503, False)])
def test_the_gateway_health_check_follows_readyz(resolved, status, healthy):
    """The check runs in the slim image's Python (no curl there): run the same line against a stand-in."""
    kind, *command = resolved["services"]["gateway"]["healthcheck"]["test"]
    assert kind == "CMD" and command[:2] == ["python", "-c"]
    handler = type("Handler", (_Status,), {"status": status})
    server = HTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        code = command[2].replace("localhost:8000", f"127.0.0.1:{server.server_port}")
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=30)
        assert (result.returncode == 0) is healthy, result.stderr
        with socket.socket() as unused:
            unused.bind(("127.0.0.1", 0))
            closed = command[2].replace("localhost:8000", f"127.0.0.1:{unused.getsockname()[1]}")
        assert subprocess.run([sys.executable, "-c", closed], capture_output=True, timeout=30).returncode != 0
    finally:
        server.shutdown()
        server.server_close()


def _arg_defaults(text: str) -> dict[str, str]:
    return dict(re.findall(r"^ARG (\w+)=(\S+)$", text, flags=re.M))


def test_dockerfiles_copy_paths_that_exist():
    ignored = [line for line in (ROOT / ".dockerignore").read_text().splitlines() if line and line[0] != "#"]
    for dockerfile in (ROOT / "deploy").glob("*.Dockerfile"):
        text = dockerfile.read_text()
        args = _arg_defaults(text)
        for line in text.splitlines():
            if line.startswith("COPY "):
                source = re.sub(r"\$\{(\w+)\}", lambda m, args=args: args[m.group(1)], line.split()[1])
                assert (ROOT / source).exists(), f"{dockerfile.name}: {source} does not exist"
                assert not [p for p in ignored if "*" not in p and Path(source).parts[0] == p], \
                    f"{dockerfile.name}: .dockerignore leaves {source} out of the build context"


def test_dockerfiles_install_for_the_python_they_name():
    """PYTHON_VERSION is the one place each image's Python is named (tests/integration/test_deploy_pins.py
    resolves the pins for it): the gateway's base image is chosen by it, Triton's pip runs under it."""
    gateway = (ROOT / "deploy" / "gateway.Dockerfile").read_text()
    assert "FROM python:${PYTHON_VERSION}-slim" in gateway
    assert _arg_defaults(gateway)["PYTHON_VERSION"] == "3.11"
    triton = (ROOT / "deploy" / "triton.Dockerfile").read_text()
    assert "tritonserver:24.10-py3" in _arg_defaults(triton)["TRITON_IMAGE"]
    assert _arg_defaults(triton)["PYTHON_VERSION"] == "3.10"
    installs = [line for line in triton.splitlines() if "pip install" in line]
    assert installs and all(line.startswith("RUN python${PYTHON_VERSION} -m pip install") for line in installs)


def test_onnx_graphs_load_in_the_triton_image():
    onnx = pytest.importorskip("onnx")
    for path in sorted((ROOT / "model_repository").glob("*/1/model.onnx")):
        ir = onnx.load(str(path), load_external_data=False).ir_version
        assert ir <= TRITON_IMAGE_MAX_IR, f"{path.relative_to(ROOT)}: IR {ir}"
