"""Schemathesis against the live gateway: generated requests for every operation of its OpenAPI document
(coverage, fuzzing and stateful phases), checked for server errors and for answers the document does not
describe (status codes, content types, headers, bodies)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
CHECKS = ("not_a_server_error,status_code_conformance,content_type_conformance,response_headers_conformance,"
          "response_schema_conformance")


def test_schemathesis_finds_no_server_error_and_no_schema_violation(gateway, tmp_path):
    command = [str(Path(sys.executable).with_name("schemathesis")), "run", f"{gateway.url}/openapi.json",
               "--checks", CHECKS, "--phases", "coverage,fuzzing,stateful", "--max-examples", "100", "--seed", "2026",
               "--workers", "1", "--request-timeout", "30"]  # no --max-time: it would repeat fuzzing until spent
    result = subprocess.run(command, capture_output=True, text=True, timeout=420, cwd=tmp_path)
    tail = result.stdout[-6000:]
    assert result.returncode == 0, tail
    generated = re.search(r"(\d+) generated", result.stdout)
    assert generated and int(generated.group(1)) >= 500, tail  # it really sent that many requests
