"""The queue's three overlapping stages: prepare in a process pool, infer on Triton, record in the ledger.

Decoding and preprocessing run in a process pool sized to the cores; ``inflight`` requests of a few
fields each are in flight to Triton (whose dynamic batcher merges them), each retried by :mod:`tenacity`
with exponential backoff on the next endpoint; interpretation (watershed) and one ledger transaction per
request happen in this process. After the last attempt a request's fields are recorded as failed and the
queue goes on, unless Triton stopped answering altogether, which ends the run with the rest pending.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, ThreadPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field

import numpy as np
from tenacity import RetryCallState, RetryError, Retrying, stop_after_attempt, wait_exponential

from batch.claims import FieldSource, FixedFields
from batch.errors import BatchError, TritonNotReadyError
from batch.ledger import DONE, FAILED, FieldOutcome, Ledger, PendingField
from batch.options import BatchOptions
from batch.progress import Progress
from batch.summary import GalleryKeeper
from batch.worker import OK, Preparation, describe_error, init_worker, prepare_chunk
from engine.client import TritonClient
from engine.field import interpret
from engine.model import ServedModel
from engine.overlays import gallery_images
from engine.triton_server import wait_until

#: Consecutive requests that fail every attempt before the run stops (Triton is gone, not one bad batch).
DEAD_AFTER = 3


@dataclass
class _Request:
    items: list[Preparation]
    tried: set[str] = field(default_factory=set)
    attempts: int = 0
    started: float = 0.0


@dataclass
class _Pipeline:
    ledger: Ledger
    model: ServedModel
    clients: Sequence[TritonClient]
    options: BatchOptions
    progress: Progress
    keeper: GalleryKeeper | None = None
    #: This worker's name in the ledger's leases (``None``: a ledger nobody else writes).
    worker: str | None = None
    processed: int = 0
    slide_of: dict[int, str] = field(default_factory=dict)  # fields in flight -> their slide
    source: FieldSource | None = None
    _dead: int = 0
    _resting: dict[str, float] = field(default_factory=dict)  # endpoint -> time it may be used again
    _turn: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _record(self, outcomes: list[FieldOutcome], gallery: dict[int, dict[str, str]] | None = None,
                drop_gallery: Sequence[int] = ()) -> None:
        if not outcomes:
            return
        # a field whose lease ran out and was taken by another worker is not written again (0 changed)
        self.processed += self.ledger.record(outcomes, worker=self.worker, gallery=gallery, drop_gallery=drop_gallery)
        for outcome in outcomes:
            self.progress.advance(self.slide_of.pop(outcome.field_id), outcome.status)
        if self.source is not None:
            self.source.finished(outcome.field_id for outcome in outcomes)

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
        with self._lock:
            now = time.monotonic()
            order = [*self.clients[self._turn :], *self.clients[: self._turn]]
            for usable in (lambda c: c.url not in request.tried and self._resting.get(c.url, 0.0) <= now,
                           lambda c: c.url not in request.tried, lambda c: True):
                chosen = next((client for client in order if usable(client)), None)
                if chosen is not None:
                    self._turn = (self.clients.index(chosen) + 1) % len(self.clients)
                    return chosen
        raise TritonNotReadyError("no Triton endpoint")

    def _announce_retry(self, state: RetryCallState) -> None:
        attempts = self.options.attempts
        self.progress.message(f"batch: Triton request failed ({state.outcome.exception()}); retry "
                              f"{state.attempt_number} of {attempts - 1} in {state.upcoming_sleep:.1f}s")

    def _infer(self, request: _Request):
        """One request through Triton, retried on the next endpoint with exponential backoff (a worker thread)."""
        images = np.stack([item.prepared.preprocessed for item in request.items])
        retrying = Retrying(stop=stop_after_attempt(self.options.attempts),
                            wait=wait_exponential(multiplier=self.options.backoff_s, exp_base=2),
                            before_sleep=self._announce_retry, reraise=True)
        for attempt in retrying:
            with attempt:
                request.attempts = attempt.retry_state.attempt_number
                client = self._pick(request)
                request.started = time.perf_counter()
                try:
                    return client.infer(images)
                except Exception:
                    request.tried.add(client.url)
                    if len(self.clients) > 1:  # let the others take the traffic for a while
                        with self._lock:
                            self._resting[client.url] = time.monotonic() + 4 * self.options.backoff_s
                    elif self.options.restart_grace_s > 0:  # the only endpoint: give a restart its time
                        try:
                            wait_until(client.ready, timeout_s=self.options.restart_grace_s, interval_s=0.5)
                        except RetryError:
                            pass
                    raise
        raise AssertionError("unreachable: tenacity reraises the last error")

    def _answered(self, future: Future, request: _Request) -> None:
        try:
            output = future.result()
        except Exception as error:
            self._dead += 1
            reason = f"inference failed after {request.attempts} attempts: {error}"
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
            outcomes.append(FieldOutcome(item.field_id, DONE, result=result))
            if self.keeper is not None and item.thumbnail is not None:
                entered, left = self.keeper.offer(self.slide_of[item.field_id], item.field_id,
                                                  confidence=result.confidence, needs_review=result.needs_review,
                                                  probabilities=result.probabilities)
                dropped += left
                if entered:
                    gallery[item.field_id] = gallery_images(item.thumbnail, output.mask[index],
                                                            output.attention[index])
        self._record(outcomes, {i: v for i, v in gallery.items() if i not in dropped}, dropped)

    def run(self, source: FieldSource | Sequence[PendingField], workers: int, *, poll_s: float = 1.0) -> None:
        """Process what ``source`` hands out (a list is processed as given) until it is finished."""
        self.source = source if isinstance(source, FieldSource) else FixedFields(source)
        size, inflight = self.options.batch_size, self.options.inflight
        # chunks being prepared plus prepared ones waiting for a request slot: the only fields held in memory
        # (a prepared field is ~0.5 MB), so when preparing outpaces Triton, preparing waits, never the memory
        max_prepare = 2 * workers + inflight
        preparing: dict[Future, list[PendingField]] = {}
        answering: dict[Future, _Request] = {}
        ready: deque[_Request] = deque()
        exhausted = False
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["batch.worker"])
        pool = ProcessPoolExecutor(workers, mp_context=context, initializer=init_worker,
                                   initargs=(self.model, os.getpid()))
        senders = ThreadPoolExecutor(inflight, thread_name_prefix="triton-request")
        try:
            while True:
                waiting = False  # nothing to claim now, but others hold leases that may come back
                while not exhausted and len(preparing) + len(ready) < max_prepare:
                    chunk = self.source.next_chunk(size)
                    if chunk is None:
                        exhausted = True
                    elif not chunk:
                        waiting = True
                        break
                    else:
                        self.slide_of.update((p.field_id, p.spec.slide_id) for p in chunk)
                        preparing[pool.submit(prepare_chunk, [(p.field_id, p.spec) for p in chunk])] = chunk
                while ready and len(answering) < inflight:
                    request = ready.popleft()
                    answering[senders.submit(self._infer, request)] = request
                if exhausted and not (preparing or answering or ready):
                    break
                if not (preparing or answering):
                    if waiting:
                        time.sleep(poll_s)
                    continue
                finished, _ = wait([*preparing, *answering], timeout=poll_s, return_when=FIRST_COMPLETED)
                for future in finished:
                    if future in preparing:
                        self._prepared(future, preparing.pop(future), ready)
                    else:
                        self._answered(future, answering.pop(future))
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            senders.shutdown(wait=False, cancel_futures=True)  # requests in flight finish unread
            raise
        finally:
            self.source.close()
        pool.shutdown(wait=True)
        senders.shutdown(wait=True)
