"""Run a queue of slides through Triton: discover, record in the ledger, prepare, infer, report.

Throughput comes from three overlapping stages: decoding and preprocessing in a process pool sized to
the cores, several gRPC requests of a few fields each in flight to Triton (whose dynamic batcher merges
them), and the watershed/interpretation plus one ledger transaction per request in this process.
Several ``--triton`` endpoints are used round robin. A request that fails is retried with exponential
backoff; after the last attempt its fields are recorded as failed and the queue goes on, unless Triton
stopped answering altogether, which ends the run with the remaining fields left pending.
"""

from __future__ import annotations

import errno
import fcntl
import heapq
import itertools
import json
import multiprocessing
import os
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from batch.inputs import TILE_MODES, DiscoveryOptions, discover
from batch.ledger import DONE, FAILED, LEDGER_FILE, FieldOutcome, FieldRow, Ledger, PendingField, SQLiteLedger
from batch.progress import Progress, make_progress
from batch.reports import GALLERY_SIZE, GalleryKeeper, ReportFiles, gallery_images, jpeg_data_url, write_reports
from batch.worker import OK, Preparation, ReaderCache, describe_error, init_worker, prepare_chunk, prepare_spec
from gateway.client import TritonClient
from gateway.service import PreparedField, ServedModel, interpret

DEFAULT_REPOSITORY = Path(__file__).resolve().parent.parent / "model_repository"
LOCK_FILE = ".lock"
#: Consecutive requests that fail every attempt before the run stops (Triton is gone, not one bad batch).
DEAD_AFTER = 3


class BatchError(RuntimeError):
    """A run cannot start or go on (output folder busy, Triton unreachable, a worker died)."""


class OutputBusyError(BatchError):
    """Another batch run holds the output folder."""


class TritonNotReadyError(BatchError):
    """No usable Triton endpoint."""


@dataclass(frozen=True)
class BatchOptions:
    out_dir: Path
    repository: Path = DEFAULT_REPOSITORY
    triton_urls: tuple[str, ...] = ()
    batch_size: int = 8
    inflight: int = 4
    workers: int = 0  # 0 = one per core
    # ONNX Runtime threads per stage of the embedded server a run starts itself: one thread each lets
    # segmentation and features run side by side on the cores, which beats ORT's per-stage thread pools
    # under a full queue (see bench/bench_batch.py). 0 = ORT's default.
    ort_threads: int = 1
    retry_failed: bool = False
    attempts: int = 3
    backoff_s: float = 0.5
    tile: str = "auto"
    tile_size: int = 0  # 0 = the model's field size
    gallery_size: int = GALLERY_SIZE
    triton_ready_timeout_s: float = 30.0
    request_timeout_s: float = 120.0

    def __post_init__(self) -> None:
        for name in ("batch_size", "inflight", "attempts"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("workers", "ort_threads"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.tile_size and self.tile_size < 16:
            raise ValueError(f"tile_size must be 0 (the model's size) or >= 16, got {self.tile_size}")
        if self.tile not in TILE_MODES:
            raise ValueError(f"tile must be one of {', '.join(TILE_MODES)}, got {self.tile!r}")


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


def default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ------------------------------------------------------------------------------------ output folder lock

@contextmanager
def output_lock(out_dir: Path, *, wait_s: float = 2.0) -> Iterator[None]:
    """Hold ``DIR/.lock`` (``flock``, released by the kernel even on SIGKILL) for the whole run."""
    path = Path(out_dir) / LOCK_FILE
    handle = open(path, "a+")
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except OSError as error:
            if error.errno not in (errno.EAGAIN, errno.EACCES) or time.monotonic() > deadline:
                handle.seek(0)
                owner = handle.read().strip() or "?"
                handle.close()
                raise OutputBusyError(f"{out_dir} is in use by another batch run (pid {owner}); wait for it "
                                      "or use another --out folder") from error
            time.sleep(0.1)
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        yield
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


def run_in_progress(out_dir: Path) -> bool:
    """True while some process holds the output folder's lock (a run is writing to it)."""
    path = Path(out_dir) / LOCK_FILE
    if not path.exists():
        return False
    with open(path) as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
    return False


# ------------------------------------------------------------------------------------------ Triton side

@contextmanager
def triton_urls(options: BatchOptions, progress: Progress) -> Iterator[list[str]]:
    """The ``--triton`` endpoints, or one embedded server started for the run."""
    if options.triton_urls:
        yield list(options.triton_urls)
        return
    from gateway.local import triton_endpoint

    progress.message("batch: starting the embedded Triton server ...")
    with triton_endpoint(options.repository, None, ort_threads=options.ort_threads) as url:
        yield [url]


def wait_ready(clients: Sequence[TritonClient], timeout_s: float, progress: Progress) -> list[TritonClient]:
    """The endpoints that are ready within ``timeout_s`` (the others are left out, with a message)."""
    deadline, graced = time.monotonic() + timeout_s, False
    waiting = list(clients)
    while True:
        ready = [client for client in clients if client not in waiting or client.ready()]
        waiting = [client for client in waiting if client not in ready]
        if not waiting:
            return ready
        if ready and not graced:  # one endpoint is enough to start; the others get a short grace
            deadline, graced = min(deadline, time.monotonic() + 5.0), True
        if time.monotonic() > deadline:
            if not ready:
                raise TritonNotReadyError(
                    f"Triton at {', '.join(c.url for c in waiting)} is not ready after {timeout_s:.0f}s (is it "
                    "running, and is the hybridcn_nas model loaded?)")
            progress.message(f"batch: leaving out Triton at {', '.join(c.url for c in waiting)} (not ready)")
            return ready
        time.sleep(0.25)


def make_gallery_renderer(ledger: Ledger, clients: Sequence[TritonClient], model: ServedModel, batch_size: int):
    """Gallery images: those stored while the queue ran, else re-read and re-infer the field.

    The run stores images only for the fields in a slide's running gallery (a few per slide). A field
    without stored images (done by an older version of this code) is redone here; one that cannot be
    re-read is shown without images, one that cannot be re-inferred without overlays.
    """
    def render(rows: list[FieldRow]) -> dict[int, dict[str, str]]:
        stored = ledger.gallery_images(row.field_id for row in rows)
        missing = [row for row in rows if row.field_id not in stored]
        return {**stored, **(redo(missing) if missing else {})}

    def redo(rows: list[FieldRow]) -> dict[int, dict[str, str]]:
        readers = ReaderCache()
        prepared: dict[int, PreparedField] = {}
        try:
            for row in rows:
                try:
                    result = prepare_spec(row.spec, model, readers)
                except Exception:
                    continue
                if result is not None:
                    prepared[row.field_id] = result
        finally:
            readers.close()
        ids = list(prepared)
        groups = [ids[i : i + batch_size] for i in range(0, len(ids), batch_size)]
        rotation = itertools.cycle(clients)
        futures: list[Future | None] = []
        for group in groups:
            try:
                futures.append(next(rotation).submit(np.stack([prepared[i].preprocessed for i in group])))
            except Exception:  # no endpoint (a rerun with nothing to process), or a broken channel
                futures.append(None)
        images: dict[int, dict[str, str]] = {}
        for group, future in zip(groups, futures, strict=True):
            try:
                output = future.result() if future is not None else None
            except Exception:
                output = None
            for j, field_id in enumerate(group):
                display = prepared[field_id].display
                images[field_id] = (gallery_images(display, output.mask[j], output.attention[j])
                                    if output is not None else {"field": jpeg_data_url(display)})
        return images

    return render


# ---------------------------------------------------------------------------------------------- queue

@dataclass
class _Request:
    items: list[Preparation]
    attempt: int = 1
    client: TritonClient | None = None
    started: float = 0.0
    tried: set[str] = field(default_factory=set)


@dataclass
class _Pipeline:
    ledger: Ledger
    model: ServedModel
    clients: Sequence[TritonClient]
    options: BatchOptions
    progress: Progress
    slide_of: dict[int, str]
    keeper: GalleryKeeper | None = None
    processed: int = 0
    _dead: int = 0
    _seq: itertools.count = field(default_factory=itertools.count)
    _resting: dict[str, float] = field(default_factory=dict)  # endpoint -> time it may be used again
    _turn: int = 0

    def _record(self, outcomes: list[FieldOutcome], gallery: dict[int, dict[str, str]] | None = None,
                drop_gallery: Sequence[int] = ()) -> None:
        if not outcomes:
            return
        self.ledger.record(outcomes, gallery=gallery, drop_gallery=drop_gallery)
        self.processed += len(outcomes)
        for outcome in outcomes:
            self.progress.advance(self.slide_of[outcome.field_id], outcome.status)

    def _prepared(self, future: Future, chunk: list[PendingField], ready: deque) -> None:
        try:
            results: list[Preparation] = future.result()
        except BrokenProcessPool as error:
            raise BatchError("a preprocessing worker process died (out of memory?); the ledger keeps what was "
                             "done - rerun the same command to go on") from error
        except Exception as error:  # e.g. a result that could not be pickled: fail the chunk, go on
            results = [Preparation(p.field_id, FAILED, error=describe_error(error)) for p in chunk]
        self._record([FieldOutcome(r.field_id, r.status, error=r.error) for r in results if r.status != OK])
        ok = [r for r in results if r.status == OK]
        if ok:
            ready.append(_Request(ok))

    def _pick(self, request: _Request) -> TritonClient:
        """Round robin, preferring endpoints this request has not failed on and that are not resting."""
        now = time.monotonic()
        order = [*self.clients[self._turn :], *self.clients[: self._turn]]
        for usable in (lambda c: c.url not in request.tried and self._resting.get(c.url, 0.0) <= now,
                       lambda c: c.url not in request.tried, lambda c: True):
            chosen = next((client for client in order if usable(client)), None)
            if chosen is not None:
                self._turn = (self.clients.index(chosen) + 1) % len(self.clients)
                return chosen
        raise TritonNotReadyError("no Triton endpoint")

    def _send(self, request: _Request) -> Future:
        request.client = self._pick(request)
        request.started = time.perf_counter()
        images = np.stack([item.prepared.preprocessed for item in request.items])
        try:
            return request.client.submit(images)
        except Exception as error:  # a channel that fails before sending: same path as a failed answer
            failed: Future = Future()
            failed.set_exception(error)
            return failed

    def _answered(self, future: Future, request: _Request, delayed: list) -> None:
        try:
            output = future.result()
        except Exception as error:
            request.tried.add(request.client.url)
            if len(self.clients) > 1:  # let the others take the traffic for a while
                self._resting[request.client.url] = time.monotonic() + 4 * self.options.backoff_s
            if request.attempt < self.options.attempts:
                backoff = self.options.backoff_s * 2 ** (request.attempt - 1)
                self.progress.message(f"batch: Triton request failed ({error}); retry {request.attempt} of "
                                      f"{self.options.attempts - 1} in {backoff:.1f}s")
                request.attempt += 1
                heapq.heappush(delayed, (time.monotonic() + backoff, next(self._seq), request))
                return
            self._dead += 1
            reason = f"inference failed after {request.attempt} attempts: {error}"
            self._record([FieldOutcome(item.field_id, FAILED, error=reason) for item in request.items])
            if self._dead >= DEAD_AFTER:
                raise TritonNotReadyError(f"Triton stopped answering ({error}); the remaining fields stay pending "
                                          "- rerun the same command when it is back (and --retry-failed for "
                                          "the fields that failed)") from error
            return
        self._dead = 0
        triton_ms = round((time.perf_counter() - request.started) * 1000 / len(request.items), 2)
        outcomes, gallery, dropped = [], {}, []
        for index, item in enumerate(request.items):
            try:
                result = interpret(item.prepared, output.item(index), self.model, {"triton": triton_ms})
            except Exception as error:
                outcomes.append(FieldOutcome(item.field_id, FAILED, error=describe_error(error)))
                continue
            outcomes.append(FieldOutcome(
                item.field_id, DONE, label=result.label, probabilities=result.probabilities,
                confidence=result.confidence, needs_review=result.needs_review,
                review_reasons=result.review_reasons, cell_count=result.cell_count,
                qc_flags=list(result.qc.get("flags", [])), model_version=result.model_version,
            ))
            if self.keeper is not None and item.thumbnail is not None:
                entered, left = self.keeper.offer(self.slide_of[item.field_id], item.field_id,
                                                  confidence=result.confidence, needs_review=result.needs_review,
                                                  probabilities=result.probabilities)
                dropped += left
                if entered:
                    gallery[item.field_id] = gallery_images(item.thumbnail, output.mask[index],
                                                            output.attention[index])
        self._record(outcomes, {i: v for i, v in gallery.items() if i not in dropped}, dropped)

    def run(self, todo: list[PendingField], workers: int) -> None:
        size, inflight = self.options.batch_size, self.options.inflight
        chunks = deque(todo[i : i + size] for i in range(0, len(todo), size))
        max_prepare = 2 * workers + inflight
        preparing: dict[Future, list[PendingField]] = {}
        answering: dict[Future, _Request] = {}
        ready: deque[_Request] = deque()
        delayed: list = []
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["batch.worker"])
        pool = ProcessPoolExecutor(workers, mp_context=context, initializer=init_worker, initargs=(self.model,))
        try:
            while True:
                while chunks and len(preparing) < max_prepare:
                    chunk = chunks.popleft()
                    preparing[pool.submit(prepare_chunk, [(p.field_id, p.spec) for p in chunk])] = chunk
                now = time.monotonic()
                while delayed and delayed[0][0] <= now:
                    ready.append(heapq.heappop(delayed)[2])
                while ready and len(answering) < inflight:
                    request = ready.popleft()
                    answering[self._send(request)] = request
                if not (chunks or preparing or answering or ready or delayed):
                    break
                timeout = min(1.0, max(0.0, delayed[0][0] - now)) if delayed else 1.0
                pending = [*preparing, *answering]
                if not pending:
                    time.sleep(timeout)
                    continue
                finished, _ = wait(pending, timeout=timeout, return_when=FIRST_COMPLETED)
                for future in finished:
                    if future in preparing:
                        self._prepared(future, preparing.pop(future), ready)
                    else:
                        self._answered(future, answering.pop(future), delayed)
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            for future in answering:  # let in-flight gRPC calls finish in the background, unread
                future.cancel()
            raise
        pool.shutdown(wait=True)


# ----------------------------------------------------------------------------------------------- run

def run_batch(inputs: Sequence[str | Path], options: BatchOptions, *, progress: Progress | None = None,
              model: ServedModel | None = None) -> BatchSummary:
    """Process every field of ``inputs`` not yet done in ``options.out_dir`` and (re)write the reports.

    Raises :class:`~batch.inputs.InputError` (before any work), :class:`~batch.ledger.LedgerError`
    (another model's results in the folder), :class:`BatchError` or
    :class:`~batch.reports.ReportWriteError`; the ledger is consistent after any of them.
    """
    started = time.monotonic()
    progress = progress or make_progress("none")
    if model is None:
        try:
            model = ServedModel.from_repository(Path(options.repository))
        except (OSError, KeyError, ValueError) as error:
            raise BatchError(f"cannot read the model repository {options.repository}: {error}") from error
    tile_size = options.tile_size or model.field_size
    specs = discover(list(inputs), DiscoveryOptions(tile_size=tile_size, tile=options.tile,
                                                    max_field_pixels=model.preprocess.max_pixels))
    out_dir = Path(options.out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise BatchError(f"cannot create the output folder {out_dir}: {error}") from error
    with output_lock(out_dir), SQLiteLedger(out_dir / LEDGER_FILE) as ledger:
        ledger.bind_model(model.model_version)
        new = ledger.register(specs)
        if options.retry_failed:
            retried = ledger.reset_failed()
            if retried:
                progress.message(f"batch: retrying {retried} failed fields")
        ledger.set_meta(run_state="running", run_pid=str(os.getpid()), run_started=_now_iso(), run_error="",
                        inputs=json.dumps([str(Path(p).expanduser().resolve()) for p in inputs]))
        try:
            summary = _run(ledger, model, options, progress, out_dir, new)
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


def _run(ledger: Ledger, model: ServedModel, options: BatchOptions, progress: Progress, out_dir: Path,
         new: int) -> BatchSummary:
    todo = ledger.pending()
    slide_of = {p.field_id: p.spec.slide_id for p in todo}
    per_slide: dict[str, int] = {}
    for pending in todo:
        per_slide[pending.spec.slide_id] = per_slide.get(pending.spec.slide_id, 0) + 1
    keeper = None
    if options.gallery_size:
        keeper = GalleryKeeper(model.classes, options.gallery_size)
        keeper.seed(ledger.rows())
    pipeline = _Pipeline(ledger, model, [], options, progress, slide_of, keeper)
    queue_s = 0.0
    if not todo:  # everything is done: rewrite the reports from the ledger, no Triton needed
        progress.message("batch: no field left to process; writing the reports from the ledger")
        reports = _write_reports(ledger, model, options, out_dir, [])
        return BatchSummary(out_dir, model.model_version, ledger.counts(), new, 0, 0.0, reports, 0.0)
    with triton_urls(options, progress) as urls:
        clients = [TritonClient(url, timeout_s=options.request_timeout_s) for url in urls]
        try:
            pipeline.clients = wait_ready(clients, options.triton_ready_timeout_s, progress)
            queue_started = time.monotonic()
            progress.start(per_slide)
            try:
                pipeline.run(todo, options.workers or default_workers())
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
    return write_reports(ledger.rows(), out_dir, classes=model.classes, model_version=model.model_version,
                         renderer=renderer, gallery_size=options.gallery_size)
