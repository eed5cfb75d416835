"""The ledger as one SQLite file in the output folder (WAL mode): the default, for one worker per queue.

The runner writes each completed group of fields in one transaction, and every output file is
regenerated from the ledger, so a run killed at any moment (SIGKILL included) leaves either a committed
result or a pending field, never half of one; running the same command again (which first drops the
dead run's leases: the output folder's lock says no other run is alive) finishes the pending fields.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

from batch.ledger.base import (
    DEFAULT_LEASE_S,
    FAILED,
    FIELD,
    PENDING,
    STATES,
    TILE,
    FieldOutcome,
    FieldRow,
    FieldSpec,
    Ledger,
    LedgerError,
    ModelVersionMismatchError,
    PendingField,
    now_iso,
    result_json,
    row_from_columns,
)

LEDGER_FILE = "ledger.sqlite"
#: 2: the whole FieldResult as JSON in fields.result; 3: leases (lease_owner, lease_until) for claims.
SCHEMA_VERSION = "4"

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS fields (
    id INTEGER PRIMARY KEY,
    slide_id TEXT NOT NULL,
    source TEXT NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('{FIELD}', '{TILE}')),
    tile_x INTEGER NOT NULL DEFAULT 0,
    tile_y INTEGER NOT NULL DEFAULT 0,
    tile_w INTEGER NOT NULL DEFAULT 0,
    tile_h INTEGER NOT NULL DEFAULT 0,
    pixel_size_um REAL,
    status TEXT NOT NULL DEFAULT '{PENDING}' CHECK (status IN ({", ".join(f"'{s}'" for s in STATES)})),
    label TEXT,
    probabilities TEXT,
    confidence REAL,
    needs_review INTEGER,
    review_reasons TEXT,
    cell_count INTEGER,
    qc_flags TEXT,
    model_version TEXT,
    error TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    updated REAL,
    result TEXT,
    lease_owner TEXT,
    lease_until REAL,
    UNIQUE (slide_id, source, tile_x, tile_y)
);
CREATE INDEX IF NOT EXISTS fields_status ON fields (status);
CREATE TABLE IF NOT EXISTS gallery (field_id INTEGER PRIMARY KEY REFERENCES fields (id), images TEXT NOT NULL);
"""
#: Created after migrations (they index columns an older ledger gains there).
_INDEXES = """
CREATE INDEX IF NOT EXISTS fields_order ON fields (slide_id, source, tile_y, tile_x);
CREATE INDEX IF NOT EXISTS fields_claimable ON fields (id) WHERE status = 'pending';
CREATE INDEX IF NOT EXISTS fields_leased ON fields (lease_owner) WHERE status = 'pending';
"""

_ORDER = "ORDER BY slide_id, source, tile_y, tile_x"
_SPEC = "id, slide_id, source, kind, tile_x, tile_y, tile_w, tile_h, pixel_size_um"
_COLUMNS = (f"{_SPEC}, status, result, error, attempts, updated, "
            "label, probabilities, confidence, needs_review, review_reasons, cell_count, qc_flags, model_version")
_LEGACY = ("label", "probabilities", "confidence", "needs_review", "review_reasons", "cell_count", "qc_flags",
           "model_version")


class SQLiteLedger(Ledger):
    """The ledger as ``DIR/ledger.sqlite`` in WAL mode: one writer (the runner), any number of readers.

    ``readonly=True`` opens an existing ledger for the jobs API without ever writing to it.
    """

    def __init__(self, path: str | Path, *, readonly: bool = False, timeout_s: float = 30.0) -> None:
        self.path = Path(path)
        self.location = str(self.path)
        self.readonly = readonly
        self._timeout_s = timeout_s
        self._heartbeat: sqlite3.Connection | None = None
        self._heartbeat_lock = threading.Lock()
        try:
            if readonly:
                if not self.path.is_file():
                    raise LedgerError(f"no ledger at {self.path}")
                self._db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=timeout_s)
            else:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._db = self._connect()
                with self._transaction():
                    for statement in filter(str.strip, _SCHEMA.split(";")):
                        self._db.execute(statement)
                    self._migrate()
                    for statement in filter(str.strip, _INDEXES.split(";")):
                        self._db.execute(statement)
                    self._db.execute("INSERT OR IGNORE INTO meta VALUES ('created', ?)", (now_iso(),))
        except sqlite3.DatabaseError as error:
            raise LedgerError(f"cannot open the ledger {self.path}: {error}") from error

    def _connect(self, *, any_thread: bool = False) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=self._timeout_s, isolation_level=None,
                             check_same_thread=not any_thread)
        db.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode: a committed transaction survives any crash of this process;
        # only a power cut can roll back the last few (which are then simply done again).
        db.execute("PRAGMA synchronous=NORMAL")
        return db

    def _transaction(self, db: sqlite3.Connection | None = None):
        return _Transaction(db or self._db, self.path)

    def _migrate(self) -> None:
        """Bring a ledger written by an older version to :data:`SCHEMA_VERSION` (inside the open transaction)."""
        row = self._db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
        version = row[0] if row else SCHEMA_VERSION
        if version not in ("1", "2", "3", SCHEMA_VERSION):
            raise LedgerError(f"{self.path} has ledger schema {version}, newer than this version's {SCHEMA_VERSION}; "
                              "upgrade hybridcn-nas to read it")
        # 1 -> 2: results were columns only; rows keep them and get a result rebuilt when read.
        # 2 -> 3: leases; 3 -> 4: the pixel size of a field. Each only adds columns.
        columns = {info[1] for info in self._db.execute("PRAGMA table_info(fields)")}
        for name, kind in (("result", "TEXT"), ("lease_owner", "TEXT"), ("lease_until", "REAL"),
                           ("pixel_size_um", "REAL")):
            if name not in columns:
                self._db.execute(f"ALTER TABLE fields ADD COLUMN {name} {kind}")
        self._db.execute("INSERT OR REPLACE INTO meta VALUES ('schema', ?)", (SCHEMA_VERSION,))

    def get_meta(self) -> dict[str, str]:
        return dict(self._db.execute("SELECT key, value FROM meta").fetchall())

    def set_meta(self, **values: str) -> None:
        with self._transaction():
            self._db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                                 [(key, str(value)) for key, value in values.items()])

    def bind_model(self, model_version: str) -> None:
        with self._transaction():
            row = self._db.execute("SELECT value FROM meta WHERE key = 'model_version'").fetchone()
            if row is None:
                self._db.execute("INSERT INTO meta VALUES ('model_version', ?)", (model_version,))
            elif row[0] != model_version:
                raise ModelVersionMismatchError(
                    f"{self.path.parent} holds results of model version {row[0]!r}, but the served model is "
                    f"{model_version!r}; refusing to mix them in one results.csv - use another --out folder"
                )

    def register(self, specs: Iterable[FieldSpec]) -> int:
        rows = ((s.slide_id, s.source, s.kind, s.x, s.y, s.width, s.height, s.pixel_size_um) for s in specs)
        with self._transaction():
            before = self._db.total_changes
            self._db.executemany(
                "INSERT OR IGNORE INTO fields (slide_id, source, kind, tile_x, tile_y, tile_w, tile_h, pixel_size_um) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
            return self._db.total_changes - before

    def claim(self, worker: str, limit: int, lease_s: float = DEFAULT_LEASE_S) -> list[PendingField]:
        now = time.time()
        with self._transaction():
            found = self._db.execute(
                # the state as a literal, so the partial index of pending fields serves the scan
                f"UPDATE fields SET lease_owner = ?, lease_until = ? WHERE id IN (SELECT id FROM fields "
                f"WHERE status = '{PENDING}' AND (lease_until IS NULL OR lease_until < ?) ORDER BY id LIMIT ?) "
                f"RETURNING {_SPEC}", (worker, now + lease_s, now, limit)).fetchall()
        return sorted((PendingField(row[0], FieldSpec(*row[1:])) for row in found), key=lambda p: p.field_id)

    def renew(self, worker: str, lease_s: float = DEFAULT_LEASE_S) -> int:
        with self._heartbeat_lock:
            if self._heartbeat is None:
                self._heartbeat = self._connect(any_thread=True)
            with self._transaction(self._heartbeat):
                return self._heartbeat.execute(
                    f"UPDATE fields SET lease_until = ? WHERE lease_owner = ? AND status = '{PENDING}'",
                    (time.time() + lease_s, worker)).rowcount

    def release(self, worker: str | None = None) -> int:
        with self._transaction():
            if worker is None:
                query, args = "WHERE lease_owner IS NOT NULL", ()
            else:
                query, args = "WHERE lease_owner = ?", (worker,)
            return self._db.execute(f"UPDATE fields SET lease_owner = NULL, lease_until = NULL {query}",
                                    args).rowcount

    def reset_failed(self) -> int:
        with self._transaction():
            cursor = self._db.execute("UPDATE fields SET status = ?, error = NULL, lease_owner = NULL, "
                                      "lease_until = NULL WHERE status = ?", (PENDING, FAILED))
            return cursor.rowcount

    def record(self, outcomes: Sequence[FieldOutcome], *, worker: str | None = None,
               gallery: Mapping[int, Mapping[str, str]] | None = None, drop_gallery: Iterable[int] = ()) -> int:
        now = time.time()
        rows = []
        for o in outcomes:
            r = o.result
            rows.append((o.status, r and r.label, r and r.confidence, None if r is None else int(r.needs_review),
                         r and r.cell_count, r and r.model_version, o.error, 1 if o.status == FAILED else 0, now,
                         result_json(o), o.field_id, PENDING, worker, worker))
        with self._transaction():
            before = self._db.total_changes
            self._db.executemany(
                "UPDATE fields SET status = ?, label = ?, confidence = ?, needs_review = ?, cell_count = ?, "
                "model_version = ?, error = ?, attempts = attempts + ?, updated = ?, result = ?, "
                "lease_owner = NULL, lease_until = NULL WHERE id = ? AND status = ? AND (? IS NULL OR lease_owner = ?)",
                rows)
            changed = self._db.total_changes - before
            self._db.executemany("DELETE FROM gallery WHERE field_id = ?", [(i,) for i in drop_gallery])
            self._db.executemany("INSERT OR REPLACE INTO gallery VALUES (?, ?)",
                                 [(i, json.dumps(dict(images))) for i, images in (gallery or {}).items()])
            return changed

    def gallery_images(self, field_ids: Iterable[int]) -> dict[int, dict[str, str]]:
        wanted = list(field_ids)
        found: dict[int, dict[str, str]] = {}
        for start in range(0, len(wanted), 500):
            chunk = wanted[start : start + 500]
            query = f"SELECT field_id, images FROM gallery WHERE field_id IN ({','.join('?' * len(chunk))})"
            found.update((i, json.loads(images)) for i, images in self._db.execute(query, chunk))
        return found

    def counts(self) -> dict[str, int]:
        counts = dict.fromkeys(STATES, 0)
        counts.update(self._db.execute("SELECT status, COUNT(*) FROM fields GROUP BY status").fetchall())
        return counts

    def slide_counts(self) -> dict[str, dict[str, int]]:
        slides: dict[str, dict[str, int]] = {}
        query = "SELECT slide_id, status, COUNT(*) FROM fields GROUP BY slide_id, status ORDER BY slide_id"
        for slide, status, n in self._db.execute(query):
            slides.setdefault(slide, dict.fromkeys(STATES, 0))[status] = n
        return slides

    def iter_rows(self, status: str | None = None) -> Iterator[FieldRow]:
        where, args = ("WHERE status = ?", (status,)) if status else ("", ())
        # a cursor of its own: rows arrive as it is read, while the runner may write on the connection
        for values in self._db.cursor().execute(f"SELECT {_COLUMNS} FROM fields {where} {_ORDER}", args):
            yield _row(values)

    def close(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.close()
        self._db.close()


def _row(values: tuple) -> FieldRow:
    field_id, *spec = values[:9]
    status, stored, error, attempts, updated = values[9:14]
    legacy = None if stored else dict(zip(_LEGACY, values[14:], strict=True))
    return row_from_columns(field_id, FieldSpec(*spec), status, stored, error, attempts, updated, legacy)


class _Transaction:
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` (``ROLLBACK`` on any error) on an autocommit connection.

    A database error (a full disk, say) becomes a :class:`LedgerError`; nothing of that write is kept.
    """

    def __init__(self, db: sqlite3.Connection, path: Path) -> None:
        self._db = db
        self._path = path

    def __enter__(self) -> None:
        try:
            self._db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as error:
            raise LedgerError(f"the ledger {self._path} cannot be written: {error}") from error

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            try:
                self._db.execute("COMMIT")
                return
            except sqlite3.Error as error:
                exc = error
        if self._db.in_transaction:
            self._db.execute("ROLLBACK")
        if isinstance(exc, sqlite3.Error):
            raise LedgerError(f"the ledger {self._path} refused a write ({exc}); that write was rolled back and "
                              "the ledger is consistent - fix the cause and rerun the same command") from exc

