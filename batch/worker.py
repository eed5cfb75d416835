"""The process-pool side of a batch run: read a field or a tile and prepare it for Triton (CPU only).

Each worker process holds the :class:`~engine.model.ServedModel` (set once by :func:`init_worker`)
and the last slide images it opened, so the tiles of one slide do not reopen the file.
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from batch.inputs import open_region_reader
from batch.ledger import FAILED, SKIPPED, TILE, FieldSpec
from engine.field import PreparedField, prepare_bytes, prepare_tile
from engine.model import ServedModel
from engine.overlays import THUMBNAIL
from preprocessing import InvalidImageError

OK = "ok"


class ReaderCache:
    """The last ``size`` slide readers opened, by path (one slide's tiles arrive together)."""

    def __init__(self, size: int = 2) -> None:
        self._size = size
        self._readers: OrderedDict[str, object] = OrderedDict()

    def get(self, path: str):
        reader = self._readers.pop(path, None) or open_region_reader(path)
        self._readers[path] = reader
        while len(self._readers) > self._size:
            _, old = self._readers.popitem(last=False)
            old.close()
        return reader

    def close(self) -> None:
        while self._readers:
            self._readers.popitem()[1].close()


@dataclass
class Preparation:
    """One field's preparation as the pool returns it: ``status`` is ok, failed or skipped."""

    field_id: int
    status: str
    prepared: PreparedField | None = None
    error: str | None = None
    thumbnail: np.ndarray | None = None  # the field at report-gallery size, in case it makes the gallery


def read_tile(spec: FieldSpec, readers: ReaderCache) -> np.ndarray:
    reader = readers.get(spec.source)
    return reader.read(spec.x, spec.y, spec.width, spec.height)


def prepare_spec(spec: FieldSpec, model: ServedModel, readers: ReaderCache) -> PreparedField | None:
    """Read and prepare one field; ``None`` for a background tile (field QC: empty)."""
    if spec.kind != TILE:
        try:
            data = Path(spec.source).read_bytes()
        except OSError as error:
            raise InvalidImageError("unreadable", f"cannot read {spec.source}: {error.strerror or error}") from error
        return prepare_bytes(data, model, pixel_size_um=spec.pixel_size_um)
    return prepare_tile(read_tile(spec, readers), model, pixel_size_um=spec.pixel_size_um)


def describe_error(error: BaseException) -> str:
    if isinstance(error, InvalidImageError):
        return str(error)
    if isinstance(error, OSError):
        return f"unreadable: {error}"
    return f"{type(error).__name__}: {error}"


def prepare_one(field_id: int, spec: FieldSpec, model: ServedModel, readers: ReaderCache) -> Preparation:
    try:
        prepared = prepare_spec(spec, model, readers)
    except Exception as error:  # one bad field is recorded and the queue goes on
        return Preparation(field_id, FAILED, error=describe_error(error))
    if prepared is None:
        return Preparation(field_id, SKIPPED, error="background tile (field QC: empty)")
    # The main process needs what goes to Triton, the QC, and a thumbnail; the full field stays here.
    nothing = np.empty((0, 0, 3), np.uint8)
    light = PreparedField(nothing, nothing, prepared.preprocessed, prepared.qc, prepared.source_shape,
                          prepared.timings_ms, prepared.statistics, prepared.scale)
    thumbnail = cv2.resize(prepared.display, (THUMBNAIL, THUMBNAIL), interpolation=cv2.INTER_AREA)
    return Preparation(field_id, OK, light, thumbnail=thumbnail)


_MODEL: ServedModel | None = None
_READERS = ReaderCache()


def _exit_with(owner: int, interval_s: float = 0.5) -> None:
    """End this worker once ``owner`` (the batch run) is gone: a run killed outright cannot shut its pool down,
    and a worker left behind would keep the pool's semaphores and Python's resource tracker alive."""
    while True:
        try:
            os.kill(owner, 0)
        except ProcessLookupError:
            os._exit(1)
        except PermissionError:  # alive, under another user: not ours to judge
            pass
        time.sleep(interval_s)


def init_worker(model: ServedModel, owner: int | None = None) -> None:
    """Pool initializer: keep the model; one OpenCV thread per process (the pool is the parallelism); follow
    the run's process ``owner`` into death."""
    global _MODEL
    _MODEL = model
    cv2.setNumThreads(1)
    if owner is not None:
        threading.Thread(target=_exit_with, args=(owner,), daemon=True, name="owner-watch").start()


def prepare_chunk(items: list[tuple[int, FieldSpec]]) -> list[Preparation]:
    """Pool task: prepare a small group of fields (one Triton request's worth)."""
    if _MODEL is None:
        raise RuntimeError("init_worker was not called in this process")
    return [prepare_one(field_id, spec, _MODEL, _READERS) for field_id, spec in items]
