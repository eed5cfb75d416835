"""Triton failures: a request that fails is retried (backoff, next endpoint); a dead server stops the run."""

from __future__ import annotations

from pathlib import Path

import cv2
import pytest

from batch.ledger import DONE, FAILED, LEDGER_FILE, PENDING, SQLiteLedger
from batch.pipeline import TritonNotReadyError, _Pipeline
from batch.progress import LogProgress
from batch.runner import BatchOptions
from engine.client import TritonClient
from engine.model import ServedModel
from engine.triton_server import free_port
from hybridcn.synth import synth_field

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
REPOSITORY = ROOT / "model_repository"


def _ledger(tmp_path: Path, n: int) -> SQLiteLedger:
    from batch.inputs import DiscoveryOptions, discover

    for i in range(n):
        path = tmp_path / "queue" / "S1" / f"f{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(path), cv2.cvtColor(synth_field(i % 4, seed=300 + i).image, cv2.COLOR_RGB2BGR))
    ledger = SQLiteLedger(tmp_path / "out" / LEDGER_FILE)
    ledger.register(discover([tmp_path / "queue"], DiscoveryOptions()))
    return ledger


def _pipeline(ledger, urls, messages, **options) -> _Pipeline:
    model = ServedModel.from_repository(REPOSITORY)
    clients = [TritonClient(url, timeout_s=20) for url in urls]
    return _Pipeline(ledger, model, clients, BatchOptions(out_dir=Path("unused"), batch_size=2, inflight=2,
                                                          backoff_s=0.05, **{"restart_grace_s": 0, **options}),
                     LogProgress(messages.append, every_s=3600))


def test_requests_that_fail_on_a_dead_endpoint_are_retried_on_the_next(triton_server, tmp_path):
    ledger = _ledger(tmp_path, 8)
    messages: list[str] = []
    dead = f"127.0.0.1:{free_port()}"  # nothing listens there: every request to it fails
    pipeline = _pipeline(ledger, [dead, triton_server.grpc_url], messages)
    pipeline.run(ledger.pending(), workers=1)
    assert ledger.counts()[DONE] == 8
    assert any("retry 1 of 2" in m and dead in m for m in messages)


def test_a_dead_server_fails_fields_after_the_last_attempt_then_stops_the_run(tmp_path):
    ledger = _ledger(tmp_path, 12)
    messages: list[str] = []
    pipeline = _pipeline(ledger, [f"127.0.0.1:{free_port()}"], messages)
    with pytest.raises(TritonNotReadyError, match="stopped answering.*remaining fields stay pending"):
        pipeline.run(ledger.pending(), workers=1)
    counts = ledger.counts()
    assert counts[FAILED] >= 6 and counts[PENDING] > 0 and counts[FAILED] + counts[PENDING] == 12
    failed = [r for r in ledger.rows() if r.status == FAILED]
    assert all(r.error.startswith("inference failed after 3 attempts") for r in failed)


def test_a_batch_retries_through_a_triton_restart_instead_of_failing_fields(tmp_path):
    import threading

    from engine.triton_server import EmbeddedTriton, wait_until

    ledger = _ledger(tmp_path, 24)
    with EmbeddedTriton(REPOSITORY, ready_timeout=180) as server:
        messages: list[str] = []
        pipeline = _pipeline(ledger, [server.grpc_url], messages, restart_grace_s=60)

        def restart_midway() -> None:  # what the gateway's supervisor does when Triton dies, on the same ports
            wait_until(lambda: pipeline.processed >= 4, timeout_s=120, interval_s=0.05)
            server.restart()

        restarter = threading.Thread(target=restart_midway)
        restarter.start()
        pipeline.run(ledger.pending(), workers=1)  # the ledger's connection belongs to this thread
        restarter.join(timeout=180)
        assert server.restarts == 1
    assert any("retry 1 of 2" in m for m in messages)  # requests did fail while it was down, and were retried
    counts = ledger.counts()
    assert (counts[DONE], counts[FAILED], counts[PENDING]) == (24, 0, 0)
