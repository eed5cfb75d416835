"""The batch ledger: every field of a queue, its state and its result, in one place that survives a crash.

The runner writes each completed group of fields in one transaction, and every output file
(``results.csv``, ``slides.*``, the HTML reports) is regenerated from the ledger, so a run killed at
any moment (SIGKILL included) leaves either a committed result or a pending field, never half of one;
running the same command again finishes the pending fields and each field is reported exactly once.

:class:`Ledger` is the interface; :class:`SQLiteLedger` (one file under the output folder, WAL mode)
is the implementation used here. A server database (PostgreSQL with ``SELECT ... FOR UPDATE SKIP
LOCKED`` claims) can implement the same interface for batch workers on several machines.
"""

from __future__ import annotations

import json
import sqlite3
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from hybridcn.contracts import FieldQCResult, FieldResult

#: States of a field. ``skipped`` is a background tile that the field QC found empty.
PENDING, DONE, FAILED, SKIPPED = "pending", "done", "failed", "skipped"
STATES = (PENDING, DONE, FAILED, SKIPPED)
#: Field kinds: a whole field image, or a tile cut from a large slide image.
FIELD, TILE = "field", "tile"
LEDGER_FILE = "ledger.sqlite"
SCHEMA_VERSION = "2"  # 2: the whole FieldResult as JSON in fields.result


class LedgerError(RuntimeError):
    """The ledger cannot be used for this run (another model's results, an unreadable database)."""


class ModelVersionMismatchError(LedgerError):
    """The output folder holds results of another model version; mixing them is refused."""


@dataclass(frozen=True)
class FieldSpec:
    """Where a field comes from: a whole image (``kind='field'``) or a tile of a slide image."""

    slide_id: str
    source: str
    kind: str = FIELD
    x: int = 0
    y: int = 0
    width: int = 0
    height: int = 0


@dataclass(frozen=True)
class PendingField:
    field_id: int
    spec: FieldSpec


@dataclass(frozen=True)
class FieldOutcome:
    """What happened to one field; ``status`` is ``done`` (with its ``result``), ``failed`` or ``skipped``."""

    field_id: int
    status: str
    result: FieldResult | None = None
    error: str | None = None


@dataclass(frozen=True)
class FieldRow:
    """One field as the ledger holds it (what ``results.csv`` and the reports are made from).

    The result is the one contract (:class:`~hybridcn.contracts.FieldResult`); the properties below read
    through to it so report code can ask a row for its label whether or not it is done.
    """

    field_id: int
    spec: FieldSpec
    status: str
    result: FieldResult | None
    error: str | None
    attempts: int
    updated: float | None

    @property
    def label(self) -> str | None:
        return self.result.label if self.result else None

    @property
    def probabilities(self) -> dict[str, float]:
        return self.result.probabilities if self.result else {}

    @property
    def confidence(self) -> float | None:
        return self.result.confidence if self.result else None

    @property
    def needs_review(self) -> bool | None:
        return self.result.needs_review if self.result else None

    @property
    def review_reasons(self) -> list[str]:
        return self.result.review_reasons if self.result else []

    @property
    def cell_count(self) -> int | None:
        return self.result.cell_count if self.result else None

    @property
    def qc_flags(self) -> list[str]:
        return self.result.qc.flags if self.result else []

    @property
    def model_version(self) -> str | None:
        return self.result.model_version if self.result else None


class Ledger(ABC):
    """Field states of one batch output folder; every write is one atomic transaction."""

    @abstractmethod
    def get_meta(self) -> dict[str, str]:
        """Key/value facts of the job (model version, created, run state, inputs)."""

    @abstractmethod
    def set_meta(self, **values: str) -> None:
        """Set meta values in one transaction."""

    @abstractmethod
    def bind_model(self, model_version: str) -> None:
        """Record the model version, or raise :class:`ModelVersionMismatchError` if another one is recorded."""

    @abstractmethod
    def register(self, specs: Iterable[FieldSpec]) -> int:
        """Add fields as pending unless already known; returns how many were new."""

    @abstractmethod
    def pending(self) -> list[PendingField]:
        """Fields still to process, in queue order (slide, source, tile row, tile column)."""

    @abstractmethod
    def reset_failed(self) -> int:
        """Put failed fields back to pending (``--retry-failed``); returns how many."""

    @abstractmethod
    def record(self, outcomes: Sequence[FieldOutcome], *, gallery: Mapping[int, Mapping[str, str]] | None = None,
               drop_gallery: Iterable[int] = ()) -> int:
        """Store outcomes of pending fields in one transaction; returns how many rows changed.

        Only pending fields change: a field that is already done is never written again. ``gallery``
        adds report images (name -> data URL) of some of these fields, ``drop_gallery`` removes those
        of fields that left the report gallery, in the same transaction.
        """

    @abstractmethod
    def gallery_images(self, field_ids: Iterable[int]) -> dict[int, dict[str, str]]:
        """Stored report images of these fields (fields without any are left out)."""

    @abstractmethod
    def counts(self) -> dict[str, int]:
        """Fields per state, every state present."""

    @abstractmethod
    def slide_counts(self) -> dict[str, dict[str, int]]:
        """Fields per state for each slide."""

    @abstractmethod
    def rows(self) -> list[FieldRow]:
        """Every field, in queue order."""

    @abstractmethod
    def close(self) -> None:
        """Release the connection."""

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


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
    UNIQUE (slide_id, source, tile_x, tile_y)
);
CREATE INDEX IF NOT EXISTS fields_status ON fields (status);
CREATE TABLE IF NOT EXISTS gallery (field_id INTEGER PRIMARY KEY REFERENCES fields (id), images TEXT NOT NULL);
"""

_ORDER = "ORDER BY slide_id, source, tile_y, tile_x"
_COLUMNS = ("id, slide_id, source, kind, tile_x, tile_y, tile_w, tile_h, status, label, probabilities, confidence, "
            "needs_review, review_reasons, cell_count, qc_flags, model_version, error, attempts, updated, result")


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class SQLiteLedger(Ledger):
    """The ledger as ``DIR/ledger.sqlite`` in WAL mode: one writer (the runner), any number of readers.

    ``readonly=True`` opens an existing ledger for the jobs API without ever writing to it.
    """

    def __init__(self, path: str | Path, *, readonly: bool = False, timeout_s: float = 30.0) -> None:
        self.path = Path(path)
        self.readonly = readonly
        try:
            if readonly:
                if not self.path.is_file():
                    raise LedgerError(f"no ledger at {self.path}")
                self._db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=timeout_s)
            else:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._db = sqlite3.connect(self.path, timeout=timeout_s, isolation_level=None)
                self._db.execute("PRAGMA journal_mode=WAL")
                # NORMAL in WAL mode: a committed transaction survives any crash of this process;
                # only a power cut can roll back the last few (which are then simply done again).
                self._db.execute("PRAGMA synchronous=NORMAL")
                with self._transaction():
                    for statement in filter(str.strip, _SCHEMA.split(";")):
                        self._db.execute(statement)
                    self._migrate()
                    self._db.execute("INSERT OR IGNORE INTO meta VALUES ('created', ?)", (_now_iso(),))
        except sqlite3.DatabaseError as error:
            raise LedgerError(f"cannot open the ledger {self.path}: {error}") from error

    def _transaction(self):
        return _Transaction(self._db, self.path)

    def _migrate(self) -> None:
        """Bring a ledger written by an older version to :data:`SCHEMA_VERSION` (inside the open transaction)."""
        row = self._db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
        version = row[0] if row else SCHEMA_VERSION
        if version == "1":  # results were columns only; rows keep them and get a result rebuilt when read
            columns = {info[1] for info in self._db.execute("PRAGMA table_info(fields)")}
            if "result" not in columns:
                self._db.execute("ALTER TABLE fields ADD COLUMN result TEXT")
        elif version != SCHEMA_VERSION:
            raise LedgerError(f"{self.path} has ledger schema {version}, newer than this version's {SCHEMA_VERSION}; "
                              "upgrade hybridcn-nas to read it")
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
        rows = [(s.slide_id, s.source, s.kind, s.x, s.y, s.width, s.height) for s in specs]
        with self._transaction():
            before = self._db.total_changes
            self._db.executemany(
                "INSERT OR IGNORE INTO fields (slide_id, source, kind, tile_x, tile_y, tile_w, tile_h) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
            return self._db.total_changes - before

    def pending(self) -> list[PendingField]:
        query = ("SELECT id, slide_id, source, kind, tile_x, tile_y, tile_w, tile_h FROM fields "
                 f"WHERE status = ? {_ORDER}")
        return [PendingField(row[0], FieldSpec(*row[1:])) for row in self._db.execute(query, (PENDING,))]

    def reset_failed(self) -> int:
        with self._transaction():
            cursor = self._db.execute("UPDATE fields SET status = ?, error = NULL WHERE status = ?", (PENDING, FAILED))
            return cursor.rowcount

    def record(self, outcomes: Sequence[FieldOutcome], *, gallery: Mapping[int, Mapping[str, str]] | None = None,
               drop_gallery: Iterable[int] = ()) -> int:
        now = time.time()
        rows = []
        for o in outcomes:
            if o.status not in (DONE, FAILED, SKIPPED):
                raise ValueError(f"cannot record status {o.status!r}; expected done, failed or skipped")
            r = o.result.stored() if o.result is not None else None
            rows.append((
                o.status, r and r.label, r and json.dumps(r.probabilities), r and r.confidence,
                None if r is None else int(r.needs_review), json.dumps(r.review_reasons if r else []),
                r and r.cell_count, json.dumps(r.qc.flags if r else []), r and r.model_version, o.error,
                1 if o.status == FAILED else 0, now, r and r.model_dump_json(exclude_none=True), o.field_id, PENDING,
            ))
        with self._transaction():
            before = self._db.total_changes
            self._db.executemany(
                "UPDATE fields SET status = ?, label = ?, probabilities = ?, confidence = ?, needs_review = ?, "
                "review_reasons = ?, cell_count = ?, qc_flags = ?, model_version = ?, error = ?, "
                "attempts = attempts + ?, updated = ?, result = ? WHERE id = ? AND status = ?", rows)
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

    def rows(self) -> list[FieldRow]:
        return [_row(values) for values in self._db.execute(f"SELECT {_COLUMNS} FROM fields {_ORDER}")]

    def close(self) -> None:
        self._db.close()


def _row(values: tuple) -> FieldRow:
    (field_id, slide_id, source, kind, x, y, w, h, status, label, probabilities, confidence, needs_review,
     reasons, cells, flags, version, error, attempts, updated, stored) = values
    result = None
    if stored:
        result = FieldResult.model_validate_json(stored)
    elif label is not None:  # a schema-1 row: the result as its columns kept it (no cells, no threshold)
        result = FieldResult(
            label=label, probabilities=json.loads(probabilities) if probabilities else {},
            confidence=confidence or 0.0, needs_review=bool(needs_review),
            review_reasons=json.loads(reasons) if reasons else [], review_threshold=None, cell_count=cells or 0,
            qc=FieldQCResult(flags=json.loads(flags) if flags else []), model_version=version or "")
    return FieldRow(field_id=field_id, spec=FieldSpec(slide_id, source, kind, x, y, w, h), status=status,
                    result=result, error=error, attempts=attempts, updated=updated)


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
