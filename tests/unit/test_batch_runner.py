"""Errors that stop ``hybridcn batch`` before any field is processed (no Triton needed)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import cv2
import pytest

from batch.ledger import LEDGER_FILE, ModelVersionMismatchError, SQLiteLedger
from batch.runner import BatchOptions, run_batch
from hybridcn.synth import synth_field

ROOT = Path(__file__).resolve().parents[2]


def _queue(tmp_path: Path) -> Path:
    slide = tmp_path / "queue" / "S1"
    slide.mkdir(parents=True)
    cv2.imwrite(str(slide / "f0.png"), cv2.cvtColor(synth_field(0, seed=1).image, cv2.COLOR_RGB2BGR))
    return slide.parent


def test_an_output_folder_of_another_model_version_is_refused(tmp_path):
    out = tmp_path / "out"
    with SQLiteLedger(out / LEDGER_FILE) as ledger:
        ledger.bind_model("compact-0000000000")
    options = BatchOptions(out_dir=out, repository=ROOT / "model_repository", triton_urls=("127.0.0.1:1",))
    with pytest.raises(ModelVersionMismatchError, match=r"model version 'compact-0000000000'.*refusing to mix"):
        run_batch([_queue(tmp_path)], options)


def test_the_command_exits_non_zero_naming_an_unreadable_input(tmp_path):
    queue = _queue(tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "hybridcn.cli", "batch", str(queue), str(tmp_path / "typo"), "--out",
         str(tmp_path / "out"), "--triton", "127.0.0.1:1"],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )
    assert result.returncode == 1
    assert "typo: no such file or folder" in result.stderr
    assert not (tmp_path / "out").exists()  # nothing started


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        BatchOptions(out_dir=Path("x"), batch_size=0)
    with pytest.raises(ValueError, match="ort_threads must be >= 0"):
        BatchOptions(out_dir=Path("x"), ort_threads=-1)


def test_the_embedded_server_a_batch_starts_runs_one_ort_thread_per_stage(monkeypatch):
    from engine.triton_server import EmbeddedTriton

    monkeypatch.delenv("HYBRIDCN_ORT_THREADS", raising=False)
    assert "HYBRIDCN_ORT_THREADS" not in EmbeddedTriton(Path("repo")).environment()  # serve: repository setting
    threads = BatchOptions(out_dir=Path("x")).ort_threads
    assert EmbeddedTriton(Path("repo"), ort_threads=threads).environment()["HYBRIDCN_ORT_THREADS"] == "1"


def test_endpoints_are_used_round_robin_and_a_retry_goes_elsewhere():
    from types import SimpleNamespace

    from batch.pipeline import _Pipeline, _Request

    clients = [SimpleNamespace(url=u) for u in ("a:1", "b:1", "c:1")]
    pipeline = _Pipeline(None, None, clients, BatchOptions(out_dir=Path("x")), None, {})
    assert [pipeline._pick(_Request([])).url for _ in range(4)] == ["a:1", "b:1", "c:1", "a:1"]
    retry = _Request([], tried={"b:1", "c:1"})
    assert pipeline._pick(retry).url == "a:1"  # the one it has not failed on, even out of turn
    pipeline._resting["c:1"] = float("inf")
    assert [pipeline._pick(_Request([])).url for _ in range(3)] == ["b:1", "a:1", "b:1"]  # c:1 skipped
    assert pipeline._pick(_Request([], tried={"a:1", "b:1"})).url == "c:1"  # resting, but the only one left


def test_every_run_stopping_error_is_a_batch_error_the_cli_reports_in_one_line():
    from batch.errors import BatchError, OutputBusyError, TritonNotReadyError

    assert issubclass(OutputBusyError, BatchError) and issubclass(TritonNotReadyError, BatchError)
