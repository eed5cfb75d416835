"""The HTML batch reports: jinja2 templates (autoescaped) in ``batch/templates``."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path

from jinja2 import Environment, PackageLoader, select_autoescape

from batch.ledger import TILE, FieldRow
from batch.summary import VERDICT_METHOD, SlideTally, malignant_classes
from hybridcn.contracts import SlideSummary

INDEX_HTML = "index.html"


@lru_cache(maxsize=1)
def _environment() -> Environment:
    environment = Environment(loader=PackageLoader("batch", "templates"),
                              autoescape=select_autoescape(["html"], default_for_string=True))
    environment.globals["css"] = environment.loader.get_source(environment, "report.css")[0]
    return environment


def field_name(row: FieldRow) -> str:
    """A field as people name it: the file, plus the tile's position in a slide image."""
    name = Path(row.spec.source).name
    return f"{name} @ x={row.spec.x}, y={row.spec.y}" if row.spec.kind == TILE else name


def slide_html(summary: SlideSummary, tally: SlideTally, classes: Sequence[str], *, model_version: str,
               images: dict[int, dict[str, str]]) -> str:
    """One slide's page: verdict, class scores, review and malignant galleries, failures, every field."""
    flagged, worst = tally.galleries()
    malignant = malignant_classes(classes)

    def cards(members: list[FieldRow]) -> list[dict]:
        return [{"row": r, "images": images.get(r.field_id, {}), "name": field_name(r),
                 "malignant": sum(r.probabilities.get(name, 0.0) for name in malignant)} for r in members]

    return _environment().get_template("slide.html").render(
        s=summary, classes=classes, model_version=model_version, verdict_method=VERDICT_METHOD,
        index_html=INDEX_HTML,
        galleries=[("Flagged for review (least confident first)", cards(flagged), "no field is flagged"),
                   (f"Most malignant fields ({' + '.join(malignant)} probability)", cards(worst),
                    "no classified field")],
        failed=[(field_name(r), r) for r in tally.failed],
        more_failed=tally.more_failed,
        listed=[(field_name(r), r) for r in tally.listed],
        more=tally.more_listed,
    )


def index_html(summaries: Sequence[SlideSummary], classes: Sequence[str], *, model_version: str,
               totals: dict[str, int]) -> str:
    """The queue's front page: totals and one line per slide."""
    return _environment().get_template("index.html").render(
        summaries=summaries, classes=classes, model_version=model_version, totals=totals,
        generated=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), verdict_method=VERDICT_METHOD,
        malignant=malignant_classes(classes),
    )
