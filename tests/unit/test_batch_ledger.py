"""The batch ledger: exactly-once recording, states, --retry-failed, model-version guard, readers."""

from __future__ import annotations

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
    SQLiteLedger,
)
from hybridcn.contracts import FieldQCResult, FieldResult

SPECS = [FieldSpec("S2", "/data/S2/a.png"), FieldSpec("S1", "/data/S1/b.png"), FieldSpec("S1", "/data/S1/a.png"),
         FieldSpec("S3", "/data/slide.tif", TILE, 224, 0, 224, 224),
         FieldSpec("S3", "/data/slide.tif", TILE, 0, 0, 224, 224)]


def _done(field_id: int, label: str = "Pre") -> FieldOutcome:
    probabilities = {"Benign": 0.1, "Early": 0.1, "Pre": 0.7, "Pro": 0.1}
    return FieldOutcome(field_id, DONE, FieldResult(
        label=label, probabilities=probabilities, confidence=0.7, needs_review=True,
        review_reasons=["confidence 0.700 below 0.9"], review_threshold=0.9, cell_count=3,
        qc=FieldQCResult(blurred=True, flags=["blurred"]), model_version="v1"))


@pytest.fixture
def ledger(tmp_path):
    with SQLiteLedger(tmp_path / "ledger.sqlite") as opened:
        opened.bind_model("v1")
        yield opened


def test_register_is_idempotent_and_pending_in_queue_order(ledger):
    assert ledger.register(SPECS) == 5
    assert ledger.register(SPECS + [FieldSpec("S1", "/data/S1/c.png")]) == 1  # only the new one
    order = [(p.spec.slide_id, p.spec.source, p.spec.x) for p in ledger.pending()]
    assert order == [("S1", "/data/S1/a.png", 0), ("S1", "/data/S1/b.png", 0), ("S1", "/data/S1/c.png", 0),
                     ("S2", "/data/S2/a.png", 0), ("S3", "/data/slide.tif", 0), ("S3", "/data/slide.tif", 224)]
    assert ledger.counts() == {PENDING: 6, DONE: 0, FAILED: 0, SKIPPED: 0}


def test_a_done_field_is_recorded_exactly_once(ledger):
    ledger.register(SPECS)
    first, second, third, *_ = ledger.pending()
    assert ledger.record([_done(first.field_id), FieldOutcome(second.field_id, SKIPPED, error="background")]) == 2
    # the same field again (a second worker, a replayed group): nothing changes, no second row
    assert ledger.record([_done(first.field_id, label="Benign"), FieldOutcome(first.field_id, FAILED, error="x")]) == 0
    rows = {r.field_id: r for r in ledger.rows()}
    assert len(rows) == 5
    assert rows[first.field_id].status == DONE and rows[first.field_id].label == "Pre"
    assert rows[first.field_id].probabilities["Pre"] == pytest.approx(0.7)
    assert rows[first.field_id].review_reasons == ["confidence 0.700 below 0.9"]
    assert rows[first.field_id].qc_flags == ["blurred"] and rows[first.field_id].needs_review is True
    assert rows[second.field_id].status == SKIPPED
    assert third.field_id in {p.field_id for p in ledger.pending()}
    assert ledger.counts() == {PENDING: 3, DONE: 1, FAILED: 0, SKIPPED: 1}


def test_failed_fields_keep_their_reason_and_retry_failed_requeues_them(ledger):
    ledger.register(SPECS)
    pending = ledger.pending()
    ledger.record([FieldOutcome(pending[0].field_id, FAILED, error="truncated: image data is corrupt")])
    ledger.record([_done(p.field_id) for p in pending[1:]])
    failed = [r for r in ledger.rows() if r.status == FAILED]
    assert [(r.error, r.attempts) for r in failed] == [("truncated: image data is corrupt", 1)]
    assert ledger.pending() == []
    assert ledger.reset_failed() == 1
    assert [p.field_id for p in ledger.pending()] == [pending[0].field_id]
    ledger.record([FieldOutcome(pending[0].field_id, FAILED, error="still corrupt")])
    row = next(r for r in ledger.rows() if r.field_id == pending[0].field_id)
    assert (row.status, row.error, row.attempts) == (FAILED, "still corrupt", 2)
    assert ledger.slide_counts()["S1"] == {PENDING: 0, DONE: 1, FAILED: 1, SKIPPED: 0}


def test_recording_a_pending_state_is_refused(ledger):
    ledger.register(SPECS[:1])
    with pytest.raises(ValueError, match="cannot record status 'pending'"):
        ledger.record([FieldOutcome(ledger.pending()[0].field_id, PENDING)])


def test_another_model_version_is_refused_naming_both(tmp_path):
    with SQLiteLedger(tmp_path / "ledger.sqlite") as ledger:
        ledger.bind_model("compact-aaaa")
        ledger.bind_model("compact-aaaa")  # the same model again is fine
    with SQLiteLedger(tmp_path / "ledger.sqlite") as ledger:
        with pytest.raises(ModelVersionMismatchError, match="'compact-aaaa'.*'compact-bbbb'"):
            ledger.bind_model("compact-bbbb")


def test_state_survives_reopening_and_a_reader_sees_commits_while_the_writer_is_open(tmp_path):
    path = tmp_path / "ledger.sqlite"
    writer = SQLiteLedger(path)
    writer.bind_model("v1")
    writer.register(SPECS)
    reader = SQLiteLedger(path, readonly=True)
    assert reader.counts()[PENDING] == 5
    writer.record([_done(writer.pending()[0].field_id)])
    assert reader.counts()[DONE] == 1
    assert reader.get_meta()["model_version"] == "v1" and "created" in reader.get_meta()
    reader.close()
    writer.close()
    with SQLiteLedger(path) as reopened:
        assert reopened.counts() == {PENDING: 4, DONE: 1, FAILED: 0, SKIPPED: 0}


def test_readonly_open_of_a_missing_ledger_is_a_ledger_error(tmp_path):
    with pytest.raises(LedgerError, match="no ledger"):
        SQLiteLedger(tmp_path / "missing.sqlite", readonly=True)


def test_a_file_that_is_not_a_database_is_a_ledger_error(tmp_path):
    path = tmp_path / "ledger.sqlite"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(LedgerError, match="cannot open the ledger"):
        SQLiteLedger(path)


def test_a_full_disk_rolls_the_whole_write_back_and_says_so(ledger):
    ledger.register(SPECS)
    pages = ledger._db.execute("PRAGMA page_count").fetchone()[0]
    ledger._db.execute(f"PRAGMA max_page_count = {pages}")  # SQLite's own 'database or disk is full'
    many = [FieldSpec("S9", f"/data/S9/{i:05d}-{'x' * 200}.png") for i in range(2000)]
    with pytest.raises(LedgerError, match="refused a write.*full.*rolled back"):
        ledger.register(many)
    assert ledger.counts()[PENDING] == 5  # none of the 2000, not some of them
    ledger.record([_done(ledger.pending()[0].field_id)])  # small writes still fit
    assert ledger.counts()[DONE] == 1


def test_a_pixel_size_is_kept_and_a_schema_3_ledger_gains_its_column(tmp_path):
    import sqlite3

    path = tmp_path / "ledger.sqlite"
    with SQLiteLedger(path) as ledger:
        ledger.register([FieldSpec("S", "/a.png", pixel_size_um=0.31), FieldSpec("S", "/b.png")])
        assert [p.spec.pixel_size_um for p in ledger.pending()] == [0.31, None]
    db = sqlite3.connect(path)  # rewind to schema 3: no pixel_size_um column
    db.execute("ALTER TABLE fields DROP COLUMN pixel_size_um")
    db.execute("UPDATE meta SET value = '3' WHERE key = 'schema'")
    db.commit()
    db.close()
    with SQLiteLedger(path) as ledger:
        assert [p.spec.pixel_size_um for p in ledger.pending()] == [None, None]
        assert ledger.get_meta()["schema"] == "4"
