"""``hybridcn evaluate`` on a labelled folder: the evaluation contract (n, accuracy, balanced_accuracy,
macro_auc, mcc, per_class, confusion), in-process and through Triton."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from hybridcn.synth import write_dataset

pytestmark = pytest.mark.integration
CONTRACT = {"n", "accuracy", "balanced_accuracy", "macro_auc", "mcc", "per_class", "confusion"}


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    root = write_dataset(tmp_path_factory.mktemp("eval") / "data", per_class=3)
    (root / "Original" / "Pro" / "SYN-Pro-999.jpg").write_bytes(b"\xff\xd8\xff broken")
    return root


def _evaluate(labelled, out, *extra) -> dict:
    result = subprocess.run([sys.executable, "-m", "hybridcn.cli", "evaluate", "--data", str(labelled),
                             "--out", str(out), *extra], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "accuracy=" in result.stdout and "confusion" in result.stdout
    return json.loads(out.read_text())


def test_evaluate_in_process_and_through_triton_agree(labelled, triton_server, tmp_path):
    local = _evaluate(labelled, tmp_path / "local.json")
    served = _evaluate(labelled, tmp_path / "served.json", "--triton", triton_server.grpc_url)
    for result in (local, served):
        assert CONTRACT <= set(result)
        assert result["n"] == 12 and len(result["confusion"]) == 4
        assert set(result["per_class"]) == {"Benign", "Early", "Pre", "Pro"}
        assert [e["path"].endswith("SYN-Pro-999.jpg") for e in result["errors"]] == [True]
    assert local["accuracy"] == served["accuracy"] and local["confusion"] == served["confusion"]
    for a, b in zip(local["predictions"], served["predictions"], strict=True):
        assert a["predicted"] == b["predicted"] and abs(a["confidence"] - b["confidence"]) <= 1e-5


def test_the_shift_benchmark_reports_every_kind_against_the_clean_fields(labelled, tmp_path):
    from preprocessing.shifts import SHIFTS

    result = _evaluate(labelled, tmp_path / "shift.json", "--shift", "5")
    shifts = result["shifts"]
    assert shifts["seed"] == 5 and set(shifts["kinds"]) == set(SHIFTS)
    assert shifts["clean"]["accuracy"] == result["accuracy"]
    for row in shifts["kinds"].values():
        assert 0 <= row["accuracy"] <= 1 and 0 <= row["fraction_to_review"] <= 1
        assert row["accuracy_drop_points"] == round(100 * (result["accuracy"] - row["accuracy"]), 2)
    assert shifts["worst_drop_points"] == max(r["accuracy_drop_points"] for r in shifts["kinds"].values())
    again = _evaluate(labelled, tmp_path / "again.json", "--shift", "5")
    assert again["shifts"]["kinds"] == shifts["kinds"]  # seeded: the same fields, the same shifts
