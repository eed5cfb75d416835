"""The ledger on PostgreSQL: one queue shared by any number of batch workers on any number of machines.

Workers claim blocks of pending fields with ``SELECT ... FOR UPDATE SKIP LOCKED`` (two workers never get
the same field, and neither waits for the other), as leases that expire at a time the *database* clock
sets (the machines' clocks need not agree). A heartbeat renews a worker's leases while it works; a
worker that is killed stops renewing, and once its leases expire the others claim those fields. A
recorded outcome is kept only for a field that is still pending and leased to the worker recording it,
so every field is done exactly once.

The schema is versioned: :data:`MIGRATIONS` are applied in order, each once, under an advisory lock
(workers starting together do not race), and recorded in ``schema_migrations``. One database (or one
schema, chosen with ``?options=-csearch_path%3Dmyqueue`` in the URL) holds one queue. The password is
best kept out of the URL: libpq's ``PGPASSWORD`` or ``~/.pgpass`` are read as usual.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from functools import wraps
from typing import TypeVar
from urllib.parse import urlsplit, urlunsplit

import psycopg

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

URL_SCHEMES = ("postgresql://", "postgres://")
#: Any fixed 64-bit number: the advisory lock taken while the schema is created or migrated.
_MIGRATION_LOCK = 0x4859_4252_4944_434E  # "HYBRIDCN"

#: (version, SQL), applied in order, each exactly once. Never edit one that has shipped: add the next.
MIGRATIONS: tuple[tuple[int, str], ...] = (
    (1, f"""
        CREATE TABLE meta (key text PRIMARY KEY, value text NOT NULL);
        CREATE TABLE fields (
            id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            slide_id text NOT NULL,
            source text NOT NULL,
            kind text NOT NULL CHECK (kind IN ('{FIELD}', '{TILE}')),
            tile_x integer NOT NULL DEFAULT 0,
            tile_y integer NOT NULL DEFAULT 0,
            tile_w integer NOT NULL DEFAULT 0,
            tile_h integer NOT NULL DEFAULT 0,
            status text NOT NULL DEFAULT '{PENDING}' CHECK (status IN ({", ".join(f"'{s}'" for s in STATES)})),
            label text,
            result text,
            error text,
            attempts integer NOT NULL DEFAULT 0,
            updated double precision,
            lease_owner text,
            lease_until timestamptz,
            claims integer NOT NULL DEFAULT 0,
            done_by text,
            UNIQUE (slide_id, source, tile_x, tile_y)
        );
        CREATE INDEX fields_claimable ON fields (id) WHERE status = '{PENDING}';
        CREATE INDEX fields_order ON fields (slide_id, source, tile_y, tile_x);
        CREATE INDEX fields_lease_owner ON fields (lease_owner) WHERE status = '{PENDING}';
        CREATE TABLE gallery (field_id bigint PRIMARY KEY REFERENCES fields (id), images text NOT NULL);
        CREATE TABLE workers (
            id text PRIMARY KEY,
            started timestamptz NOT NULL DEFAULT now(),
            heartbeat timestamptz NOT NULL DEFAULT now(),
            processed bigint NOT NULL DEFAULT 0
        );
    """),
    (2, "ALTER TABLE fields ADD COLUMN pixel_size_um double precision;"),
)
SCHEMA_VERSION = MIGRATIONS[-1][0]

_SPEC = "id, slide_id, source, kind, tile_x, tile_y, tile_w, tile_h, pixel_size_um"
_ORDER = "ORDER BY slide_id, source, tile_y, tile_x"

T = TypeVar("T")


def is_database_url(target: str) -> bool:
    return target.startswith(URL_SCHEMES)


def redact_url(url: str) -> str:
    """The URL without its password, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def _database_errors(method: Callable[..., T]) -> Callable[..., T]:
    """A database error becomes a :class:`LedgerError` naming the database (its transaction was rolled back)."""

    @wraps(method)
    def wrapper(self: PostgresLedger, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except psycopg.Error as error:
            raise LedgerError(f"the ledger database {self.location} refused {method.__name__} ({error}); that "
                              "transaction was rolled back and the queue is consistent - fix the cause and rerun "
                              "the same command") from error

    return wrapper


class PostgresLedger(Ledger):
    """The ledger in a PostgreSQL database, shared by every worker given the same URL."""

    def __init__(self, url: str, *, readonly: bool = False, connect_timeout_s: int = 10) -> None:
        self.url = url
        self.location = redact_url(url)
        self.readonly = readonly
        self._connect_timeout_s = connect_timeout_s
        self._heartbeat: psycopg.Connection | None = None
        self._heartbeat_lock = threading.Lock()
        self._cursors = itertools.count()  # server-side cursors need names unique per connection
        self._db = self._connect()
        try:
            if readonly:
                self._db.execute("SET default_transaction_read_only = on")
                if self._applied() < SCHEMA_VERSION:
                    raise LedgerError(f"{self.location} holds no batch queue (schema missing or older)")
            else:
                self._migrate()
                with self._db.transaction():
                    self._db.execute("INSERT INTO meta VALUES ('created', %s) ON CONFLICT DO NOTHING", (now_iso(),))
        except psycopg.Error as error:
            self._db.close()
            raise LedgerError(f"cannot set up the ledger database {self.location}: {error}") from error
        except LedgerError:
            self._db.close()
            raise

    def _connect(self) -> psycopg.Connection:
        try:
            return psycopg.connect(self.url, autocommit=True, connect_timeout=self._connect_timeout_s,
                                   application_name="hybridcn-batch")
        except psycopg.Error as error:
            raise LedgerError(f"cannot connect to the ledger database {self.location}: {error}") from error

    def _applied(self) -> int:
        exists = self._db.execute("SELECT to_regclass('schema_migrations') IS NOT NULL").fetchone()[0]
        if not exists:
            return 0
        return self._db.execute("SELECT coalesce(max(version), 0) FROM schema_migrations").fetchone()[0]

    def _migrate(self) -> None:
        with self._db.transaction():
            self._db.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
            self._db.execute("CREATE TABLE IF NOT EXISTS schema_migrations "
                             "(version integer PRIMARY KEY, applied timestamptz NOT NULL DEFAULT now())")
            applied = self._applied()
            if applied > SCHEMA_VERSION:
                raise LedgerError(f"{self.location} has ledger schema {applied}, newer than this version's "
                                  f"{SCHEMA_VERSION}; upgrade hybridcn-nas on this worker")
            for version, sql in MIGRATIONS:
                if version > applied:
                    self._db.execute(sql)
                    self._db.execute("INSERT INTO schema_migrations (version) VALUES (%s)", (version,))

    @property
    def schema_version(self) -> int:
        return self._applied()

    @_database_errors
    def get_meta(self) -> dict[str, str]:
        return dict(self._db.execute("SELECT key, value FROM meta").fetchall())

    @_database_errors
    def set_meta(self, **values: str) -> None:
        with self._db.transaction(), self._db.cursor() as cursor:
            cursor.executemany("INSERT INTO meta VALUES (%s, %s) ON CONFLICT (key) DO UPDATE SET value = "
                               "excluded.value", [(key, str(value)) for key, value in values.items()])

    @_database_errors
    def bind_model(self, model_version: str) -> None:
        with self._db.transaction():
            self._db.execute("INSERT INTO meta VALUES ('model_version', %s) ON CONFLICT DO NOTHING", (model_version,))
            bound = self._db.execute("SELECT value FROM meta WHERE key = 'model_version'").fetchone()[0]
        if bound != model_version:
            raise ModelVersionMismatchError(
                f"the queue in {self.location} holds results of model version {bound!r}, but the served model is "
                f"{model_version!r}; refusing to mix them - use another database (or schema) for this model")

    @_database_errors
    def register(self, specs: Iterable[FieldSpec]) -> int:
        with self._db.transaction(), self._db.cursor() as cursor:
            cursor.execute("CREATE TEMP TABLE incoming (n bigint GENERATED ALWAYS AS IDENTITY, slide_id text, "
                           "source text, kind text, tile_x integer, tile_y integer, tile_w integer, tile_h integer, "
                           "pixel_size_um double precision) ON COMMIT DROP")
            columns = "slide_id, source, kind, tile_x, tile_y, tile_w, tile_h, pixel_size_um"
            with cursor.copy(f"COPY incoming ({columns}) FROM STDIN") as copy:
                for s in specs:
                    copy.write_row((s.slide_id, s.source, s.kind, s.x, s.y, s.width, s.height, s.pixel_size_um))
            cursor.execute(f"INSERT INTO fields ({columns}) SELECT {columns} FROM incoming ORDER BY n "
                           "ON CONFLICT DO NOTHING")
            return cursor.rowcount

    @_database_errors
    def claim(self, worker: str, limit: int, lease_s: float = DEFAULT_LEASE_S) -> list[PendingField]:
        with self._db.transaction():
            found = self._db.execute(
                "UPDATE fields AS f SET lease_owner = %(worker)s, "
                "lease_until = now() + %(lease)s * interval '1 second', claims = f.claims + 1 "
                f"FROM (SELECT id FROM fields WHERE status = '{PENDING}' AND "  # a literal: the partial index
                "(lease_until IS NULL OR lease_until < now()) ORDER BY id LIMIT %(limit)s FOR UPDATE SKIP LOCKED) "
                f"AS picked WHERE f.id = picked.id RETURNING {', '.join('f.' + c for c in _SPEC.split(', '))}",
                {"worker": worker, "lease": lease_s, "limit": limit}).fetchall()
            self._db.execute("INSERT INTO workers (id) VALUES (%s) ON CONFLICT (id) DO UPDATE SET heartbeat = now()",
                             (worker,))
        return sorted((PendingField(row[0], FieldSpec(*row[1:])) for row in found), key=lambda p: p.field_id)

    def renew(self, worker: str, lease_s: float = DEFAULT_LEASE_S) -> int:
        with self._heartbeat_lock:
            try:
                if self._heartbeat is None or self._heartbeat.closed:
                    self._heartbeat = self._connect()
                with self._heartbeat.transaction():
                    held = self._heartbeat.execute(
                        "UPDATE fields SET lease_until = now() + %s * interval '1 second' WHERE lease_owner = %s "
                        f"AND status = '{PENDING}'", (lease_s, worker)).rowcount
                    self._heartbeat.execute("INSERT INTO workers (id) VALUES (%s) ON CONFLICT (id) DO UPDATE SET "
                                            "heartbeat = now()", (worker,))
                return held
            except psycopg.Error as error:
                if self._heartbeat is not None:
                    self._heartbeat.close()  # reconnect at the next beat
                raise LedgerError(f"heartbeat to {self.location} failed: {error}") from error

    @_database_errors
    def release(self, worker: str | None = None) -> int:
        with self._db.transaction():
            if worker is None:
                query, args = "WHERE lease_owner IS NOT NULL AND status = %s", (PENDING,)
            else:
                query, args = "WHERE lease_owner = %s AND status = %s", (worker, PENDING)
            return self._db.execute(f"UPDATE fields SET lease_owner = NULL, lease_until = NULL {query}",
                                    args).rowcount

    @_database_errors
    def reset_failed(self) -> int:
        with self._db.transaction():
            return self._db.execute("UPDATE fields SET status = %s, error = NULL, lease_owner = NULL, "
                                    "lease_until = NULL WHERE status = %s", (PENDING, FAILED)).rowcount

    @_database_errors
    def record(self, outcomes: Sequence[FieldOutcome], *, worker: str | None = None,
               gallery: Mapping[int, Mapping[str, str]] | None = None, drop_gallery: Iterable[int] = ()) -> int:
        now = time.time()
        rows = [(o.status, o.result.label if o.result else None, result_json(o), o.error,
                 1 if o.status == FAILED else 0, now, worker, o.field_id, PENDING, worker, worker) for o in outcomes]
        with self._db.transaction(), self._db.cursor() as cursor:
            # executemany pipelines the statements (one round trip), and sums their row counts
            cursor.executemany(
                "UPDATE fields SET status = %s, label = %s, result = %s, error = %s, attempts = attempts + %s, "
                "updated = %s, done_by = %s, lease_owner = NULL, lease_until = NULL WHERE id = %s AND "
                "status = %s AND (%s::text IS NULL OR lease_owner = %s)", rows)
            changed = max(cursor.rowcount, 0)
            if drop_gallery:
                cursor.execute("DELETE FROM gallery WHERE field_id = ANY(%s)", (list(drop_gallery),))
            if gallery:
                cursor.executemany("INSERT INTO gallery VALUES (%s, %s) ON CONFLICT (field_id) DO UPDATE SET "
                                   "images = excluded.images", [(i, json.dumps(dict(v))) for i, v in gallery.items()])
            if worker is not None and changed:
                cursor.execute("UPDATE workers SET processed = processed + %s, heartbeat = now() WHERE id = %s",
                               (changed, worker))
            return changed

    @_database_errors
    def gallery_images(self, field_ids: Iterable[int]) -> dict[int, dict[str, str]]:
        wanted = list(field_ids)
        if not wanted:
            return {}
        rows = self._db.execute("SELECT field_id, images FROM gallery WHERE field_id = ANY(%s)", (wanted,))
        return {i: json.loads(images) for i, images in rows}

    @_database_errors
    def counts(self) -> dict[str, int]:
        counts = dict.fromkeys(STATES, 0)
        counts.update(self._db.execute("SELECT status, count(*) FROM fields GROUP BY status").fetchall())
        return counts

    @_database_errors
    def slide_counts(self) -> dict[str, dict[str, int]]:
        slides: dict[str, dict[str, int]] = {}
        query = "SELECT slide_id, status, count(*) FROM fields GROUP BY slide_id, status ORDER BY slide_id"
        for slide, status, n in self._db.execute(query):
            slides.setdefault(slide, dict.fromkeys(STATES, 0))[status] = n
        return slides

    @_database_errors
    def workers(self) -> list[dict]:
        """Every worker that claimed from this queue: id, started, last heartbeat, fields it recorded."""
        rows = self._db.execute("SELECT id, started, heartbeat, processed FROM workers ORDER BY started")
        return [{"id": i, "started": s.isoformat(), "heartbeat": h.isoformat(), "processed": p} for i, s, h, p in rows]

    def iter_rows(self, status: str | None = None) -> Iterator[FieldRow]:
        where, args = ("WHERE status = %s", (status,)) if status else ("", ())
        try:
            with self._db.transaction(), self._db.cursor(name=f"hybridcn_rows_{next(self._cursors)}") as cursor:
                cursor.itersize = 2000  # a server-side cursor: rows arrive a page at a time
                cursor.execute(f"SELECT {_SPEC}, status, result, error, attempts, updated FROM fields {where} "
                               f"{_ORDER}", args)
                for values in cursor:
                    yield row_from_columns(values[0], FieldSpec(*values[1:9]), *values[9:])
        except psycopg.Error as error:
            raise LedgerError(f"cannot read the ledger database {self.location}: {error}") from error

    def close(self) -> None:
        with self._heartbeat_lock:
            if self._heartbeat is not None:
                self._heartbeat.close()
        self._db.close()
