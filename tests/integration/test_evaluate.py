"""``hybridcn evaluate`` on a labelled folder: the evaluation contract (n, accuracy, balanced_accuracy,
macro_auc, mcc, per_class, confusion), in-process and through Triton."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hybridcn.synth import write_dataset

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
CONTRACT = {"n", "accuracy", "balanced_accuracy", "macro_auc", "mcc", "per_class", "confusion"}
BINARY_CONTRACT = {"n", "accuracy", "balanced_accuracy", "auc", "mcc", "sensitivity", "specificity", "confusion"}


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


@pytest.fixture(scope="module")
def four_and_binary(tmp_path_factory):
    """The same 12 synthetic fields twice: in the four class folders, and as ``Benign/`` and ``Malignant/``."""
    base = tmp_path_factory.mktemp("binary")
    four = write_dataset(base / "four", per_class=3, seed=1)
    binary = base / "binary"
    shutil.copytree(four / "Original", binary)
    (binary / "Malignant").mkdir()
    for name in ("Early", "Pre", "Pro"):
        for path in sorted((binary / name).iterdir()):
            path.rename(binary / "Malignant" / path.name)
        (binary / name).rmdir()
    return four, binary


def test_binary_mode_scores_benign_against_malignant(four_and_binary, tmp_path):
    from engine.evaluate import evaluate_binary_folder, evaluate_folder

    four, binary = four_and_binary
    out = tmp_path / "binary.json"
    run = subprocess.run([sys.executable, "-m", "hybridcn.cli", "evaluate", "--binary", "--data", str(binary),
                          "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert " auc=" in run.stdout and "specificity" in run.stdout
    result = json.loads(out.read_text())
    assert BINARY_CONTRACT <= set(result) and result["classes"] == ["Benign", "Malignant"]
    assert result["n"] == 12 and result["errors"] == []

    # the metrics are those of the calls P(malignant) >= 0.5 against the folders' labels
    truth = np.array([p["label"] == "Malignant" for p in result["predictions"]])
    called = np.array([p["p_malignant"] >= 0.5 for p in result["predictions"]])
    assert truth.sum() == 9 and [p["predicted"] == "Malignant" for p in result["predictions"]] == called.tolist()
    confusion = [[int((~truth & ~called).sum()), int((~truth & called).sum())],
                 [int((truth & ~called).sum()), int((truth & called).sum())]]
    assert result["confusion"] == confusion
    assert result["accuracy"] == pytest.approx((truth == called).mean())
    assert result["sensitivity"] == pytest.approx(confusion[1][1] / 9)
    assert result["specificity"] == pytest.approx(confusion[0][0] / 3)
    assert result["balanced_accuracy"] == pytest.approx((result["sensitivity"] + result["specificity"]) / 2)
    assert 0 <= result["auc"] <= 1 and -1 <= result["mcc"] <= 1

    # P(malignant) is 1 - P(Benign) of the four-class output, file by file
    quiet = lambda *_: None  # noqa: E731
    classes = evaluate_folder(four, ROOT / "model_repository", log=quiet)["predictions"]
    by_name = {Path(p["path"]).name: p for p in classes}
    for row in result["predictions"]:
        four_class = by_name[Path(row["path"]).name]
        assert row["predicted_class"] == four_class["predicted"]
        if four_class["predicted"] == "Benign":
            assert row["p_malignant"] == pytest.approx(1 - four_class["confidence"], abs=2e-6)
    # the four class folders read as two give the same scores
    collapsed = evaluate_binary_folder(four, ROOT / "model_repository", log=quiet)
    for key in BINARY_CONTRACT:
        assert collapsed[key] == result[key], key


def test_four_class_mode_refuses_a_binary_folder_and_an_unknown_layout(four_and_binary, tmp_path):
    _, binary = four_and_binary
    (tmp_path / "slides" / "S1").mkdir(parents=True)
    for data, expected in [(binary, "Malignant folder"), (tmp_path / "slides", "found ['S1']"),
                           (tmp_path / "missing", "does not exist")]:
        run = subprocess.run([sys.executable, "-m", "hybridcn.cli", "evaluate", "--data", str(data),
                              "--out", str(tmp_path / "never.json")], capture_output=True, text=True, timeout=300)
        assert run.returncode == 2, run.stderr
        assert expected in run.stderr and "Traceback" not in run.stderr
        assert data != binary or "hybridcn evaluate --binary" in run.stderr
    assert not (tmp_path / "never.json").exists()
