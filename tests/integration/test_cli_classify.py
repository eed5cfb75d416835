"""``hybridcn classify`` as a lab user runs it: folders, CSV and JSON Lines, one-line errors."""

from __future__ import annotations

import csv
import subprocess
import sys

import pytest

from hybridcn.contracts import FieldResult
from hybridcn.synth import synth_field
from tests.conftest import ROOT, encode

pytestmark = pytest.mark.integration


def _hybridcn(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hybridcn.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("queue")
    (root / "slide-1" / "deep").mkdir(parents=True)
    (root / "slide-1" / "a.png").write_bytes(encode(synth_field(0, seed=90).image))
    (root / "slide-1" / "deep" / "b.jpg").write_bytes(encode(synth_field(2, seed=91).image, ".jpg"))
    (root / "slide-1" / "notes.txt").write_text("not a field")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return root


def test_a_folder_is_classified_recursively_into_csv(folder, triton_server, tmp_path):
    out = tmp_path / "fields.csv"
    result = _hybridcn("classify", str(folder), "--triton", triton_server.grpc_url, "--csv", str(out))
    assert result.returncode == 1, result.stderr  # one file is broken: reported, the rest go on
    rows = list(csv.DictReader(out.open()))
    assert [r["file"].removeprefix(str(folder) + "/") for r in rows] == ["broken.png", "slide-1/a.png",
                                                                         "slide-1/deep/b.jpg"]
    broken, *good = rows
    assert broken["error"] and not broken["label"]
    for row in good:
        assert row["label"] in ("Benign", "Early", "Pre", "Pro") and not row["error"]
        assert abs(sum(float(row[f"p_{c}"]) for c in ("Benign", "Early", "Pre", "Pro")) - 1) < 1e-3
        assert row["needs_review"] == "1" and float(row["review_threshold"]) > 0
        assert float(row["ood_score"]) > 1 and "out_of_distribution" in row["review_reasons"]
    assert "2 of 3 fields classified" in result.stderr and "Traceback" not in result.stderr


def test_json_lines_are_field_results(folder, triton_server):
    result = _hybridcn("classify", str(folder / "slide-1"), "--triton", triton_server.grpc_url, "--json")
    assert result.returncode == 0, result.stderr
    lines = [FieldResult.model_validate_json(line) for line in result.stdout.splitlines()]
    assert [line.filename.rsplit("/", 1)[1] for line in lines] == ["a.png", "b.jpg"]
    assert all(line.review_threshold is not None and line.model_version for line in lines)
    assert all(line.ood_score > 1 and line.needs_review for line in lines)  # synthetic: out of distribution


@pytest.mark.parametrize("args, message", [
    (["classify", "/no/such/field.png"], "/no/such/field.png: no such file or folder"),
    (["classify", "{empty}"], "no image files"),
    (["classify", "{field}", "--triton", "127.0.0.1:1"], "Triton at 127.0.0.1:1 is not reachable"),
    (["evaluate", "--data", "/no/such/folder", "--out", "{out}"], "/no/such/folder"),
])
def test_user_errors_are_one_line_and_a_non_zero_exit(args, message, folder, tmp_path):
    (tmp_path / "empty").mkdir()
    values = {"empty": str(tmp_path / "empty"), "field": str(folder / "slide-1" / "a.png"),
              "out": str(tmp_path / "out.json")}
    result = _hybridcn(*(a.format(**values) for a in args))
    assert result.returncode != 0
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert message in result.stderr
