"""The ledger's contract: field states, what a worker claims and records, and the rows reports are made from.

Every field of a queue has one row and one state. A worker *claims* a block of pending fields (a lease
with an expiry, renewed by a heartbeat while it works), then *records* their outcomes; recording changes
only fields that are still pending and leased to that worker, so a field is done exactly once even when
a worker that was thought dead comes back late. A worker that dies loses its leases when they expire and
any other worker claims those fields again. Readers stream rows in queue order (:meth:`Ledger.iter_rows`),
so nothing needs the whole queue in memory.

:class:`~batch.ledger.sqlite.SQLiteLedger` (one file per output folder, one worker) and
:class:`~batch.ledger.postgres.PostgresLedger` (a server database shared by workers on many machines)
implement it.
"""

from __future__ import annotations

import json
import os
import socket
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone

from hybridcn.contracts import FieldQCResult, FieldResult

#: States of a field. ``skipped`` is a background tile that the field QC found empty.
PENDING, DONE, FAILED, SKIPPED = "pending", "done", "failed", "skipped"
STATES = (PENDING, DONE, FAILED, SKIPPED)
#: Field kinds: a whole field image, or a tile cut from a large slide image.
FIELD, TILE = "field", "tile"
#: Default lease: a worker that stops renewing loses its fields this long after its last heartbeat.
DEFAULT_LEASE_S = 60.0


class LedgerError(RuntimeError):
    """The ledger cannot be used for this run (another model's results, an unreadable database)."""


class ModelVersionMismatchError(LedgerError):
    """The queue holds results of another model version; mixing them is refused."""


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
    pixel_size_um: float | None = None  # um per pixel of the image, when the manifest or --pixel-size gave it


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

    def __post_init__(self) -> None:
        if self.status not in (DONE, FAILED, SKIPPED):
            raise ValueError(f"cannot record status {self.status!r}; expected done, failed or skipped")


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


def worker_name() -> str:
    """This worker's identity in leases: host, process and a random suffix (a pid is reused after a restart)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class Ledger(ABC):
    """Field states of one queue; every write is one atomic transaction."""

    #: Where the ledger lives, for messages (a path, or a database URL without its password).
    location: str = ""

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
        """Add fields as pending unless already known, in one transaction; returns how many were new.

        ``specs`` is consumed once, as it comes (a generator over a huge queue is fine); if it raises, nothing
        of it is kept.
        """

    @abstractmethod
    def claim(self, worker: str, limit: int, lease_s: float = DEFAULT_LEASE_S) -> list[PendingField]:
        """Lease up to ``limit`` pending fields nobody holds (or whose lease expired) to ``worker``, in id order."""

    @abstractmethod
    def renew(self, worker: str, lease_s: float = DEFAULT_LEASE_S) -> int:
        """Heartbeat: extend ``worker``'s leases on its pending fields; returns how many it holds.

        Safe to call from another thread than the one that claims and records.
        """

    @abstractmethod
    def release(self, worker: str | None = None) -> int:
        """Drop the leases of ``worker`` (``None``: of every worker) on pending fields; returns how many."""

    @abstractmethod
    def reset_failed(self) -> int:
        """Put failed fields back to pending (``--retry-failed``); returns how many."""

    @abstractmethod
    def record(self, outcomes: Sequence[FieldOutcome], *, worker: str | None = None,
               gallery: Mapping[int, Mapping[str, str]] | None = None, drop_gallery: Iterable[int] = ()) -> int:
        """Store outcomes of pending fields in one transaction; returns how many rows changed.

        Only pending fields change, and with ``worker`` only those leased to it: a field that is done is
        never written again, and one that another worker claimed after this one's lease expired is that
        worker's now. ``gallery`` adds report images (name -> data URL) of some of these fields,
        ``drop_gallery`` removes those of fields that left the report gallery, in the same transaction.
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
    def iter_rows(self, status: str | None = None) -> Iterator[FieldRow]:
        """Every field (or those in ``status``) in queue order (slide, source, tile row, tile column), streamed."""

    @abstractmethod
    def close(self) -> None:
        """Release the connection."""

    def rows(self) -> list[FieldRow]:
        """Every field, in queue order (small queues and tests; reports stream :meth:`iter_rows`)."""
        return list(self.iter_rows())

    def pending(self) -> list[PendingField]:
        """Fields still to process, in queue order."""
        return [PendingField(row.field_id, row.spec) for row in self.iter_rows(PENDING)]

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def result_json(outcome: FieldOutcome) -> str | None:
    """The stored form of an outcome's result (``None`` without one)."""
    return outcome.result.stored().model_dump_json(exclude_none=True) if outcome.result is not None else None


def row_from_columns(field_id: int, spec: FieldSpec, status: str, stored: str | None, error: str | None,
                     attempts: int, updated: float | None, legacy: Mapping | None = None) -> FieldRow:
    """A :class:`FieldRow` from stored columns; ``legacy`` rebuilds a result a schema-1 SQLite ledger kept as
    columns (no cells, no threshold)."""
    result = None
    if stored:
        result = FieldResult.model_validate_json(stored)
    elif legacy and legacy.get("label") is not None:
        result = FieldResult(
            label=legacy["label"], probabilities=json.loads(legacy["probabilities"] or "{}"),
            confidence=legacy["confidence"] or 0.0, needs_review=bool(legacy["needs_review"]),
            review_reasons=json.loads(legacy["review_reasons"] or "[]"), review_threshold=None,
            cell_count=legacy["cell_count"] or 0, qc=FieldQCResult(flags=json.loads(legacy["qc_flags"] or "[]")),
            model_version=legacy["model_version"] or "")
    return FieldRow(field_id=field_id, spec=spec, status=status, result=result, error=error, attempts=attempts,
                    updated=updated)
