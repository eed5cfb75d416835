"""One batch run per output folder: ``DIR/.lock`` held with :mod:`filelock` for the whole run.

The lock is an OS file lock (``flock``), so the kernel releases it when its holder dies, SIGKILL included;
a rerun after a crash never finds a stale lock.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from batch.errors import OutputBusyError

LOCK_FILE = ".lock"
OWNER_FILE = ".lock.pid"


@contextmanager
def output_lock(out_dir: Path, *, wait_s: float = 2.0) -> Iterator[None]:
    """Hold the folder's lock; raise :class:`OutputBusyError` naming the holder's pid after ``wait_s``."""
    out_dir = Path(out_dir)
    lock = FileLock(out_dir / LOCK_FILE, timeout=wait_s)
    try:
        lock.acquire()
    except Timeout as error:
        owner = (out_dir / OWNER_FILE).read_text().strip() if (out_dir / OWNER_FILE).is_file() else "?"
        raise OutputBusyError(f"{out_dir} is in use by another batch run (pid {owner}); wait for it or use "
                              "another --out folder") from error
    try:
        (out_dir / OWNER_FILE).write_text(str(os.getpid()))
        yield
    finally:
        lock.release()


def run_in_progress(out_dir: Path) -> bool:
    """True while some process holds the output folder's lock (a run is writing to it)."""
    path = Path(out_dir) / LOCK_FILE
    if not path.exists():
        return False
    probe = FileLock(path, timeout=0, is_singleton=False)
    try:
        probe.acquire()
    except Timeout:
        return True
    probe.release()
    return False
