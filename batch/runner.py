"""Run a queue of slides through Triton: discover, record in the ledger, prepare, infer, report.

The stages themselves are in :mod:`batch.pipeline`; this module holds the run: the output folder's lock,
the ledger, the Triton endpoints (given, or one embedded server started for the run) and the reports.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from tenacity import RetryError

from batch.claims import LeasedFields
from batch.errors import BatchError, OutputBusyError, TritonNotReadyError
from batch.gallery import make_gallery_renderer
from batch.inputs import DiscoveryOptions, check_inputs, iter_discover
from batch.ledger import DONE, LEDGER_FILE, PENDING, Ledger, open_ledger, worker_name
from batch.lock import output_lock, run_in_progress
from batch.options import BatchOptions, default_workers
from batch.pipeline import _Pipeline
from batch.progress import Progress, make_progress
from batch.reports import ReportFiles, write_reports
from batch.summary import GalleryKeeper
from engine.client import TritonClient
from engine.model import ServedModel
from engine.triton_server import triton_endpoint, wait_until

__all__ = ["BatchError", "BatchOptions", "BatchSummary", "OutputBusyError", "TritonNotReadyError", "run_batch",
           "run_in_progress"]


@dataclass
class BatchSummary:
    out_dir: Path
    model_version: str
    counts: dict[str, int]
    new_fields: int
    processed: int
    elapsed_s: float
    reports: ReportFiles | None = None
    queue_s: float = 0.0

    @property
    def fields_per_s(self) -> float:
        return self.processed / self.queue_s if self.queue_s > 0 else 0.0


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@contextmanager
def triton_urls(options: BatchOptions, progress: Progress) -> Iterator[list[str]]:
    """The ``--triton`` endpoints, or one embedded server started for the run."""
    if options.triton_urls:
        yield list(options.triton_urls)
        return
    progress.message("batch: starting the embedded Triton server ...")
    with triton_endpoint(options.repository, None, ort_threads=options.ort_threads) as url:
        yield [url]


def wait_ready(clients: Sequence[TritonClient], timeout_s: float, progress: Progress) -> list[TritonClient]:
    """The endpoints that are ready within ``timeout_s``; once one is, the others get 5 s more, then are left out."""
    ready: set[str] = set()

    def count_ready() -> int:
        ready.update(c.url for c in clients if c.url not in ready and c.ready())
        return len(ready)

    try:
        wait_until(lambda: count_ready() > 0, timeout_s=timeout_s)
    except RetryError:
        raise TritonNotReadyError(f"Triton at {', '.join(c.url for c in clients)} is not ready after {timeout_s:.0f}s "
                                  "(is it running, and is the hybridcn_nas model loaded?)") from None
    try:
        wait_until(lambda: count_ready() == len(clients), timeout_s=5.0)
    except RetryError:
        late = ", ".join(c.url for c in clients if c.url not in ready)
        progress.message(f"batch: leaving out Triton at {late} (not ready)")
    return [c for c in clients if c.url in ready]


def open_queue(options: BatchOptions, *, readonly: bool = False) -> Ledger:
    """The run's ledger: ``--ledger URL`` (a shared queue), else ``OUT/ledger.sqlite``."""
    target = options.ledger or Path(options.out_dir) / LEDGER_FILE
    return open_ledger(target, readonly=readonly)


def _load_model(options: BatchOptions, model: ServedModel | None) -> ServedModel:
    if model is not None:
        return model
    try:
        return ServedModel.from_repository(Path(options.repository))
    except (OSError, KeyError, ValueError) as error:
        raise BatchError(f"cannot read the model repository {options.repository}: {error}") from error


def _make_out_dir(out_dir: Path) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise BatchError(f"cannot create the output folder {out_dir}: {error}") from error


def run_batch(inputs: Sequence[str | Path], options: BatchOptions, *, progress: Progress | None = None,
              model: ServedModel | None = None) -> BatchSummary:
    """Process every field of ``inputs`` (and of the shared queue) not yet done, then (re)write the reports.

    ``inputs`` are discovered and registered in the ledger in one transaction (streamed: the queue is
    never held in memory); with a shared ``options.ledger`` they may be empty, to work on what others
    registered. Raises :class:`~batch.inputs.InputError` (before any work), :class:`~batch.ledger.LedgerError`
    (another model's results in the queue, a database that refuses), :class:`BatchError` or
    :class:`~batch.reports.ReportWriteError`; the ledger is consistent after any of them.
    """
    started = time.monotonic()
    progress = progress or make_progress("none")
    model = _load_model(options, model)
    tile_size = options.tile_size or model.field_size
    check = model.manifest.ood
    discovery = DiscoveryOptions(tile_size=tile_size, tile=options.tile, max_field_pixels=model.preprocess.max_pixels,
                                 max_slide_pixels=options.max_slide_pixels, pixel_size_um=options.pixel_size_um,
                                 training_pixel_size_um=None if check is None else check.pixel_size_um)
    if inputs or not options.ledger:  # only a shared --ledger queue can be joined without inputs
        check_inputs(list(inputs))
    out_dir = Path(options.out_dir)
    _make_out_dir(out_dir)
    worker = options.worker_id or worker_name()
    with output_lock(out_dir), open_queue(options) as ledger:
        ledger.bind_model(model.model_version)
        if not options.ledger:
            ledger.release()  # the folder's lock is ours: leases left in this file are a dead run's
        new = ledger.register(iter_discover(list(inputs), discovery)) if inputs else 0
        if options.retry_failed:
            retried = ledger.reset_failed()
            if retried:
                progress.message(f"batch: retrying {retried} failed fields")
        run_meta = {"run_state": "running", "run_pid": str(os.getpid()), "run_started": _now_iso(), "run_error": ""}
        if inputs:
            run_meta["inputs"] = json.dumps([str(Path(p).expanduser().resolve()) for p in inputs])
        ledger.set_meta(**run_meta)
        try:
            summary = _run(ledger, model, options, progress, out_dir, new, worker)
        except BaseException as error:
            reason = "interrupted" if isinstance(error, KeyboardInterrupt) else str(error)
            try:
                ledger.set_meta(run_state="failed", run_error=reason, run_finished=_now_iso())
            except Exception:  # a full disk may refuse this too; the original error matters more
                pass
            raise
        ledger.set_meta(run_state="done", run_finished=_now_iso())
    summary.elapsed_s = time.monotonic() - started
    return summary


def write_queue_reports(options: BatchOptions, *, model: ServedModel | None = None) -> BatchSummary:
    """Write the reports of the whole queue into ``options.out_dir`` now, whatever its state (no Triton:
    gallery images are those stored while the queue ran)."""
    started = time.monotonic()
    model = _load_model(options, model)
    out_dir = Path(options.out_dir)
    _make_out_dir(out_dir)
    with output_lock(out_dir), open_queue(options, readonly=True) as ledger:
        reports = _write_reports(ledger, model, options, out_dir, [])
        counts = ledger.counts()
    return BatchSummary(out_dir, model.model_version, counts, 0, 0, time.monotonic() - started, reports, 0.0)


def _run(ledger: Ledger, model: ServedModel, options: BatchOptions, progress: Progress, out_dir: Path,
         new: int, worker: str) -> BatchSummary:
    per_slide = {slide: counts[PENDING] for slide, counts in ledger.slide_counts().items() if counts[PENDING]}
    keeper = None
    if options.gallery_size:
        keeper = GalleryKeeper(model.classes, options.gallery_size)
        keeper.seed(ledger.iter_rows(DONE))
    pipeline = _Pipeline(ledger, model, [], options, progress, keeper, worker=worker)
    queue_s = 0.0
    if not per_slide:  # everything is done: rewrite the reports from the ledger, no Triton needed
        progress.message("batch: no field left to process; writing the reports from the ledger")
        reports = _write_reports(ledger, model, options, out_dir, [])
        return BatchSummary(out_dir, model.model_version, ledger.counts(), new, 0, 0.0, reports, 0.0)
    with triton_urls(options, progress) as urls:
        clients = [TritonClient(url, timeout_s=options.request_timeout_s) for url in urls]
        try:
            pipeline.clients = wait_ready(clients, options.triton_ready_timeout_s, progress)
            queue_started = time.monotonic()
            progress.start(per_slide)
            block = options.claim_block or 2 * options.inflight * options.batch_size
            source = LeasedFields(ledger, worker, block=max(block, options.batch_size), lease_s=options.lease_s)
            try:
                pipeline.run(source, options.workers or default_workers())
            finally:
                progress.close()
            queue_s = time.monotonic() - queue_started
            reports = _write_reports(ledger, model, options, out_dir, pipeline.clients)
        finally:
            for client in clients:
                client.close()
    return BatchSummary(out_dir, model.model_version, ledger.counts(), new, pipeline.processed, 0.0, reports,
                        queue_s)


def _write_reports(ledger: Ledger, model: ServedModel, options: BatchOptions, out_dir: Path,
                   clients: Sequence[TritonClient]) -> ReportFiles:
    renderer = make_gallery_renderer(ledger, clients, model, options.batch_size) if options.gallery_size else None
    return write_reports(ledger.iter_rows(), out_dir, classes=model.classes, model_version=model.model_version,
                         renderer=renderer, gallery_size=options.gallery_size)
