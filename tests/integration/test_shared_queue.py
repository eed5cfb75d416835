"""Several ``hybridcn batch`` workers on one PostgreSQL queue, two embedded Tritons, two workers SIGKILLed
mid-run: the survivor takes over their expired leases, every field is done exactly once, none is lost, and
the killed workers leave no process behind."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest

from tests.support import link_queue, write_originals

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
SLIDES, PER_SLIDE = 3, 30


def _queue(root: Path) -> set[tuple[str, str]]:
    """SLIDES x PER_SLIDE fields: 8 distinct synthetic images, hard-linked under distinct names."""
    return set(link_queue(root / "queue", write_originals(root / "originals", 8, seed=9100), SLIDES * PER_SLIDE,
                          PER_SLIDE))


def _done_by(url: str) -> dict[str, int]:
    try:
        with psycopg.connect(url) as connection:
            rows = connection.execute("SELECT done_by, count(*) FROM fields WHERE status = 'done' GROUP BY done_by")
            return dict(rows.fetchall())
    except psycopg.Error:  # not created yet
        return {}


def _registered(url: str) -> int:
    try:
        with psycopg.connect(url) as connection:
            return connection.execute("SELECT count(*) FROM fields").fetchone()[0]
    except psycopg.Error:  # the first worker is still creating the schema
        return 0


def _session_processes(sid: int) -> list[int]:
    """Live processes of a session (a killed worker's pool and forkserver would still be in it)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid and fields[0] != "Z":
                found.append(int(entry.name))
    return found


@pytest.fixture
def two_tritons():
    """Servers of this test's own: tritonserver 2.51 can crash when a client is killed mid-request."""
    from engine.triton_server import EmbeddedTriton

    with EmbeddedTriton(ROOT / "model_repository", ready_timeout=180) as first, \
            EmbeddedTriton(ROOT / "model_repository", ready_timeout=180) as second:
        yield first, second


def test_three_workers_two_killed_every_field_exactly_once(two_tritons, queue_url, tmp_path):
    expected = _queue(tmp_path)
    first, second = two_tritons

    def worker(name: str, triton: str, *inputs: str) -> subprocess.Popen:
        command = [sys.executable, "-m", "hybridcn.cli", "batch", *inputs, "--out", str(tmp_path / name),
                   "--ledger", queue_url, "--worker-id", name, "--triton", triton, "--lease-seconds", "4",
                   "--batch-size", "2", "--inflight", "1", "--workers", "1", "--progress", "log", "--gallery", "2"]
        log = open(tmp_path / f"{name}.log", "w")  # noqa: SIM115 - closed with the process below
        return subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    queue = str(tmp_path / "queue")
    # every worker may register the inputs (idempotent); the third joins with none, as a worker on another
    # machine would
    workers = {"w1": worker("w1", first.grpc_url, queue), "w2": worker("w2", first.grpc_url, queue)}

    def ended() -> str:
        return "; ".join(f"{name} ended ({p.returncode}): {(tmp_path / f'{name}.log').read_text()[-1500:]}"
                         for name, p in workers.items() if p.poll() is not None)

    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not _registered(queue_url):  # a worker with no INPUT joins a
            assert not ended(), ended()  # queue that others filled (an empty one is simply finished)
            time.sleep(0.1)
        workers["w3"] = worker("w3", second.grpc_url)
        while time.monotonic() < deadline:
            done = _done_by(queue_url)
            if done.get("w1", 0) >= 4 and done.get("w2", 0) >= 4:
                break
            assert not ended(), ended()
            time.sleep(0.1)
        else:
            pytest.fail(f"the workers did not get going: {_done_by(queue_url)}")
        for name in ("w1", "w2"):
            os.kill(workers[name].pid, signal.SIGKILL)
        killed_at = _done_by(queue_url)
        survivor = workers["w3"]
        survivor.wait(timeout=300)
        log = (tmp_path / "w3.log").read_text()
        assert survivor.returncode == 0, log[-3000:]
    finally:
        for process in workers.values():
            if process.poll() is None:
                process.kill()
            process.wait(timeout=30)

    with psycopg.connect(queue_url) as connection:
        states = connection.execute("SELECT status, count(*) FROM fields GROUP BY status").fetchall()
        taken_over = connection.execute("SELECT count(*) FROM fields WHERE claims > 1").fetchone()[0]
        recorded = connection.execute("SELECT sum(processed) FROM workers").fetchone()[0]
        leases = connection.execute("SELECT count(*) FROM fields WHERE lease_owner IS NOT NULL").fetchone()[0]
    assert states == [("done", len(expected))]  # none lost, none failed
    assert recorded == len(expected)  # each recorded exactly once, over all workers
    assert leases == 0
    assert taken_over > 0  # the killed workers held leases, which expired and were claimed again
    finished = _done_by(queue_url)
    assert finished["w1"] == killed_at["w1"] and finished["w2"] == killed_at["w2"]  # the dead did no more
    assert finished["w3"] == len(expected) - killed_at["w1"] - killed_at["w2"]

    with open(tmp_path / "w3" / "results.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    keys = [(r["slide_id"], r["source"]) for r in rows]
    assert len(keys) == len(set(keys)) == len(expected) and set(keys) == expected
    assert {r["status"] for r in rows} == {"done"}

    # the whole queue's reports, on demand, from any machine
    report = subprocess.run([sys.executable, "-m", "hybridcn.cli", "batch-reports", "--ledger", queue_url, "--out",
                             str(tmp_path / "reports")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert report.returncode == 0, report.stderr
    assert (tmp_path / "reports" / "results.csv").read_text() == (tmp_path / "w3" / "results.csv").read_text()
    assert len(list((tmp_path / "reports" / "slides").glob("*.html"))) == SLIDES

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_session_processes(workers[n].pid) for n in ("w1", "w2")):
        time.sleep(0.2)
    assert not [pid for n in ("w1", "w2") for pid in _session_processes(workers[n].pid)]
