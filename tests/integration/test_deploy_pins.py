"""Every image's pins resolve to wheels for the Python of that image (needs the package registry).

Two images install deploy/requirements-serve.txt: the gateway (python:<PYTHON_VERSION>-slim) and NVIDIA's
Triton (its Ubuntu's Python). Each Dockerfile names its Python once, in ``ARG PYTHON_VERSION``. For each
image this test evaluates the file's environment markers for that Python (pip evaluates them for the Python
that runs it, not for ``--python-version``) and has pip resolve the whole set, pins and their dependencies,
from wheels only for CPython on manylinux x86_64, installing nothing. It asks PyPI itself (``--isolated``:
no local wheel folders or mirrors), as a ``docker build`` does; without PyPI it is skipped.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = ("gateway.Dockerfile", "triton.Dockerfile")
# glibc of the base images: Ubuntu 22.04 (2.35) under tritonserver:24.10, Debian 12 (2.36) under
# python:3.11-slim; wheels for any manylinux tag up to 2.35 install on both
PLATFORMS = ["manylinux1_x86_64", "manylinux2010_x86_64", "manylinux2014_x86_64",
             *(f"manylinux_2_{minor}_x86_64" for minor in range(5, 36))]
REGISTRY = ("pypi.org", 443)


def image_python(dockerfile: str) -> str:
    (version,) = re.findall(r"^ARG PYTHON_VERSION=(\d+\.\d+)$", (ROOT / "deploy" / dockerfile).read_text(), re.M)
    return version


def image_requirements(dockerfile: str) -> Path:
    (path,) = set(re.findall(r"pip install .*-r (\S+)", (ROOT / "deploy" / dockerfile).read_text()))
    return ROOT / path


def pins_for(path: Path, python: str) -> list[Requirement]:
    """The requirements pip would install on a Linux x86_64 CPython ``python``, markers evaluated and dropped."""
    environment = {**default_environment(), "python_version": python, "python_full_version": f"{python}.0",
                   "implementation_name": "cpython", "platform_python_implementation": "CPython",
                   "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64"}
    chosen = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        requirement = Requirement(line)
        if requirement.marker is None or requirement.marker.evaluate(environment):
            requirement.marker = None
            chosen.append(requirement)
    return chosen


@pytest.fixture(scope="module")
def registry() -> None:
    try:
        socket.create_connection(REGISTRY, timeout=5).close()
    except OSError as error:
        pytest.skip(f"the package registry ({REGISTRY[0]}:{REGISTRY[1]}) cannot be reached: {error}")


def test_each_image_gets_one_pin_of_every_package():
    """The markers leave each image exactly one pin per package, and both images the same packages."""
    names = {}
    for dockerfile in DOCKERFILES:
        pins = pins_for(image_requirements(dockerfile), image_python(dockerfile))
        listed = [canonicalize_name(pin.name) for pin in pins]
        assert len(listed) == len(set(listed)), f"{dockerfile}: a package is pinned twice"
        assert all(len(pin.specifier) == 1 and next(iter(pin.specifier)).operator == "==" for pin in pins)
        names[dockerfile] = set(listed)
    assert names["gateway.Dockerfile"] == names["triton.Dockerfile"]
    assert "numpy" in names["triton.Dockerfile"]
    (numpy,) = [p for p in pins_for(image_requirements("triton.Dockerfile"), "3.10") if p.name == "numpy"]
    assert next(iter(numpy.specifier)).version.startswith("1."), "Triton's Python stub needs numpy < 2"


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_the_pins_resolve_to_wheels_for_the_image_python(registry, dockerfile, tmp_path):
    python = image_python(dockerfile)
    pins = pins_for(image_requirements(dockerfile), python)
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("".join(f"{pin}\n" for pin in pins))
    report = tmp_path / "report.json"
    command = [sys.executable, "-m", "pip", "install", "--isolated", "--dry-run", "--ignore-installed", "--quiet",
               "--disable-pip-version-check", "--retries", "2", "--timeout", "30",
               "--target", str(tmp_path / "target"), "--report", str(report),
               "--only-binary=:all:", "--implementation", "cp", "--python-version", python,
               *(f"--platform={platform}" for platform in PLATFORMS), "-r", str(requirements)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, f"{dockerfile} (Python {python}):\n{result.stderr[-3000:]}"
    installed = {canonicalize_name(item["metadata"]["name"]): item
                 for item in json.loads(report.read_text())["install"]}
    for pin in pins:
        item = installed[canonicalize_name(pin.name)]
        assert item["metadata"]["version"] == next(iter(pin.specifier)).version
    for name, item in installed.items():
        assert item["download_info"]["url"].endswith(".whl"), f"{name} would be built from source"
