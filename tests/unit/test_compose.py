"""docker-compose.yml for a GPU host: valid Compose, Triton mounts the GPU target repository."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def resolved() -> dict:
    if shutil.which("docker-compose") is None:
        pytest.skip("Debian's docker-compose is not installed (scripts/setup.sh installs it)")
    result = subprocess.run(["docker-compose", "-f", str(ROOT / "docker-compose.yml"), "config"],
                            capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


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


def test_dockerfiles_copy_paths_that_exist():
    for dockerfile in (ROOT / "deploy").glob("*.Dockerfile"):
        for line in dockerfile.read_text().splitlines():
            if line.startswith("COPY "):
                source = line.split()[1]
                assert (ROOT / source).exists(), f"{dockerfile.name}: {source} does not exist"
