"""The jobs queue in the jobs folder: shared by gateway processes, one job at a time, nothing lost."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from engine.triton_server import wait_until
from gateway.jobs_executor import MAX_ATTEMPTS, QUEUED_MARK, JobQueue


def _job(root: Path, name: str) -> Path:
    path = root / name
    path.mkdir(parents=True)
    return path


def test_two_queues_on_one_folder_run_each_job_once_and_never_two_at_a_time(tmp_path):
    ran: list[str] = []
    running = []
    overlaps = []
    guard = threading.Lock()

    def run(job_dir: Path) -> None:
        with guard:
            running.append(job_dir.name)
            if len(running) > 1:
                overlaps.append(tuple(running))
        time.sleep(0.05)
        with guard:
            running.remove(job_dir.name)
            ran.append(job_dir.name)

    # two "gateway processes": separate queues (and lock handles) on the same folder
    queues = [JobQueue(tmp_path, run, lambda d, r: None, poll_s=0.05).start() for _ in range(2)]
    try:
        for i in range(6):
            queues[i % 2].enqueue(_job(tmp_path, f"2026-{i:02d}"))
        wait_until(lambda: len(ran) == 6, timeout_s=30, interval_s=0.05)
    finally:
        for queue in queues:
            queue.shutdown()
    assert sorted(ran) == [f"2026-{i:02d}" for i in range(6)] and overlaps == []
    assert not list(tmp_path.glob(f"*/{QUEUED_MARK}"))


def test_a_job_whose_runs_keep_dying_is_given_up_and_a_failing_one_does_not_stop_the_queue(tmp_path):
    doomed, broken, fine = _job(tmp_path, "a-doomed"), _job(tmp_path, "b-broken"), _job(tmp_path, "c-fine")
    (doomed / QUEUED_MARK).write_text(str(MAX_ATTEMPTS))  # three runs started and never returned
    ran, given_up = [], []

    def run(job_dir: Path) -> None:
        ran.append(job_dir.name)
        if job_dir == broken:
            raise RuntimeError("no images")

    queue = JobQueue(tmp_path, run, lambda d, reason: given_up.append((d.name, reason)), poll_s=0.05)
    queue.enqueue(broken)
    queue.enqueue(fine)
    queue.start()
    try:
        wait_until(lambda: "c-fine" in ran, timeout_s=30, interval_s=0.05)
    finally:
        queue.shutdown()
    assert ran == ["b-broken", "c-fine"]
    assert given_up and given_up[0][0] == "a-doomed" and "gave up after 3 runs" in given_up[0][1]
    assert not JobQueue.queued(doomed) and not JobQueue.queued(broken) and not JobQueue.queued(fine)


def test_a_job_stays_queued_while_it_runs_so_a_dead_process_leaves_it_for_the_next(tmp_path):
    job = _job(tmp_path, "job")
    seen = []
    queue = JobQueue(tmp_path, lambda d: seen.append((JobQueue.queued(d), (d / QUEUED_MARK).read_text())),
                     lambda d, r: None, poll_s=0.05)
    queue.enqueue(job)
    queue.start()
    try:
        wait_until(lambda: seen, timeout_s=30, interval_s=0.05)
    finally:
        queue.shutdown()
    assert seen == [(True, "1")]  # the mark (with the attempt count) is there during the run
