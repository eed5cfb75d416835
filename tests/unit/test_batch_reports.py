"""Slide summaries (confidence-weighted verdict, review share, blast estimate) and the report files."""

from __future__ import annotations

import csv
import errno
import io
import json

import numpy as np
import pytest

from batch.ledger import DONE, FAILED, PENDING, SKIPPED, TILE, FieldOutcome, FieldRow, FieldSpec, SQLiteLedger
from batch.lock import OutputBusyError, output_lock, run_in_progress
from batch.reports import ReportWriteError, result_columns, results_csv, write_reports
from batch.summary import gallery_selection, slide_report_name, summarize_slide
from hybridcn.contracts import FieldQCResult, FieldResult

CLASSES = ("Benign", "Early", "Pre", "Pro")


def _row(field_id, status=DONE, probabilities=None, cells=0, review=False, slide="S1", kind="field", error=None):
    probabilities = probabilities or {}
    label = max(probabilities, key=probabilities.get) if probabilities else None
    spec = FieldSpec(slide, f"/data/{slide}/f{field_id}.png", kind, 224 * field_id if kind == TILE else 0, 0,
                     224 if kind == TILE else 0, 224 if kind == TILE else 0)
    result = _result(label, probabilities, cells=cells, review=review) if status == DONE else None
    return FieldRow(field_id, spec, status, result, error, 1, None)


def _result(label, probabilities, *, cells=0, review=False, flags=()) -> FieldResult:
    return FieldResult(label=label, probabilities=probabilities, confidence=max(probabilities.values()),
                       needs_review=review, review_reasons=["confidence below threshold"] if review else [],
                       review_threshold=0.9, cell_count=cells, qc=FieldQCResult(flags=list(flags)), model_version="v1")


def _p(benign, early, pre, pro):
    return dict(zip(CLASSES, (benign, early, pre, pro), strict=True))


ROWS = [
    _row(1, probabilities=_p(0.9, 0.05, 0.03, 0.02), cells=3),
    _row(2, probabilities=_p(0.2, 0.6, 0.1, 0.1), cells=5, review=True),
    _row(3, probabilities=_p(0.1, 0.1, 0.1, 0.7), cells=4),
    _row(4, status=FAILED, error="truncated: image data is corrupt"),
    _row(5, status=SKIPPED, kind=TILE, error="background tile (field QC: empty)"),
    _row(6, status=PENDING),
]


def test_slide_summary_maths():
    summary = summarize_slide("S1", ROWS, CLASSES)
    weights = np.array([0.9, 0.6, 0.7])
    probabilities = np.array([[0.9, 0.05, 0.03, 0.02], [0.2, 0.6, 0.1, 0.1], [0.1, 0.1, 0.1, 0.7]])
    expected = weights @ probabilities / weights.sum()  # [0.4475, 0.2208, 0.0841, 0.2475]
    assert list(summary.verdict_scores.values()) == pytest.approx(expected, abs=1e-6)
    assert sum(summary.verdict_scores.values()) == pytest.approx(1.0)
    assert summary.verdict == "Benign" and summary.verdict_confidence == pytest.approx(expected[0], abs=1e-6)
    assert summary.malignant_score == pytest.approx(expected[1:].sum(), abs=1e-6)
    assert summary.class_counts == {"Benign": 1, "Early": 1, "Pre": 0, "Pro": 1}
    counts = (summary.fields, summary.done, summary.failed, summary.pending, summary.background_skipped)
    assert counts == (5, 3, 1, 1, 1)
    assert summary.review_fields == 1 and summary.review_share == pytest.approx(1 / 3, abs=1e-6)
    # only confidently malignant fields count: Pro's 4 (Early's 5 are in a field flagged for review)
    assert summary.estimated_blast_cells == 4
    assert summary.cells_total == 12
    assert summary.verdict_status == "inconclusive"  # fields disagree, one failed, one pending


def test_confidence_weighting_lets_confident_fields_outvote_uncertain_ones():
    uncertain = [_row(i, probabilities=_p(0.4, 0.2, 0.2, 0.2)) for i in range(1, 4)]  # 3 weak Benign votes
    confident = [_row(i, probabilities=_p(0.02, 0.02, 0.01, 0.95)) for i in range(4, 6)]  # 2 strong Pro votes
    summary = summarize_slide("S", uncertain + confident, CLASSES)
    assert summary.class_counts["Benign"] == 3 and summary.verdict == "Pro"
    empty = summarize_slide("S", [_row(1, status=FAILED)], CLASSES)
    assert (empty.verdict, empty.verdict_scores, empty.review_share, empty.estimated_blast_cells) == (None, {}, None, 0)
    assert empty.verdict_status == "failed" and empty.verdict_reasons == ["all 1 fields failed"]


def _confident(field_id, label, *, review=False, cells=2):
    probabilities = {name: (0.97 if name == label else 0.01) for name in CLASSES}
    return _row(field_id, probabilities=probabilities, review=review, cells=cells)


def test_a_slide_of_agreeing_confident_fields_is_conclusive():
    summary = summarize_slide("S", [_confident(i, "Pre") for i in range(1, 9)], CLASSES)
    assert (summary.verdict_status, summary.verdict, summary.verdict_reasons) == ("conclusive", "Pre", [])
    assert summary.estimated_blast_cells == 16


def test_fields_that_disagree_make_the_slide_inconclusive():
    # 3 confident Benign + 3 confident Early: the leading class wins by a hair, which is no verdict
    rows = [_confident(i, "Benign") for i in range(1, 4)] + [_confident(i, "Early") for i in range(4, 7)]
    summary = summarize_slide("S", rows, CLASSES)
    assert summary.verdict_status == "inconclusive"
    assert len(summary.verdict_reasons) == 1 and summary.verdict_reasons[0].startswith("fields disagree")
    # a clear majority is not a disagreement
    rows = [_confident(i, "Benign") for i in range(1, 9)] + [_confident(9, "Early")]
    assert summarize_slide("S", rows, CLASSES).verdict_status == "conclusive"


def test_too_many_fields_to_review_make_the_slide_inconclusive():
    # the leading class looks certain, but most of its fields were flagged for review
    rows = [_confident(i, "Benign", review=i <= 6) for i in range(1, 9)]
    summary = summarize_slide("S", rows, CLASSES)
    assert summary.verdict == "Benign" and summary.verdict_status == "inconclusive"
    assert summary.verdict_reasons == ["6 of 8 fields need review (75%, over 25%)"]
    rows = [_confident(i, "Benign", review=i <= 2) for i in range(1, 9)]  # 25%: at the limit, allowed
    assert summarize_slide("S", rows, CLASSES).verdict_status == "conclusive"


def test_failed_or_pending_fields_make_the_slide_inconclusive():
    rows = [_confident(i, "Pro") for i in range(1, 6)]
    failed = summarize_slide("S", [*rows, _row(6, status=FAILED, error="truncated")], CLASSES)
    assert failed.verdict_status == "inconclusive" and failed.verdict_reasons == ["1 of 6 fields failed"]
    pending = summarize_slide("S", [*rows, _row(6, status=PENDING)], CLASSES)
    assert pending.verdict_reasons == ["1 of 6 fields not yet classified"]
    assert summarize_slide("S", [_row(1, status=PENDING)], CLASSES).verdict_status == "pending"
    skipped = summarize_slide("S", [_row(1, status=SKIPPED, kind=TILE)], CLASSES)
    assert skipped.verdict_status == "empty"


def test_blasts_are_counted_only_in_confidently_malignant_fields():
    rows = [_confident(1, "Benign", cells=7), _confident(2, "Pre", cells=3),
            _confident(3, "Pro", cells=5, review=True)]
    assert summarize_slide("S", rows, CLASSES).estimated_blast_cells == 3


def test_rules_are_settings():
    from batch.summary import VerdictRules

    rows = [_confident(i, "Benign") for i in range(1, 4)] + [_confident(i, "Early") for i in range(4, 7)]
    lenient = VerdictRules(min_margin=0.0)
    assert summarize_slide("S", rows, CLASSES, lenient).verdict_status == "conclusive"


def test_results_csv_has_one_row_per_field_and_leaves_out_background_tiles():
    table = list(csv.DictReader(io.StringIO(results_csv(ROWS, CLASSES))))
    assert list(table[0]) == result_columns(CLASSES)
    assert [r["source"].rsplit("/", 1)[1] for r in table] == ["f1.png", "f2.png", "f3.png", "f4.png", "f6.png"]
    first = table[0]
    assert (first["status"], first["label"], first["p_Benign"], first["tile_x"], first["cell_count"]) == (
        "done", "Benign", "0.900000", "", "3")
    assert table[1]["needs_review"] == "1" and table[1]["review_reasons"] == "confidence below threshold"
    assert (table[3]["status"], table[3]["error"], table[3]["p_Pro"]) == ("failed", "truncated: image data is corrupt",
                                                                         "")
    assert table[4]["status"] == "pending"


def test_gallery_picks_flagged_and_most_malignant_fields():
    flagged, worst = gallery_selection(ROWS, CLASSES, size=2)
    assert [r.field_id for r in flagged] == [2]
    assert [r.field_id for r in worst] == [3, 2]


def test_report_names_are_safe_and_distinct():
    assert slide_report_name("S1") == "slides/S1.html"
    odd = slide_report_name("P7/../<S1>")
    assert odd.startswith("slides/P7_") and "/" not in odd[len("slides/"):] and "<" not in odd
    assert slide_report_name("a/b") != slide_report_name("a_b")


def test_reports_are_written_from_the_ledger_and_self_contained(tmp_path):
    rows = [*ROWS, _row(7, probabilities=_p(0.1, 0.8, 0.05, 0.05), cells=2, slide="<b>S2</b>")]
    def renderer(chosen):
        return {r.field_id: {"field": "data:image/jpeg;base64,AAAA"} for r in chosen}

    files = write_reports(rows, tmp_path, classes=CLASSES, model_version="v1", renderer=renderer)
    summary = json.loads(files.slides_json.read_text())
    assert [s["slide_id"] for s in summary["slides"]] == ["<b>S2</b>", "S1"]
    assert summary["totals"] == {DONE: 4, FAILED: 1, PENDING: 1, SKIPPED: 1}
    assert "sum(conf_f" in summary["verdict_method"]
    assert len(files.slide_reports) == 2 and all(p.is_file() for p in files.slide_reports)
    index = files.index.read_text()
    assert "&lt;b&gt;S2&lt;/b&gt;" in index and "<b>S2</b>" not in index
    page = (tmp_path / "slides" / "S1.html").read_text()
    assert "data:image/jpeg;base64,AAAA" in page and "truncated: image data is corrupt" in page
    for html_file in [files.index, *files.slide_reports]:
        text = html_file.read_text()
        assert "http://" not in text and "https://" not in text and "<script" not in text and "<link" not in text
    assert not list(tmp_path.rglob("*.tmp"))


def test_a_full_disk_fails_loudly_keeps_the_old_files_and_the_ledger(tmp_path, monkeypatch):
    with SQLiteLedger(tmp_path / "ledger.sqlite") as ledger:
        ledger.bind_model("v1")
        ledger.register([FieldSpec("S1", f"/data/f{i}.png") for i in range(3)])
        ledger.record([FieldOutcome(p.field_id, DONE, _result("Pre", _p(0.1, 0.1, 0.7, 0.1), cells=2))
                       for p in ledger.pending()[:2]])
        write_reports(ledger.rows(), tmp_path, classes=CLASSES, model_version="v1")
        before = (tmp_path / "results.csv").read_text()
        ledger.record([FieldOutcome(ledger.pending()[0].field_id, DONE, _result("Pro", _p(0, 0, 0, 1), cells=1))])
        import batch.reports

        def disk_full(fd):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(batch.reports.os, "fsync", disk_full)
        with pytest.raises(ReportWriteError, match="No space left on device.*ledger is intact"):
            write_reports(ledger.rows(), tmp_path, classes=CLASSES, model_version="v1")
        assert (tmp_path / "results.csv").read_text() == before  # the old file, whole
        assert not list(tmp_path.rglob(".*.tmp"))
        assert ledger.counts()[DONE] == 3
        monkeypatch.undo()
        write_reports(ledger.rows(), tmp_path, classes=CLASSES, model_version="v1")
        assert len((tmp_path / "results.csv").read_text().splitlines()) == 4


def test_one_run_per_output_folder(tmp_path):
    assert not run_in_progress(tmp_path)
    with output_lock(tmp_path):
        assert run_in_progress(tmp_path)
        with pytest.raises(OutputBusyError, match="in use by another batch run"):
            with output_lock(tmp_path, wait_s=0.2):
                pass
    assert not run_in_progress(tmp_path)


def test_the_running_gallery_stores_exactly_the_final_gallery_fields():
    from batch.summary import GalleryKeeper

    rng = np.random.default_rng(3)
    rows = []
    for field_id in range(1, 121):
        p = rng.dirichlet(np.ones(4) * 0.7)
        rows.append(_row(field_id, probabilities=_p(*np.round(p, 6)), review=bool(rng.random() < 0.4),
                         slide=f"S{field_id % 3}"))
    for order in (rows, rows[::-1], [rows[i] for i in rng.permutation(len(rows))]):
        keeper, stored = GalleryKeeper(CLASSES, size=4), set()
        half = len(order) // 2
        for row in order[:half]:
            entered, left = keeper.offer(row.spec.slide_id, row.field_id, confidence=row.confidence,
                                         needs_review=row.needs_review, probabilities=row.probabilities)
            stored = (stored | ({row.field_id} if entered else set())) - set(left)
        resumed = GalleryKeeper(CLASSES, size=4)  # a second run after a crash starts from the ledger
        resumed.seed(order[:half])
        for row in order[half:]:
            entered, left = resumed.offer(row.spec.slide_id, row.field_id, confidence=row.confidence,
                                          needs_review=row.needs_review, probabilities=row.probabilities)
            stored = (stored | ({row.field_id} if entered else set())) - set(left)
        expected = set()
        for slide in ("S0", "S1", "S2"):
            flagged, worst = gallery_selection([r for r in rows if r.spec.slide_id == slide], CLASSES, size=4)
            expected |= {r.field_id for r in (*flagged, *worst)}
        assert stored == expected


def test_reports_show_an_inconclusive_slide_and_its_reasons(tmp_path):
    rows = [_confident(i, "Benign") for i in range(1, 4)] + [_confident(i, "Early") for i in range(4, 7)]
    files = write_reports(rows, tmp_path, classes=CLASSES, model_version="v1")
    for page in (files.index, *files.slide_reports):
        text = page.read_text()
        assert "Inconclusive: needs review" in text and "fields disagree" in text
    slides = list(csv.DictReader(io.StringIO((tmp_path / "slides.csv").read_text())))
    assert slides[0]["verdict_status"] == "inconclusive" and "fields disagree" in slides[0]["verdict_reasons"]
