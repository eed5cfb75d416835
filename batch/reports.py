"""Outputs of a batch run, all regenerated from the ledger: results.csv, slides.csv/json, HTML reports.

Every file is written to a temporary name and renamed into place, so a reader (or a crash) never sees
half a file, and rerunning the command rewrites them from the ledger without duplicating a row.

Slide verdict (confidence-weighted): each classified field contributes its four probabilities weighted by
its confidence (its top probability), ``score[c] = sum_f conf_f * p_f[c] / sum_f conf_f``; the verdict is
the class with the highest score. Confident fields therefore outweigh uncertain ones, and the scores
still sum to 1. Estimated blast cells: the watershed cell counts of the fields predicted malignant
(Early, Pre or Pro), summed.
"""

from __future__ import annotations

import bisect
import csv
import hashlib
import html
import io
import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import cv2
import numpy as np

from batch.ledger import DONE, FAILED, PENDING, SKIPPED, TILE, FieldRow

RESULTS_CSV, SLIDES_CSV, SLIDES_JSON, INDEX_HTML, REPORTS_DIR = (
    "results.csv", "slides.csv", "slides.json", "index.html", "slides")
VERDICT_METHOD = ("confidence-weighted mean of the field probabilities: score[c] = sum(conf_f * p_f[c]) / "
                  "sum(conf_f), conf_f = the field's top probability; verdict = argmax score")
GALLERY_SIZE = 6
MAX_TABLE_ROWS = 5000


class ReportWriteError(RuntimeError):
    """An output file could not be written (disk full, permissions); the ledger is untouched."""


def malignant_classes(classes: Sequence[str]) -> tuple[str, ...]:
    """Every class but the first: the class order contract puts ``Benign`` first."""
    return tuple(classes[1:])


# ------------------------------------------------------------------------------------------ summaries

@dataclass(frozen=True)
class SlideSummary:
    slide_id: str
    fields: int  # fields to classify (background tiles not counted)
    done: int
    failed: int
    pending: int
    background_skipped: int
    class_counts: dict[str, int]
    verdict: str | None
    verdict_scores: dict[str, float]
    verdict_confidence: float | None
    malignant_score: float | None
    review_fields: int
    review_share: float | None
    estimated_blast_cells: int
    cells_total: int
    report: str

    def to_dict(self) -> dict:
        return asdict(self)


def slide_report_name(slide_id: str) -> str:
    """A safe, unique file name for a slide's report, e.g. ``slides/P7_S1-3f2a9c.html``."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", slide_id).strip("._") or "slide"
    if safe != slide_id:
        safe = f"{safe[:80]}-{hashlib.sha1(slide_id.encode()).hexdigest()[:6]}"
    return f"{REPORTS_DIR}/{safe}.html"


def summarize_slide(slide_id: str, rows: Sequence[FieldRow], classes: Sequence[str]) -> SlideSummary:
    """Counts, confidence-weighted verdict, review share and blast estimate of one slide's fields."""
    status = {state: sum(1 for r in rows if r.status == state) for state in (DONE, FAILED, PENDING, SKIPPED)}
    done = [r for r in rows if r.status == DONE]
    malignant = set(malignant_classes(classes))
    counts = {name: sum(1 for r in done if r.label == name) for name in classes}
    weights = np.array([r.confidence or 0.0 for r in done], np.float64)
    scores: dict[str, float] = {}
    verdict = confidence = malignant_score = None
    if done and weights.sum() > 0:
        probabilities = np.array([[r.probabilities.get(name, 0.0) for name in classes] for r in done], np.float64)
        weighted = weights @ probabilities / weights.sum()
        scores = {name: round(float(v), 6) for name, v in zip(classes, weighted, strict=True)}
        best = int(np.argmax(weighted))
        verdict, confidence = classes[best], round(float(weighted[best]), 6)
        malignant_score = round(float(sum(scores[name] for name in malignant)), 6)
    review = sum(1 for r in done if r.needs_review)
    return SlideSummary(
        slide_id=slide_id,
        fields=status[DONE] + status[FAILED] + status[PENDING],
        done=status[DONE], failed=status[FAILED], pending=status[PENDING], background_skipped=status[SKIPPED],
        class_counts=counts, verdict=verdict, verdict_scores=scores, verdict_confidence=confidence,
        malignant_score=malignant_score, review_fields=review,
        review_share=round(review / len(done), 6) if done else None,
        estimated_blast_cells=sum(r.cell_count or 0 for r in done if r.label in malignant),
        cells_total=sum(r.cell_count or 0 for r in done),
        report=slide_report_name(slide_id),
    )


def group_by_slide(rows: Sequence[FieldRow]) -> dict[str, list[FieldRow]]:
    slides: dict[str, list[FieldRow]] = {}
    for row in rows:
        slides.setdefault(row.spec.slide_id, []).append(row)
    return dict(sorted(slides.items()))


def summarize_slides(rows: Sequence[FieldRow], classes: Sequence[str]) -> list[SlideSummary]:
    return [summarize_slide(slide, members, classes) for slide, members in group_by_slide(rows).items()]


def malignant_probability(row: FieldRow, classes: Sequence[str]) -> float:
    return float(sum(row.probabilities.get(name, 0.0) for name in malignant_classes(classes)))


def _flagged_key(field_id: int, confidence: float | None) -> tuple[float, int]:
    return (confidence or 0.0, field_id)


def _malignant_key(field_id: int, probabilities: dict[str, float], classes: Sequence[str]) -> tuple[float, int]:
    return (-float(sum(probabilities.get(name, 0.0) for name in malignant_classes(classes))), field_id)


def gallery_selection(rows: Sequence[FieldRow], classes: Sequence[str], size: int = GALLERY_SIZE
                      ) -> tuple[list[FieldRow], list[FieldRow]]:
    """``(flagged, most_malignant)``: the least confident fields flagged for review, and the fields with
    the highest malignant probability (Early + Pre + Pro), ``size`` of each."""
    done = [r for r in rows if r.status == DONE]
    flagged = sorted((r for r in done if r.needs_review), key=lambda r: _flagged_key(r.field_id, r.confidence))
    worst = sorted(done, key=lambda r: _malignant_key(r.field_id, r.probabilities, classes))
    return flagged[:size], worst[:size]


class GalleryKeeper:
    """Which fields of each slide are in its report gallery so far, as results arrive.

    Ranked exactly as :func:`gallery_selection` ranks the final rows. A field in the final gallery was
    in the running one when it was recorded (adding fields can push a field out, never back in), so
    images stored for the running gallery, minus those of fields pushed out, are what the reports need.
    """

    def __init__(self, classes: Sequence[str], size: int = GALLERY_SIZE) -> None:
        self._classes = tuple(classes)
        self._size = size
        self._flagged: dict[str, list[tuple[float, int]]] = {}
        self._worst: dict[str, list[tuple[float, int]]] = {}

    def _insert(self, ranking: list[tuple[float, int]], key: tuple[float, int]) -> tuple[bool, int | None]:
        bisect.insort(ranking, key)
        if len(ranking) > self._size:
            dropped = ranking.pop()
            return dropped != key, (None if dropped == key else dropped[1])
        return True, None

    def offer(self, slide_id: str, field_id: int, *, confidence: float | None, needs_review: bool,
              probabilities: dict[str, float]) -> tuple[bool, list[int]]:
        """Add a done field; returns (whether it is in the gallery now, fields that just left it)."""
        flagged = self._flagged.setdefault(slide_id, [])
        worst = self._worst.setdefault(slide_id, [])
        entered, dropped = self._insert(worst, _malignant_key(field_id, probabilities, self._classes))
        candidates = [dropped]
        if needs_review:
            in_flagged, dropped_flagged = self._insert(flagged, _flagged_key(field_id, confidence))
            entered = entered or in_flagged
            candidates.append(dropped_flagged)
        members = {key[1] for key in (*flagged, *worst)}
        return entered, sorted({c for c in candidates if c is not None and c not in members})

    def seed(self, rows: Sequence[FieldRow]) -> None:
        """Start from the fields an earlier run already did."""
        for row in rows:
            if row.status == DONE:
                self.offer(row.spec.slide_id, row.field_id, confidence=row.confidence,
                           needs_review=bool(row.needs_review), probabilities=row.probabilities)


# ----------------------------------------------------------------------------------------- CSV, JSON

def result_columns(classes: Sequence[str]) -> list[str]:
    return ["slide_id", "source", "kind", "tile_x", "tile_y", "tile_w", "tile_h", "status", "label",
            *(f"p_{name}" for name in classes), "confidence", "needs_review", "review_reasons", "cell_count",
            "qc_flags", "model_version", "error"]


def _result_record(row: FieldRow, classes: Sequence[str]) -> list:
    tile = row.spec.kind == TILE
    coords = [row.spec.x, row.spec.y, row.spec.width, row.spec.height] if tile else ["", "", "", ""]
    done = row.status == DONE
    probabilities = [f"{row.probabilities[name]:.6f}" if done else "" for name in classes]
    return [row.spec.slide_id, row.spec.source, row.spec.kind, *coords, row.status, row.label or "",
            *probabilities, f"{row.confidence:.6f}" if done else "", int(bool(row.needs_review)) if done else "",
            "; ".join(row.review_reasons), row.cell_count if done else "", ";".join(row.qc_flags),
            row.model_version or "", row.error or ""]


def results_csv(rows: Sequence[FieldRow], classes: Sequence[str]) -> str:
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
                     *(f"n_{name}" for name in classes), "verdict", "verdict_confidence",
                     *(f"score_{name}" for name in classes), "malignant_score", "review_fields", "review_share",
                     "estimated_blast_cells", "cells_total", "report"])
    for s in summaries:
        writer.writerow([s.slide_id, s.fields, s.done, s.failed, s.pending, s.background_skipped,
                         *(s.class_counts[name] for name in classes), s.verdict or "",
                         "" if s.verdict_confidence is None else s.verdict_confidence,
                         *(s.verdict_scores.get(name, "") for name in classes),
                         "" if s.malignant_score is None else s.malignant_score, s.review_fields,
                         "" if s.review_share is None else s.review_share, s.estimated_blast_cells,
                         s.cells_total, s.report])
    return buffer.getvalue()


def slides_json(summaries: Sequence[SlideSummary], *, model_version: str, totals: dict[str, int]) -> str:
    return json.dumps({
        "model_version": model_version,
        "generated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "verdict_method": VERDICT_METHOD,
        "blast_estimate": "sum of watershed cell counts of the fields predicted Early, Pre or Pro",
        "totals": totals,
        "slides": [s.to_dict() for s in summaries],
    }, indent=2)


def write_atomic(path: Path, content: str | bytes) -> None:
    """Write to a temporary file beside ``path``, fsync, rename over ``path``; never leaves half a file."""
    data = content.encode() if isinstance(content, str) else content
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(temporary, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


# ----------------------------------------------------------------------------------------------- HTML

THUMBNAIL = 160


def jpeg_data_url(rgb: np.ndarray, *, size: int = THUMBNAIL, quality: int = 82) -> str:
    import base64

    small = cv2.resize(rgb, (size, size), interpolation=cv2.INTER_AREA) if rgb.shape[0] != size else rgb
    ok, encoded = cv2.imencode(".jpg", cv2.cvtColor(small, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError("JPEG encoding failed")
    return "data:image/jpeg;base64," + base64.b64encode(encoded.tobytes()).decode()


def _blend(rgb: np.ndarray, rgba: np.ndarray) -> np.ndarray:
    alpha = rgba[..., 3:4].astype(np.float32) / 255.0
    return (rgb.astype(np.float32) * (1 - alpha) + rgba[..., :3].astype(np.float32) * alpha).round().astype(np.uint8)


def gallery_images(original: np.ndarray, mask: np.ndarray, attention: np.ndarray) -> dict[str, str]:
    """Three small JPEG data URLs: the field, the field under its cell mask, under its attention map.

    ``original`` may be a thumbnail: the maps are resized to it.
    """
    from gateway.overlays import fit_maps, heatmap, rgba_map

    mask, attention = fit_maps(mask, attention, original.shape)
    return {
        "field": jpeg_data_url(original),
        "mask": jpeg_data_url(_blend(original, rgba_map((mask > 127).astype(np.uint8) * 140, (0, 200, 120)))),
        "attention": jpeg_data_url(_blend(original, heatmap(attention))),
    }


#: Renders gallery images for some fields: ``field_id -> {"field", "mask", "attention"}`` data URLs
#: (a field may be missing, or have only ``"field"``, when it cannot be re-read or re-inferred).
GalleryRenderer = Callable[[list[FieldRow]], dict[int, dict[str, str]]]

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,'Segoe UI',sans-serif;margin:24px auto;max-width:1180px;color:#1d2330;
padding:0 16px;background:#fafbfc}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #dde2ea;padding-bottom:4px}
.muted{color:#667085}.warn{color:#a4262c}
table{border-collapse:collapse;width:100%;background:#fff;font-size:13px}
th,td{border-bottom:1px solid #e6e9ef;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f1f3f7;font-weight:600}td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
.cards{display:flex;flex-wrap:wrap;gap:12px}
.box{background:#fff;border:1px solid #dde2ea;border-radius:8px;padding:10px 14px;min-width:150px}
.box b{display:block;font-size:20px}
.gallery{display:grid;grid-template-columns:repeat(auto-fill,minmax(520px,1fr));gap:12px}
.field{background:#fff;border:1px solid #dde2ea;border-radius:8px;padding:8px}
.field img{width:160px;height:160px;border-radius:4px;margin-right:4px}
.field .imgs{display:flex}.field .cap{font-size:12px;margin-top:4px;word-break:break-all}
.bar{display:inline-block;height:10px;background:#4063d8;border-radius:2px;vertical-align:middle}
.tag{display:inline-block;padding:0 6px;border-radius:8px;font-size:12px;background:#eef1f6}
.tag.Benign{background:#dff3e4}.tag.Early,.tag.Pre,.tag.Pro{background:#fde2e1}
footer{margin-top:32px;font-size:12px;color:#667085}
"""


def _page(title: str, body: str) -> str:
    return (f"<!doctype html><html lang=en><head><meta charset=utf-8><meta name=viewport "
            f"content='width=device-width,initial-scale=1'><title>{html.escape(title)}</title><style>{_CSS}"
            f"</style></head><body>{body}<footer>HybridCN-NAS batch report. Research use only; not a medical "
            "device. Every figure is computed by the model and must be reviewed by a qualified person."
            "</footer></body></html>")


def _e(value) -> str:
    return html.escape(str(value))


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _field_name(row: FieldRow) -> str:
    name = Path(row.spec.source).name
    return f"{name} @ x={row.spec.x}, y={row.spec.y}" if row.spec.kind == TILE else name


def _scores_table(summary: SlideSummary, classes: Sequence[str]) -> str:
    lines = []
    for name in classes:
        score = summary.verdict_scores.get(name)
        bar = f"<span class=bar style='width:{int(200 * score)}px'></span> {score:.3f}" if score is not None else "-"
        lines.append(f"<tr><td><span class='tag {_e(name)}'>{_e(name)}</span></td>"
                     f"<td class=num>{summary.class_counts[name]}</td><td>{bar}</td></tr>")
    return ("<table><tr><th>class</th><th class=num>fields</th><th>confidence-weighted score</th></tr>"
            + "".join(lines) + "</table>")


def _card(row: FieldRow, images: dict[str, str], classes: Sequence[str]) -> str:
    pictures = "".join(f"<img src='{images[k]}' alt='{k}' title='{k}'>" for k in ("field", "mask", "attention")
                       if k in images) or "<span class=muted>(image not available)</span>"
    probabilities = " ".join(f"{name} {row.probabilities.get(name, 0):.2f}" for name in classes)
    review = ("<div class=warn>review: " + _e("; ".join(row.review_reasons)) + "</div>") if row.needs_review else ""
    return (f"<div class=field><div class=imgs>{pictures}</div><div class=cap><span class='tag {_e(row.label)}'>"
            f"{_e(row.label)}</span> conf {row.confidence:.3f} &middot; malignant "
            f"{malignant_probability(row, classes):.3f} &middot; {row.cell_count} cells<br>{_e(_field_name(row))}"
            f"<br><span class=muted>{_e(probabilities)}</span>{review}</div></div>")


def slide_html(summary: SlideSummary, rows: Sequence[FieldRow], classes: Sequence[str], *, model_version: str,
               images: dict[int, dict[str, str]], gallery_size: int = GALLERY_SIZE) -> str:
    flagged, worst = gallery_selection(rows, classes, gallery_size)
    boxes = [("verdict", summary.verdict or "-"), ("verdict score", "-" if summary.verdict_confidence is None
                                                   else f"{summary.verdict_confidence:.3f}"),
             ("fields classified", f"{summary.done} / {summary.fields}"), ("failed", summary.failed),
             ("to review", f"{summary.review_fields} ({_pct(summary.review_share)})"),
             ("estimated blast cells", summary.estimated_blast_cells)]
    if summary.background_skipped:
        boxes.append(("background tiles skipped", summary.background_skipped))
    body = [f"<p><a href='../{INDEX_HTML}'>&larr; all slides</a></p><h1>Slide {_e(summary.slide_id)}</h1>",
            f"<p class=muted>model {_e(model_version)} &middot; verdict: {_e(VERDICT_METHOD)}</p>",
            "<div class=cards>" + "".join(f"<div class=box><span class=muted>{_e(k)}</span><b>{_e(v)}</b></div>"
                                          for k, v in boxes) + "</div>",
            "<h2>Classes</h2>", _scores_table(summary, classes)]
    for title, members, empty in (("Flagged for review (least confident first)", flagged, "no field is flagged"),
                                  ("Most malignant fields (Early + Pre + Pro probability)", worst,
                                   "no classified field")):
        body.append(f"<h2>{_e(title)}</h2><p class=muted>each: field, cell mask overlay, attention overlay</p>")
        body.append("<div class=gallery>" + "".join(_card(r, images.get(r.field_id, {}), classes) for r in members)
                    + "</div>" if members else f"<p class=muted>{empty}</p>")
    failed = [r for r in rows if r.status == FAILED]
    if failed:
        body.append("<h2>Failed fields</h2><table><tr><th>field</th><th>reason</th><th class=num>attempts</th></tr>"
                    + "".join(f"<tr><td>{_e(_field_name(r))}</td><td>{_e(r.error)}</td><td class=num>{r.attempts}"
                              "</td></tr>" for r in failed) + "</table>")
    listed = [r for r in rows if r.status in (DONE, PENDING)]
    body.append("<h2>All fields</h2><table><tr><th>field</th><th>status</th><th>class</th>"
                "<th class=num>confidence</th><th class=num>cells</th><th>review</th><th>QC</th></tr>")
    for r in listed[:MAX_TABLE_ROWS]:
        done = r.status == DONE
        body.append(f"<tr><td>{_e(_field_name(r))}</td><td>{r.status}</td><td>{_e(r.label or '')}</td>"
                    f"<td class=num>{f'{r.confidence:.3f}' if done else ''}</td>"
                    f"<td class=num>{r.cell_count if done else ''}</td><td>{'yes' if r.needs_review else ''}</td>"
                    f"<td>{_e(','.join(r.qc_flags))}</td></tr>")
    body.append("</table>")
    if len(listed) > MAX_TABLE_ROWS:
        body.append(f"<p class=muted>{len(listed) - MAX_TABLE_ROWS} more fields in results.csv</p>")
    return _page(f"Slide {summary.slide_id}", "".join(body))


def index_html(summaries: Sequence[SlideSummary], classes: Sequence[str], *, model_version: str,
               totals: dict[str, int]) -> str:
    generated = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    head = "".join(f"<th class=num>{_e(name)}</th>" for name in classes)
    rows = []
    for s in summaries:
        counts = "".join(f"<td class=num>{s.class_counts[name]}</td>" for name in classes)
        verdict = (f"<span class='tag {_e(s.verdict)}'>{_e(s.verdict)}</span> {s.verdict_confidence:.3f}"
                   if s.verdict else "-")
        rows.append(f"<tr><td><a href='{_e(s.report)}'>{_e(s.slide_id)}</a></td><td>{verdict}</td>"
                    f"<td class=num>{s.done}/{s.fields}</td><td class=num>{s.failed}</td>{counts}"
                    f"<td class=num>{_pct(s.review_share)}</td><td class=num>{s.estimated_blast_cells}</td></tr>")
    pending = totals.get(PENDING, 0)
    body = (f"<h1>Batch report</h1><p class=muted>model {_e(model_version)} &middot; generated {generated}</p>"
            "<div class=cards>"
            + "".join(f"<div class=box><span class=muted>{_e(k)}</span><b>{_e(v)}</b></div>" for k, v in (
                ("slides", len(summaries)), ("fields done", totals.get(DONE, 0)), ("failed", totals.get(FAILED, 0)),
                ("pending", pending), ("background tiles skipped", totals.get(SKIPPED, 0))))
            + "</div>"
            + ("<p class=warn>Some fields are still pending: rerun the same command to finish them.</p>"
               if pending else "")
            + f"<h2>Slides</h2><table><tr><th>slide</th><th>verdict</th><th class=num>done</th>"
            f"<th class=num>failed</th>{head}<th class=num>to review</th><th class=num>est. blast cells</th></tr>"
            + "".join(rows) + "</table>"
            f"<p class=muted>Verdict: {_e(VERDICT_METHOD)}. Estimated blast cells: watershed cell counts of the "
            "fields predicted Early, Pre or Pro. Files: <a href='results.csv'>results.csv</a>, "
            "<a href='slides.csv'>slides.csv</a>, <a href='slides.json'>slides.json</a>.</p>")
    return _page("Batch report", body)


@dataclass(frozen=True)
class ReportFiles:
    results: Path
    slides_csv: Path
    slides_json: Path
    index: Path
    slide_reports: list[Path]


def write_reports(rows: Sequence[FieldRow], out_dir: Path, *, classes: Sequence[str], model_version: str,
                  renderer: GalleryRenderer | None = None, gallery_size: int = GALLERY_SIZE) -> ReportFiles:
    """(Re)write every output of a batch folder from the ledger's rows; raises :class:`ReportWriteError`."""
    out_dir = Path(out_dir)
    summaries = summarize_slides(rows, classes)
    by_slide = group_by_slide(rows)
    totals = {state: sum(1 for r in rows if r.status == state) for state in (DONE, FAILED, PENDING, SKIPPED)}
    images: dict[int, dict[str, str]] = {}
    if renderer is not None:
        chosen: dict[int, FieldRow] = {}
        for members in by_slide.values():
            flagged, worst = gallery_selection(members, classes, gallery_size)
            chosen.update((r.field_id, r) for r in (*flagged, *worst))
        images = renderer(list(chosen.values())) if chosen else {}
    files = ReportFiles(out_dir / RESULTS_CSV, out_dir / SLIDES_CSV, out_dir / SLIDES_JSON, out_dir / INDEX_HTML, [])
    try:
        write_atomic(files.results, results_csv(rows, classes))
        write_atomic(files.slides_csv, slides_csv(summaries, classes))
        write_atomic(files.slides_json, slides_json(summaries, model_version=model_version, totals=totals))
        for summary in summaries:
            path = out_dir / summary.report
            write_atomic(path, slide_html(summary, by_slide[summary.slide_id], classes, model_version=model_version,
                                          images=images, gallery_size=gallery_size))
            files.slide_reports.append(path)
        write_atomic(files.index, index_html(summaries, classes, model_version=model_version, totals=totals))
    except OSError as error:
        raise ReportWriteError(f"cannot write the reports in {out_dir}: {error}. The ledger is intact: "
                               "free space (or fix permissions) and rerun the same command to write them") from error
    return files
