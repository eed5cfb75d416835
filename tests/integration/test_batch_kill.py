"""``kill -9`` of a real ``hybridcn batch`` mid-queue, then the same command again: every field exactly once."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import pytest

from batch.ledger import DONE, LEDGER_FILE, PENDING, SQLiteLedger
from hybridcn.synth import synth_field

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
SLIDES, PER_SLIDE = 6, 8


def _done_so_far(ledger_path: Path) -> dict[str, int] | None:
    try:
        with SQLiteLedger(ledger_path, readonly=True) as ledger:
            return ledger.counts()
    except Exception:  # not created yet, or mid-creation
        return None


@pytest.fixture
def own_triton():
    """A server of this test's own: tritonserver 2.51 can crash (SIGSEGV in TRITONBACKEND_ResponseSend) when a
    client is killed mid-request, and the session's server must not go down with it."""
    from engine.triton_server import EmbeddedTriton

    with EmbeddedTriton(ROOT / "model_repository", ready_timeout=180) as server:
        yield server


def test_sigkill_mid_run_then_rerun_finishes_with_each_field_once(own_triton, tmp_path):
    queue = tmp_path / "queue"
    expected = set()
    for s in range(SLIDES):
        (queue / f"S{s}").mkdir(parents=True)
        for i in range(PER_SLIDE):
            path = queue / f"S{s}" / f"f{i}.png"
            cv2.imwrite(str(path), cv2.cvtColor(synth_field(i % 4, seed=7000 + 10 * s + i).image, cv2.COLOR_RGB2BGR))
            expected.add((f"S{s}", str(path)))
    out = tmp_path / "out"
    command = [sys.executable, "-m", "hybridcn.cli", "batch", str(queue), "--out", str(out), "--progress", "log",
               "--gallery", "0"]
    # small requests, one at a time, so the kill lands in the middle of the queue
    slow = [*command, "--triton", own_triton.grpc_url, "--batch-size", "2", "--inflight", "1", "--workers", "1"]
    process = subprocess.Popen(slow, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        counts = None
        while time.monotonic() < deadline and process.poll() is None:
            counts = _done_so_far(out / LEDGER_FILE)
            if counts and counts[DONE] >= 6:
                break
            time.sleep(0.05)
        assert process.poll() is None, "the batch run ended before it could be killed"
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    # its pool workers and Python's resource tracker end on their own (killing the whole group would take the
    # tracker with it, and leave the pool's semaphores in /dev/shm)
    after_kill = _done_so_far(out / LEDGER_FILE)
    assert process.returncode == -signal.SIGKILL
    assert 6 <= after_kill[DONE] < len(expected) and after_kill[PENDING] > 0, after_kill

    # the rerun starts its own embedded server, as a lab's rerun after a crash would
    finished = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert f"processed {len(expected) - after_kill[DONE]} " in finished.stdout
    with open(out / "results.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    keys = [(r["slide_id"], r["source"]) for r in rows]
    assert len(keys) == len(set(keys)) == len(expected)  # none twice
    assert set(keys) == expected  # none lost
    assert {r["status"] for r in rows} == {DONE}
