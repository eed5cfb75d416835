"""Schemathesis against the live gateway: generated requests for every operation of its OpenAPI document
(coverage, fuzzing and stateful phases), checked for server errors and for answers the document does not
describe (status codes, content types, headers, bodies)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
CHECKS = ("not_a_server_error,status_code_conformance,content_type_conformance,response_headers_conformance,"
          "response_schema_conformance")


def test_schemathesis_finds_no_server_error_and_no_schema_violation(gateway, tmp_path):
    command = [str(Path(sys.executable).with_name("schemathesis")), "run", f"{gateway.url}/openapi.json",
               "--checks", CHECKS, "--phases", "coverage,fuzzing,stateful", "--max-examples", "30", "--seed", "2026",
               "--workers", "1", "--request-timeout", "30", "--max-time", "240", "--generation-deterministic",
               "--report", "junit", "--report-dir", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=420, cwd=tmp_path)
    tail = result.stdout[-6000:]
    assert result.returncode == 0, tail
    cases = [line for line in result.stdout.splitlines() if "generated" in line and "Test cases" not in line]
    assert cases, tail  # it really generated requests
