"""The batch jobs queue of the web page and ``/v1/jobs``: a marker file in each waiting job's folder.

The queue lives in the jobs folder, not in a process: every gateway process that shares the folder
(``uvicorn --workers N``, replicas on a shared volume) sees the same jobs, and one job runs at a time
across all of them (a batch run already uses every core), decided by a file lock on the folder. A job
keeps its marker until its run returns, so a gateway killed mid-run loses nothing: another process (or
the restarted one) takes the job up again and the run resumes from its ledger. A job whose runs keep
dying with their process is given up after :data:`MAX_ATTEMPTS`.

Created in the app's lifespan and handed to the jobs router as a dependency, so its thread lives and
ends with the app rather than with the module.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock, Timeout

logger = logging.getLogger("hybridcn.jobs")

QUEUED_MARK = ".queued"
RUNNER_LOCK = ".runner.lock"
MAX_ATTEMPTS = 3


class JobQueue:
    """Runs queued jobs of ``jobs_dir`` with ``run(job_dir)``; ``give_up(job_dir, reason)`` records a job dropped
    after :data:`MAX_ATTEMPTS` runs that never returned."""

    def __init__(self, jobs_dir: Path, run: Callable[[Path], None], give_up: Callable[[Path, str], None], *,
                 poll_s: float = 2.0) -> None:
        self.jobs_dir = Path(jobs_dir)
        self._run, self._give_up, self._poll_s = run, give_up, poll_s
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="batch-jobs", daemon=True)

    def start(self) -> JobQueue:
        self._thread.start()
        return self

    def enqueue(self, job_dir: Path) -> None:
        """Queue a job whose folder and ledger exist; whichever gateway process is free runs it."""
        (Path(job_dir) / QUEUED_MARK).write_text("0")
        self._wake.set()

    @staticmethod
    def queued(job_dir: Path) -> bool:
        return (Path(job_dir) / QUEUED_MARK).is_file()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._drain()
            except Exception:  # a broken folder must not end the queue: log, try again at the next poll
                logger.exception("the batch jobs queue in %s", self.jobs_dir)
            self._wake.wait(self._poll_s)
            self._wake.clear()

    def _waiting(self) -> list[Path]:
        if not self.jobs_dir.is_dir():
            return []
        return sorted(path.parent for path in self.jobs_dir.glob(f"*/{QUEUED_MARK}"))  # ids start with the time

    def _drain(self) -> None:
        lock = FileLock(self.jobs_dir / RUNNER_LOCK, timeout=0, is_singleton=False)
        try:
            self.jobs_dir.mkdir(parents=True, exist_ok=True)
            lock.acquire()
        except Timeout:
            return  # another gateway process is running the queue
        try:
            while not self._stop.is_set() and (waiting := self._waiting()):
                self._take(waiting[0])
        finally:
            lock.release()

    def _take(self, job_dir: Path) -> None:
        mark = job_dir / QUEUED_MARK
        try:
            attempts = int(mark.read_text().strip() or 0)
        except (OSError, ValueError):
            attempts = 0
        if attempts >= MAX_ATTEMPTS:
            mark.unlink(missing_ok=True)
            self._give_up(job_dir, f"gave up after {attempts} runs that ended with their gateway process "
                                   "(out of memory?); run `hybridcn batch` on its inputs to see why")
            return
        mark.write_text(str(attempts + 1))
        try:
            self._run(job_dir)
        except Exception as error:  # recorded in the job's ledger by ``run``; the queue goes on
            logger.error("batch job %s failed: %s", job_dir.name, error)
        finally:
            mark.unlink(missing_ok=True)

    def shutdown(self) -> None:
        """Stop taking jobs; the running one ends with the process, and stays queued for the next."""
        self._stop.set()
        self._wake.set()
