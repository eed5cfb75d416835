"""Runs batch jobs submitted over the API, one at a time (a batch run already uses every core).

Created in the app's lifespan and handed to the jobs router as a dependency, so its thread lives and
ends with the app rather than with the module.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

logger = logging.getLogger("hybridcn.jobs")


class JobExecutor:
    """One worker thread; ``active(job_id)`` is true from submission until the job's work returns."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="batch-job")
        self._active: set[str] = set()
        self._lock = threading.Lock()

    def submit(self, job_id: str, work: Callable[[], None]) -> Future:
        with self._lock:
            self._active.add(job_id)
        future = self._pool.submit(work)
        future.add_done_callback(lambda done: self._finished(job_id, done))
        return future

    def _finished(self, job_id: str, future: Future) -> None:
        with self._lock:
            self._active.discard(job_id)
        if not future.cancelled() and future.exception() is not None:
            logger.error("batch job %s failed: %s", job_id, future.exception())

    def active(self, job_id: str) -> bool:
        with self._lock:
            return job_id in self._active

    def shutdown(self) -> None:
        """Drop queued jobs (their ledgers stay 'queued': rerun with ``hybridcn batch``); the running one ends."""
        self._pool.shutdown(wait=False, cancel_futures=True)
