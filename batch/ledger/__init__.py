"""The batch ledger: every field of a queue, its state and its result, in one place that survives a crash.

``open_ledger(target)`` picks the implementation: a ``postgresql://`` URL is a
:class:`~batch.ledger.postgres.PostgresLedger` shared by any number of workers on any number of machines;
anything else is the path of a :class:`~batch.ledger.sqlite.SQLiteLedger` file (the default, one worker).
"""

from __future__ import annotations

from pathlib import Path

from batch.ledger.base import (
    DEFAULT_LEASE_S,
    DONE,
    FAILED,
    FIELD,
    PENDING,
    SKIPPED,
    STATES,
    TILE,
    FieldOutcome,
    FieldRow,
    FieldSpec,
    Ledger,
    LedgerError,
    ModelVersionMismatchError,
    PendingField,
    worker_name,
)
from batch.ledger.postgres import PostgresLedger, is_database_url, redact_url
from batch.ledger.sqlite import LEDGER_FILE, SCHEMA_VERSION, SQLiteLedger

__all__ = ["DEFAULT_LEASE_S", "DONE", "FAILED", "FIELD", "LEDGER_FILE", "PENDING", "SCHEMA_VERSION", "SKIPPED",
           "STATES", "TILE", "FieldOutcome", "FieldRow", "FieldSpec", "Ledger", "LedgerError",
           "ModelVersionMismatchError", "PendingField", "PostgresLedger", "SQLiteLedger", "is_database_url",
           "open_ledger", "redact_url", "worker_name"]


def open_ledger(target: str | Path, *, readonly: bool = False) -> Ledger:
    """The ledger at ``target``: a ``postgresql://`` URL (shared queue) or a SQLite file path."""
    if is_database_url(str(target)):
        return PostgresLedger(str(target), readonly=readonly)
    return SQLiteLedger(target, readonly=readonly)
