"""Slide summaries and report galleries, computed from the ledger's rows.

Slide verdict (confidence-weighted): each classified field contributes its probabilities weighted by
its confidence (its top probability), ``score[c] = sum_f conf_f * p_f[c] / sum_f conf_f``; the leading
class is the one with the highest score. Confident fields therefore outweigh uncertain ones, and the
scores still sum to 1. The leading class is a *conclusive* verdict only when :class:`VerdictRules` find
nothing against it: fields that disagree (the runner-up's score within a margin), too large a share of
fields flagged for review, fields that failed or are not yet classified. Otherwise the slide is
*inconclusive* and needs review, with the reasons listed.

Estimated blast cells: the watershed cell counts of the fields confidently predicted malignant (a class
after the first, which the class order puts as ``Benign``, and not flagged for review), summed.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from batch.ledger import DONE, FAILED, PENDING, SKIPPED, FieldRow
from hybridcn.contracts import SlideSummary

REPORTS_DIR = "slides"
VERDICT_METHOD = ("confidence-weighted mean of the field probabilities: score[c] = sum(conf_f * p_f[c]) / "
                  "sum(conf_f), conf_f = the field's top probability; leading class = argmax score, a conclusive "
                  "verdict only if it beats the runner-up by the margin, few fields need review and none failed")
GALLERY_SIZE = 6
#: Rows of a slide's "All fields" and "Failed" tables in its report; the rest are in results.csv.
MAX_LISTED = 5000
CONCLUSIVE, INCONCLUSIVE, FAILED_SLIDE, PENDING_SLIDE, EMPTY_SLIDE = (
    "conclusive", "inconclusive", "failed", "pending", "empty")


@dataclass(frozen=True)
class VerdictRules:
    """When a slide's leading class may stand as its verdict without a person looking first."""

    #: The leading class's score must beat the runner-up's by this much (scores sum to 1).
    min_margin: float = 0.25
    #: At most this share of the classified fields may be flagged for review.
    max_review_share: float = 0.25
    #: Failed fields are tolerated up to this share of the slide's fields (0: any failure is a reason).
    max_failed_share: float = 0.0


DEFAULT_RULES = VerdictRules()


def verdict_reasons(scores: dict[str, float], *, done: int, failed: int, pending: int, review: int,
                    rules: VerdictRules = DEFAULT_RULES) -> list[str]:
    """Why a slide's leading class is not a conclusive verdict (empty: it is)."""
    reasons = []
    ranked = sorted(scores.items(), key=lambda item: -item[1])
    if len(ranked) > 1 and ranked[0][1] - ranked[1][1] < rules.min_margin:
        (first, a), (second, b) = ranked[:2]
        reasons.append(f"fields disagree: {first} {a:.2f} against {second} {b:.2f} (margin under "
                       f"{rules.min_margin:.2f})")
    if done and review / done > rules.max_review_share:
        reasons.append(f"{review} of {done} fields need review ({100 * review / done:.0f}%, over "
                       f"{100 * rules.max_review_share:.0f}%)")
    total = done + failed + pending
    if failed and failed / total > rules.max_failed_share:
        reasons.append(f"{failed} of {total} fields failed")
    if pending:
        reasons.append(f"{pending} of {total} fields not yet classified")
    return reasons


def malignant_classes(classes: Sequence[str]) -> tuple[str, ...]:
    """Every class but the first: the class order contract puts ``Benign`` first."""
    return tuple(classes[1:])


def slide_report_name(slide_id: str) -> str:
    """A safe, unique file name for a slide's report, e.g. ``slides/P7_S1-3f2a9c.html``."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", slide_id).strip("._") or "slide"
    if safe != slide_id:
        safe = f"{safe[:80]}-{hashlib.sha1(slide_id.encode()).hexdigest()[:6]}"
    return f"{REPORTS_DIR}/{safe}.html"


class SlideTally:
    """One slide's summary, galleries and listed fields, gathered a row at a time in bounded memory.

    What a report needs of a slide of any size: counts and score sums, the ``gallery_size`` best
    candidates of each gallery, and the first :data:`MAX_LISTED` rows of its field and failure tables.
    """

    def __init__(self, slide_id: str, classes: Sequence[str], gallery_size: int = GALLERY_SIZE,
                 rules: VerdictRules = DEFAULT_RULES) -> None:
        self.slide_id, self.classes, self.gallery_size, self.rules = slide_id, tuple(classes), gallery_size, rules
        self._malignant = set(malignant_classes(classes))
        self.status = dict.fromkeys((DONE, FAILED, PENDING, SKIPPED), 0)
        self.counts = dict.fromkeys(self.classes, 0)
        self._weight = 0.0
        self._weighted = np.zeros(len(self.classes), np.float64)
        self.review = self.blasts = self.cells = 0
        self._flagged: list[tuple[tuple[float, int], FieldRow]] = []
        self._worst: list[tuple[tuple[float, int], FieldRow]] = []
        self.listed: list[FieldRow] = []  # done and pending, the first MAX_LISTED
        self.failed: list[FieldRow] = []  # the first MAX_LISTED
        self.more_listed = self.more_failed = 0

    def _keep(self, ranking: list, key: tuple[float, int], row: FieldRow) -> None:
        if len(ranking) < self.gallery_size or key < ranking[-1][0]:
            bisect.insort(ranking, (key, row), key=lambda item: item[0])
            del ranking[self.gallery_size :]

    def add(self, row: FieldRow) -> None:
        self.status[row.status] += 1
        if row.status in (DONE, PENDING):
            if len(self.listed) < MAX_LISTED:
                self.listed.append(row)
            else:
                self.more_listed += 1
        if row.status == FAILED:
            if len(self.failed) < MAX_LISTED:
                self.failed.append(row)
            else:
                self.more_failed += 1
        if row.status != DONE:
            return
        if row.label in self.counts:
            self.counts[row.label] += 1
        weight = row.confidence or 0.0
        self._weight += weight
        self._weighted += weight * np.array([row.probabilities.get(name, 0.0) for name in self.classes], np.float64)
        cells = row.cell_count or 0
        self.cells += cells
        if row.needs_review:
            self.review += 1
        elif row.label in self._malignant:
            self.blasts += cells
        if self.gallery_size:
            self._keep(self._worst, _malignant_key(row.field_id, row.probabilities, self.classes), row)
            if row.needs_review:
                self._keep(self._flagged, _flagged_key(row.field_id, row.confidence), row)

    def galleries(self) -> tuple[list[FieldRow], list[FieldRow]]:
        """``(flagged, most_malignant)``: see :func:`gallery_selection`."""
        return [row for _, row in self._flagged], [row for _, row in self._worst]

    def summary(self) -> SlideSummary:
        """Counts, confidence-weighted verdict and its status, review share and blast estimate."""
        done = self.status[DONE]
        scores: dict[str, float] = {}
        verdict = confidence = malignant_score = None
        if done and self._weight > 0:
            weighted = self._weighted / self._weight
            scores = {name: round(float(v), 6) for name, v in zip(self.classes, weighted, strict=True)}
            best = int(np.argmax(weighted))
            verdict, confidence = self.classes[best], round(float(weighted[best]), 6)
            malignant_score = round(float(sum(scores[name] for name in self._malignant)), 6)
        if done:
            reasons = verdict_reasons(scores, done=done, failed=self.status[FAILED], pending=self.status[PENDING],
                                      review=self.review, rules=self.rules)
            verdict_status = INCONCLUSIVE if reasons else CONCLUSIVE
        elif self.status[FAILED]:
            verdict_status, reasons = FAILED_SLIDE, [f"all {self.status[FAILED]} fields failed"]
        elif self.status[PENDING]:
            verdict_status, reasons = PENDING_SLIDE, [f"{self.status[PENDING]} fields not yet classified"]
        else:
            verdict_status, reasons = EMPTY_SLIDE, ["no field to classify (background only)"]
        return SlideSummary(
            slide_id=self.slide_id,
            fields=done + self.status[FAILED] + self.status[PENDING],
            done=done, failed=self.status[FAILED], pending=self.status[PENDING],
            background_skipped=self.status[SKIPPED],
            class_counts=dict(self.counts), verdict=verdict, verdict_status=verdict_status, verdict_reasons=reasons,
            verdict_scores=scores, verdict_confidence=confidence,
            malignant_score=malignant_score, review_fields=self.review,
            review_share=round(self.review / done, 6) if done else None,
            estimated_blast_cells=self.blasts, cells_total=self.cells,
            report=slide_report_name(self.slide_id),
        )


def summarize_slide(slide_id: str, rows: Iterable[FieldRow], classes: Sequence[str],
                    rules: VerdictRules = DEFAULT_RULES) -> SlideSummary:
    """Counts, confidence-weighted verdict and its status, review share and blast estimate of one slide."""
    tally = SlideTally(slide_id, classes, 0, rules)
    for row in rows:
        tally.add(row)
    return tally.summary()


def tally_slides(rows: Iterable[FieldRow], classes: Sequence[str], gallery_size: int = GALLERY_SIZE
                 ) -> Iterator[SlideTally]:
    """One finished :class:`SlideTally` per slide of ``rows``, which must come grouped by slide (as
    :meth:`~batch.ledger.Ledger.iter_rows` streams them); a slide seen again after another raises ValueError."""
    seen: set[str] = set()
    for slide_id, members in itertools.groupby(rows, key=lambda row: row.spec.slide_id):
        if slide_id in seen:
            raise ValueError(f"rows are not grouped by slide: {slide_id!r} comes back after another slide")
        seen.add(slide_id)
        tally = SlideTally(slide_id, classes, gallery_size)
        for row in members:
            tally.add(row)
        yield tally


def summarize_slides(rows: Iterable[FieldRow], classes: Sequence[str]) -> list[SlideSummary]:
    """Every slide's summary, by slide id; ``rows`` in any order, streamed (one tally per slide is kept)."""
    tallies: dict[str, SlideTally] = {}
    for row in rows:
        slide_id = row.spec.slide_id
        if slide_id not in tallies:
            tallies[slide_id] = SlideTally(slide_id, classes, 0)
        tallies[slide_id].add(row)
    return [tallies[slide].summary() for slide in sorted(tallies)]


def malignant_probability(row: FieldRow, classes: Sequence[str]) -> float:
    return float(sum(row.probabilities.get(name, 0.0) for name in malignant_classes(classes)))


def _flagged_key(field_id: int, confidence: float | None) -> tuple[float, int]:
    return (confidence or 0.0, field_id)


def _malignant_key(field_id: int, probabilities: dict[str, float], classes: Sequence[str]) -> tuple[float, int]:
    return (-float(sum(probabilities.get(name, 0.0) for name in malignant_classes(classes))), field_id)


def gallery_selection(rows: Iterable[FieldRow], classes: Sequence[str], size: int = GALLERY_SIZE
                      ) -> tuple[list[FieldRow], list[FieldRow]]:
    """``(flagged, most_malignant)``: the least confident fields flagged for review, and the fields with
    the highest malignant probability (Early + Pre + Pro), ``size`` of each."""
    tally = SlideTally("", classes, size)
    for row in rows:
        tally.add(row)
    return tally.galleries()


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

    def seed(self, rows: Iterable[FieldRow]) -> None:
        """Start from the fields an earlier run already did."""
        for row in rows:
            if row.status == DONE:
                self.offer(row.spec.slide_id, row.field_id, confidence=row.confidence,
                           needs_review=bool(row.needs_review), probabilities=row.probabilities)
