"""``python -m engine.reaper PARENT PGID PREFIX``: end a server's process group when its parent dies.

The embedded ``tritonserver`` runs in its own process group (so a terminal's Ctrl-C reaches only the
parent, which stops it cleanly). If the parent is killed outright (SIGKILL, out of memory), nothing
would stop the server and its Python stubs, nor free their shared memory. This small watcher, started
beside the server, polls the parent; when it is gone it kills the group and removes the group's
``/dev/shm`` segments, then exits. A normal stop terminates the watcher first.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

SHM = Path("/dev/shm")


def remove_segments(prefix: str) -> int:
    """Remove the shared-memory segments whose names start with ``prefix``; returns how many."""
    removed = 0
    for path in SHM.glob(f"{prefix}*") if prefix else ():
        try:
            path.unlink()
            removed += 1
        except OSError:
            pass
    return removed


def segments_in_use() -> set[str]:
    """Names of the ``/dev/shm`` files that some live process has mapped."""
    used = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            text = maps.read_text()
        except OSError:
            continue
        used.update(line.rsplit("/", 1)[-1].split(" (deleted)")[0] for line in text.splitlines() if "/dev/shm/" in line)
    return used


def remove_stale_segments(prefix: str = "hybridcn_", *, min_age_s: float = 60.0) -> int:
    """Remove our segments that no process maps and that are older than ``min_age_s`` (left by a crash)."""
    used, now, removed = segments_in_use(), time.time(), 0
    for path in SHM.glob(f"{prefix}*"):
        try:
            if path.name not in used and now - path.stat().st_mtime > min_age_s:
                path.unlink()
                removed += 1
        except OSError:
            pass
    return removed


def kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def watch(parent: int, pgid: int, prefix: str, *, interval_s: float = 0.5) -> None:
    while True:
        if os.getppid() != parent:  # re-parented: the parent is gone
            kill_group(pgid)
            time.sleep(0.5)  # let the stubs exit before their segments go
            remove_segments(prefix)
            return
        time.sleep(interval_s)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C is for the parent
    watch(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
