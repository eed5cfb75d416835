"""The PostgreSQL ledger on a real server: migrations, SKIP LOCKED claims, leases that expire and are taken
over, exactly-once recording, streamed registration and rows, and the same contract as the SQLite ledger."""

from __future__ import annotations

import threading
import time

import psycopg
import pytest

from batch.ledger import (
    DONE,
    FAILED,
    PENDING,
    SKIPPED,
    TILE,
    FieldOutcome,
    FieldSpec,
    LedgerError,
    ModelVersionMismatchError,
    PostgresLedger,
    open_ledger,
    redact_url,
)
from batch.ledger.postgres import MIGRATIONS, SCHEMA_VERSION
from hybridcn.contracts import FieldQCResult, FieldResult

pytestmark = pytest.mark.integration


def _specs(n: int, slides: int = 3) -> list[FieldSpec]:
    return [FieldSpec(f"S{i % slides}", f"/data/S{i % slides}/f{i:05d}.png") for i in range(n)]


def _done(field_id: int, label: str = "Pre") -> FieldOutcome:
    return FieldOutcome(field_id, DONE, FieldResult(
        label=label, probabilities={"Benign": 0.1, "Early": 0.1, "Pre": 0.7, "Pro": 0.1}, confidence=0.7,
        needs_review=True, review_reasons=["confidence 0.700 below 0.9"], review_threshold=0.9, cell_count=3,
        qc=FieldQCResult(), model_version="v1"))


@pytest.fixture
def ledger(queue_url):
    with open_ledger(queue_url) as opened:
        assert isinstance(opened, PostgresLedger)
        opened.bind_model("v1")
        yield opened


def test_schema_is_migrated_once_even_by_workers_starting_together(queue_url):
    errors: list[BaseException] = []

    def start() -> None:
        try:
            with PostgresLedger(queue_url) as opened:
                assert opened.schema_version == SCHEMA_VERSION
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    with psycopg.connect(queue_url) as connection:
        applied = connection.execute("SELECT version FROM schema_migrations ORDER BY version").fetchall()
        assert applied == [(version,) for version, _ in MIGRATIONS] and applied[-1] == (SCHEMA_VERSION,)
        connection.execute("INSERT INTO schema_migrations (version) VALUES (%s)", (SCHEMA_VERSION + 1,))
    with pytest.raises(LedgerError, match="newer than this version"):
        PostgresLedger(queue_url)


def test_register_streams_is_idempotent_and_all_or_nothing(ledger):
    assert ledger.register(iter(_specs(50))) == 50
    assert ledger.register(iter(_specs(60))) == 10
    assert ledger.register(_specs(5) + [FieldSpec("S9", "/x/t.tif", TILE, 0, 224, 224, 224, 0.21)]) == 1
    assert [r.spec.pixel_size_um for r in ledger.iter_rows() if r.spec.slide_id == "S9"] == [0.21]

    def broken():
        yield FieldSpec("S8", "/x/new.png")
        raise OSError("the disk went away during discovery")

    with pytest.raises(OSError, match="disk went away"):  # the discovery error itself, nothing kept
        ledger.register(broken())
    assert ledger.counts() == {PENDING: 61, DONE: 0, FAILED: 0, SKIPPED: 0}
    order = [(r.spec.slide_id, r.spec.source) for r in ledger.iter_rows()]
    assert order == sorted(order)  # queue order: slide, source, tile row, tile column


def test_concurrent_claims_never_hand_out_a_field_twice(ledger, queue_url):
    ledger.register(_specs(400))
    claimed: dict[str, list[int]] = {}

    def work(name: str) -> None:
        with PostgresLedger(queue_url) as mine:
            got = claimed.setdefault(name, [])
            while batch := mine.claim(name, 7, lease_s=60):
                got.extend(p.field_id for p in batch)

    threads = [threading.Thread(target=work, args=(f"w{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    everything = [i for ids in claimed.values() for i in ids]
    assert len(everything) == len(set(everything)) == 400
    assert sum(1 for ids in claimed.values() if ids) >= 2  # the work was shared


def test_expired_leases_are_taken_over_and_late_results_are_refused(ledger):
    ledger.register(_specs(10))
    first = ledger.claim("slow", 4, lease_s=1)
    assert ledger.claim("other", 10, lease_s=60)  # the other 6
    assert ledger.claim("other", 10, lease_s=60) == []  # nothing free, nothing expired yet
    time.sleep(1.5)
    taken = ledger.claim("other", 10, lease_s=60)
    assert [p.field_id for p in taken] == [p.field_id for p in first]  # the expired ones, in id order
    assert ledger.record([_done(p.field_id) for p in first], worker="slow") == 0  # too late: not its fields now
    assert ledger.record([_done(p.field_id, "Pro") for p in taken], worker="other") == 4
    with psycopg.connect(ledger.url) as connection:
        rows = connection.execute("SELECT done_by, claims, label FROM fields WHERE id = ANY(%s)",
                                  ([p.field_id for p in first],)).fetchall()
    assert rows == [("other", 2, "Pro")] * 4
    assert {w["id"]: w["processed"] for w in ledger.workers()}["other"] == 4


def test_renewed_leases_survive_and_release_hands_them_back(ledger):
    ledger.register(_specs(6))
    mine = ledger.claim("alive", 6, lease_s=1.5)
    for _ in range(3):
        time.sleep(0.6)
        assert ledger.renew("alive", 1.5) == 6
    assert ledger.claim("thief", 6, lease_s=60) == []  # renewed in time: nothing expired
    assert ledger.release("alive") == 6
    assert {p.field_id for p in ledger.claim("thief", 6, lease_s=60)} == {p.field_id for p in mine}


def test_a_field_is_recorded_exactly_once(ledger):
    ledger.register(_specs(3))
    a, b, c = ledger.claim("w", 3)
    assert ledger.record([_done(a.field_id), FieldOutcome(b.field_id, SKIPPED, error="background")], worker="w") == 2
    assert ledger.record([_done(a.field_id, "Benign"), FieldOutcome(a.field_id, FAILED, error="x")], worker="w") == 0
    assert ledger.record([FieldOutcome(c.field_id, FAILED, error="unreadable: gone")], worker="w") == 1
    rows = {r.field_id: r for r in ledger.rows()}
    assert rows[a.field_id].label == "Pre" and rows[a.field_id].result.cell_count == 3
    assert rows[c.field_id].attempts == 1 and rows[c.field_id].error == "unreadable: gone"
    assert ledger.reset_failed() == 1
    assert [p.field_id for p in ledger.pending()] == [c.field_id]


def test_gallery_images_and_meta(ledger):
    ledger.register(_specs(2))
    a, b = ledger.claim("w", 2)
    ledger.record([_done(a.field_id), _done(b.field_id)], worker="w",
                  gallery={a.field_id: {"field": "data:a"}, b.field_id: {"field": "data:b"}})
    ledger.record([], worker="w", drop_gallery=[b.field_id])
    assert ledger.gallery_images([a.field_id, b.field_id]) == {a.field_id: {"field": "data:a"}}
    ledger.set_meta(run_state="running", inputs="[]")
    ledger.set_meta(run_state="done")
    meta = ledger.get_meta()
    assert meta["run_state"] == "done" and meta["model_version"] == "v1" and "created" in meta


def test_another_model_version_is_refused(ledger, queue_url):
    with PostgresLedger(queue_url) as other, pytest.raises(ModelVersionMismatchError, match="'v1'.*'v2'"):
        other.bind_model("v2")


def test_readonly_refuses_writes_and_a_missing_queue(ledger, queue_url, postgres):
    ledger.register(_specs(2))
    with PostgresLedger(queue_url, readonly=True) as reader:
        assert reader.counts()[PENDING] == 2
        with pytest.raises(LedgerError, match="read-only"):
            reader.register(_specs(3))
    with pytest.raises(LedgerError, match="holds no batch queue"):
        PostgresLedger(postgres.create_database(), readonly=True)


def test_errors_name_the_database_without_its_password(postgres):
    from engine.triton_server import free_port

    url = f"postgresql://someone:s3cret@127.0.0.1:{free_port()}/queue"
    assert redact_url(url) == f"postgresql://someone:***@127.0.0.1:{url.split(':')[3]}"
    with pytest.raises(LedgerError) as caught:
        PostgresLedger(url, connect_timeout_s=2)
    assert "s3cret" not in str(caught.value) and "***" in str(caught.value)
