"""Outputs of a batch run, all regenerated from the ledger: results.csv, slides.csv/json, HTML reports.

Every file is written to a temporary name and renamed into place, so a reader (or a crash) never sees
half a file, and rerunning the command rewrites them from the ledger without duplicating a row. The
slide verdict and gallery rules are in :mod:`batch.summary`, the HTML in :mod:`batch.html`.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import IO

from batch.html import INDEX_HTML, index_html, slide_html
from batch.ledger import DONE, FAILED, PENDING, SKIPPED, TILE, FieldRow
from batch.summary import GALLERY_SIZE, VERDICT_METHOD, malignant_classes, tally_slides
from hybridcn.contracts import FieldResult, SlideSummary

RESULTS_CSV, SLIDES_CSV, SLIDES_JSON = "results.csv", "slides.csv", "slides.json"

#: Renders gallery images for some fields: ``field_id -> {"field", "mask", "attention"}`` data URLs
#: (a field may be missing, or have only ``"field"``, when it cannot be re-read or re-inferred).
GalleryRenderer = Callable[[list[FieldRow]], dict[int, dict[str, str]]]


class ReportWriteError(RuntimeError):
    """An output file could not be written (disk full, permissions); the ledger is untouched."""


def result_columns(classes: Sequence[str]) -> list[str]:
    return ["slide_id", "source", "kind", "tile_x", "tile_y", "tile_w", "tile_h", "status", "label",
            *(f"p_{name}" for name in classes), "confidence", "needs_review", "review_reasons", "cell_count",
            "ood_score", "red_cell_px", "pixel_size_um", "rescaled_by", "qc_flags", "model_version", "error"]


def _result_record(row: FieldRow, classes: Sequence[str]) -> list:
    tile = row.spec.kind == TILE
    coords = [row.spec.x, row.spec.y, row.spec.width, row.spec.height] if tile else ["", "", "", ""]
    done = row.status == DONE
    probabilities = [f"{row.probabilities[name]:.6f}" if done else "" for name in classes]
    return [row.spec.slide_id, row.spec.source, row.spec.kind, *coords, row.status, row.label or "",
            *probabilities, f"{row.confidence:.6f}" if done else "", int(bool(row.needs_review)) if done else "",
            "; ".join(row.review_reasons), row.cell_count if done else "",
            *_optional(row.result, ("ood_score", "scale", "pixel_size_um", "rescaled_by")), ";".join(row.qc_flags),
            row.model_version or "", row.error or ""]


def _optional(result: FieldResult | None, names: Sequence[str]) -> list:
    """The named result fields, blank where missing (a field not done, a model without the check)."""
    return ["" if result is None or getattr(result, name) is None else getattr(result, name) for name in names]


def results_csv(rows: Iterable[FieldRow], classes: Sequence[str]) -> str:
    """One row per field (background tiles left out): done, failed, or still pending."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(result_columns(classes))
    writer.writerows(_result_record(row, classes) for row in rows if row.status != SKIPPED)
    return buffer.getvalue()


def slides_csv(summaries: Sequence[SlideSummary], classes: Sequence[str]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["slide_id", "fields", "done", "failed", "pending", "background_skipped",
                     *(f"n_{name}" for name in classes), "verdict_status", "verdict", "verdict_confidence",
                     *(f"score_{name}" for name in classes), "malignant_score", "review_fields", "review_share",
                     "estimated_blast_cells", "cells_total", "verdict_reasons", "report"])
    for s in summaries:
        writer.writerow([s.slide_id, s.fields, s.done, s.failed, s.pending, s.background_skipped,
                         *(s.class_counts[name] for name in classes), s.verdict_status, s.verdict or "",
                         "" if s.verdict_confidence is None else s.verdict_confidence,
                         *(s.verdict_scores.get(name, "") for name in classes),
                         "" if s.malignant_score is None else s.malignant_score, s.review_fields,
                         "" if s.review_share is None else s.review_share, s.estimated_blast_cells,
                         s.cells_total, "; ".join(s.verdict_reasons), s.report])
    return buffer.getvalue()


def slides_json(summaries: Sequence[SlideSummary], classes: Sequence[str], *, model_version: str,
                totals: dict[str, int]) -> str:
    return json.dumps({
        "model_version": model_version,
        "generated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "verdict_method": VERDICT_METHOD,
        "blast_estimate": "sum of watershed cell counts of the fields confidently predicted "
                          + ", ".join(malignant_classes(classes)) + " (not flagged for review)",
        "totals": totals,
        "slides": [s.model_dump() for s in summaries],
    }, indent=2)


@contextmanager
def atomic_file(path: Path, mode: str = "w") -> Iterator[IO]:
    """A file written under a temporary name beside ``path``, fsynced and renamed over ``path`` when the
    block ends; on any error the temporary file goes and ``path`` is untouched (never half a file)."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    text = {} if "b" in mode else {"encoding": "utf-8", "newline": ""}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(temporary, mode, **text) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def write_atomic(path: Path, content: str | bytes) -> None:
    """Write ``content`` to ``path`` through :func:`atomic_file`."""
    with atomic_file(path, "wb") as handle:
        handle.write(content.encode() if isinstance(content, str) else content)


@dataclass(frozen=True)
class ReportFiles:
    results: Path
    slides_csv: Path
    slides_json: Path
    index: Path
    slide_reports: list[Path]


def write_reports(rows: Iterable[FieldRow], out_dir: Path, *, classes: Sequence[str], model_version: str,
                  renderer: GalleryRenderer | None = None, gallery_size: int = GALLERY_SIZE) -> ReportFiles:
    """(Re)write every output of a batch folder from the ledger's rows; raises :class:`ReportWriteError`.

    ``rows`` come grouped by slide (:meth:`~batch.ledger.Ledger.iter_rows` streams them so) and are read
    once: ``results.csv`` is written as they arrive and each slide's page when its last row has, so memory
    holds one slide's tally (bounded, see :class:`~batch.summary.SlideTally`), not the queue.
    """
    out_dir = Path(out_dir)
    files = ReportFiles(out_dir / RESULTS_CSV, out_dir / SLIDES_CSV, out_dir / SLIDES_JSON, out_dir / INDEX_HTML, [])
    totals = dict.fromkeys((DONE, FAILED, PENDING, SKIPPED), 0)
    summaries: list[SlideSummary] = []

    def counted(stream: Iterable[FieldRow], writer) -> Iterator[FieldRow]:
        for row in stream:
            totals[row.status] += 1
            if row.status != SKIPPED:
                writer.writerow(_result_record(row, classes))
            yield row

    try:
        with atomic_file(files.results) as handle:
            writer = csv.writer(handle, lineterminator="\n")
            writer.writerow(result_columns(classes))
            for tally in tally_slides(counted(rows, writer), classes, gallery_size):
                summary = tally.summary()
                flagged, worst = tally.galleries()
                chosen = {r.field_id: r for r in (*flagged, *worst)}
                images = renderer(list(chosen.values())) if renderer is not None and chosen else {}
                path = out_dir / summary.report
                write_atomic(path, slide_html(summary, tally, classes, model_version=model_version, images=images))
                files.slide_reports.append(path)
                summaries.append(summary)
        summaries.sort(key=lambda s: s.slide_id)
        write_atomic(files.slides_csv, slides_csv(summaries, classes))
        write_atomic(files.slides_json, slides_json(summaries, classes, model_version=model_version, totals=totals))
        write_atomic(files.index, index_html(summaries, classes, model_version=model_version, totals=totals))
    except OSError as error:
        raise ReportWriteError(f"cannot write the reports in {out_dir}: {error}. The ledger is intact: "
                               "free space (or fix permissions) and rerun the same command to write them") from error
    return files
