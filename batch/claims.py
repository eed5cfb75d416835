"""Where a worker's fields come from: leases claimed from the ledger a block at a time, kept alive by a heartbeat.

A worker holds only the block it is working on, never the queue: memory does not grow with the queue,
and workers on other machines claim the rest. While any field of the queue is pending, a worker keeps
going (waiting while others hold the last leases, taking over the ones that expire); the queue is
finished for it when nothing is pending at all.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Iterable, Sequence

from batch.ledger import DEFAULT_LEASE_S, PENDING, Ledger, LedgerError, PendingField

logger = logging.getLogger("hybridcn.batch")


class FieldSource:
    """What the pipeline asks for work: a chunk, ``[]`` (nothing now, ask again soon) or ``None`` (finished)."""

    def next_chunk(self, size: int) -> list[PendingField] | None:
        raise NotImplementedError

    def finished(self, field_ids: Iterable[int]) -> None:
        """These fields were recorded (or given up on); they are no longer this worker's concern."""

    def close(self) -> None:
        """Stop renewing and hand back whatever is still held."""


class FixedFields(FieldSource):
    """A given list of fields (tests and tools): chunks of it, then finished."""

    def __init__(self, fields: Sequence[PendingField]) -> None:
        self._fields = deque(fields)

    def next_chunk(self, size: int) -> list[PendingField] | None:
        if not self._fields:
            return None
        return [self._fields.popleft() for _ in range(min(size, len(self._fields)))]


class LeasedFields(FieldSource):
    """Claims ``block`` fields at a time from ``ledger`` for ``worker``; renews the leases every ``lease_s / 3``.

    A failed renewal is logged and tried again at the next beat; if the leases run out meanwhile, other
    workers take the fields, and this one's late results are refused by the ledger, never doubled.
    """

    def __init__(self, ledger: Ledger, worker: str, *, block: int = 64, lease_s: float = DEFAULT_LEASE_S) -> None:
        if lease_s <= 0:
            raise ValueError(f"lease_s must be positive, got {lease_s}")
        self.ledger, self.worker, self.block, self.lease_s = ledger, worker, block, lease_s
        self._buffer: deque[PendingField] = deque()
        self._held: set[int] = set()
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._heartbeat, name="ledger-heartbeat", daemon=True)
        self._beat.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.lease_s / 3):
            try:
                self.ledger.renew(self.worker, self.lease_s)
            except LedgerError as error:  # the database is away: try again at the next beat
                logger.warning("lease renewal for %s failed (%s); trying again in %.0f s", self.worker, error,
                               self.lease_s / 3)

    def next_chunk(self, size: int) -> list[PendingField] | None:
        if not self._buffer:
            claimed = self.ledger.claim(self.worker, max(self.block, size), self.lease_s)
            self._buffer.extend(claimed)
            self._held.update(p.field_id for p in claimed)
        if self._buffer:
            return [self._buffer.popleft() for _ in range(min(size, len(self._buffer)))]
        if self._held or self.ledger.counts()[PENDING]:
            return []  # this worker's own fields are in flight, or others hold leases that may still expire
        return None

    def finished(self, field_ids: Iterable[int]) -> None:
        self._held.difference_update(field_ids)

    def close(self) -> None:
        self._stop.set()
        self._beat.join(timeout=5)
        if self._held:
            try:
                self.ledger.release(self.worker)
            except LedgerError:
                pass  # they expire on their own
            self._held.clear()
