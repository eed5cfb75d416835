"""The README's main job and the training command line, run as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from hybridcn.synth import write_dataset

pytestmark = pytest.mark.integration


def _run(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hybridcn.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_demo_serves_the_shipped_model_and_classifies_a_queue():
    result = _run("demo", "--count", "4")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "ready: model compact-" in result.stdout
    assert result.stdout.count(" conf=") == 4
    assert "broken.jpg: HTTP 400 truncated" in result.stdout
    assert "done: 4/5 fields classified" in result.stdout


def test_train_is_resumable_and_its_model_exports(tmp_path):
    data = write_dataset(tmp_path / "data", per_class=6, size=64)
    run = tmp_path / "run"
    flags = ["--data", str(data), "--profile", "tiny", "--out", str(run), "--seg-epochs", "1",
             "--backbone-epochs", "1", "--head-epochs", "2", "--batch-size", "8", "--workers", "1", "--device", "cpu"]
    first = _run("train", *flags)
    assert first.returncode == 0, first.stderr[-2000:]
    assert (run / "model.pt").is_file() and (run / "config.json").is_file()
    assert "phase 4 done" in (run / "log.txt").read_text()
    assert json.loads((run / "config.json").read_text())["train_seconds"] > 0
    again = _run("train", *flags)
    assert again.returncode == 0 and "already trained" in again.stdout
    exported = _run("export", "--model", str(run / "model.pt"), "--out", str(tmp_path / "repo"))
    assert exported.returncode == 0, exported.stderr[-2000:]
    assert (tmp_path / "repo" / "hybridcn_nas" / "manifest.json").is_file()
