"""Images for the report galleries: those stored while the queue ran, else the field read and inferred again."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from concurrent.futures import Future

import numpy as np

from batch.ledger import FieldRow, Ledger
from batch.reports import GalleryRenderer
from batch.worker import ReaderCache, prepare_spec
from engine.client import TritonClient
from engine.field import PreparedField
from engine.model import ServedModel
from engine.overlays import gallery_images, jpeg_data_url


def make_gallery_renderer(ledger: Ledger, clients: Sequence[TritonClient], model: ServedModel,
                          batch_size: int) -> GalleryRenderer:
    """Gallery images: those stored while the queue ran, else re-read and re-infer the field.

    The run stores images only for the fields in a slide's running gallery (a few per slide). A field
    without stored images (a ledger written before galleries were stored) is redone here; one that cannot be
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
