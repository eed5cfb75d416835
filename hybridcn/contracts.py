"""The results the system hands out, each defined once: the manifest, a field result, a slide summary.

Every path uses these models as they are: the REST API responses, the batch ledger, the CSV/JSON/HTML
reports, the CLI's JSON Lines and ``hybridcn evaluate``. A field read over gRPC or in a report therefore
carries the same names and meanings as one read from ``POST /v1/classify``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from preprocessing.scale import RED_CELL_UM

#: How people name each class (the web page and reports); the short names are the class order contract's.
CLASS_DESCRIPTIONS = {"Benign": "Benign (hematogones)", "Early": "Early Pre-B ALL", "Pre": "Pre-B ALL",
                      "Pro": "Pro-B ALL"}


class OutOfDistribution(BaseModel):
    """The out-of-distribution check fitted on the training fields (``hybridcn ood``; ``export.ood``).

    Two scores, each divided by its threshold: the Mahalanobis distance of the backbone features (the
    served ``ood`` graph) and of the field's acquisition statistics (``preprocessing.fieldstats``, scored
    on the CPU with the mean and whitening below). A field is out of distribution when either is over 1.
    """

    feature_threshold: float
    statistics_names: list[str]
    statistics_mean: list[float]
    statistics_whitening: list[list[float]]
    statistics_threshold: float
    scale_range: tuple[float, float] | None = Field(
        None, description="blob radius (px at the model's size, preprocessing.fieldstats.blob_scale) that training "
                          "fields span, 0.25th to 99.75th percentile; a second, texture-based magnification check")
    red_cell_diameter: tuple[float, float, float] | None = Field(
        None, description="red-cell diameter in pixels at the field size (preprocessing.scale) over the training "
                          "fields: 0.25th percentile, median, 99.75th percentile; the median sets the training scale "
                          "(null in checks fitted before it existed: no scale handling)")
    report: dict[str, Any] = Field(default_factory=dict, description="held-out flag rate and probe results")

    @property
    def pixel_size_um(self) -> float | None:
        """um per field pixel of the training fields, from their red cells' median diameter."""
        return None if self.red_cell_diameter is None else RED_CELL_UM / self.red_cell_diameter[1]


class Manifest(BaseModel):
    """What ``hybridcn export`` records beside the ensemble: the model's identity, sizes and calibration.

    Class names, image sizes and the review threshold are read from here and nowhere else.
    """

    model_config = ConfigDict(extra="allow", protected_namespaces=())

    model_version: str
    exported_at: str
    profile: dict[str, Any] = Field(description="the training profile, as `Profile.to_dict` writes it")
    stain_reference: dict[str, Any] = Field(description="Reinhard target statistics (Lab mean and std)")
    feature_width: int
    tokens: int
    temperature: float = 1.0
    review_threshold: float = Field(0.9, ge=0.0, le=1.0)
    review_target_precision: float | None = None
    parity_max_abs_diff: dict[str, dict[str, float]] = Field(default_factory=dict, description="per stage and output")
    training: dict[str, Any] = Field(default_factory=dict)
    oof_metrics: dict[str, Any] | None = None
    class_descriptions: dict[str, str] = Field(default_factory=lambda: dict(CLASS_DESCRIPTIONS))
    ood: OutOfDistribution | None = None

    @property
    def classes(self) -> tuple[str, ...]:
        return tuple(self.profile["classes"])

    @property
    def image_size(self) -> int:
        return int(self.profile["image_size"])


class Cell(BaseModel):
    """One cell split from the predicted mask by watershed."""

    bbox: list[int] = Field(description="x, y, width, height in field pixels")
    area: int
    centroid: list[float]


class FieldQCResult(BaseModel):
    """Field quality checks run before inference (see ``preprocessing.qc``)."""

    model_config = ConfigDict(extra="allow")

    empty: bool = False
    blurred: bool = False
    overexposed: bool = False
    flags: list[str] = Field(default_factory=list)


class FieldImages(BaseModel):
    """PNG data URLs for display: the field as sent, preprocessed, and the model's maps."""

    original: str
    preprocessed: str
    mask: str
    attention: str = Field(description="the Attention U-Net's finest gate: where the segmentation looked, not what "
                           "decided the class")
    cells: list[str]
    preprocessing: list[str] = Field(default_factory=list, description="the phase-1 steps behind `preprocessed`")
    evidence: str | None = Field(None, description="occlusion evidence (`explain=true`): how much hiding each region "
                                 "lowers the predicted class's margin, brightest at `evidence_peak`")
    evidence_peak: float | None = Field(None, description="the largest fall of the predicted class's margin "
                                        "(log of its probability over the runner-up's) when one window is hidden")


class FieldResult(BaseModel):
    """One field's diagnosis. The response of ``POST /v1/classify``, a ledger row's result, a CLI JSON line."""

    model_config = ConfigDict(protected_namespaces=())

    label: str = Field(description="predicted class, one of the manifest's classes")
    probabilities: dict[str, float] = Field(description="per class, in the manifest's class order")
    confidence: float = Field(description="the top probability")
    needs_review: bool
    review_reasons: list[str] = Field(default_factory=list)
    review_threshold: float | None = Field(
        description="confidence below this sends the field to review (null only in ledgers older than schema 2)")
    cell_count: int = Field(description="cells split by watershed on the predicted mask")
    cells: list[Cell] = Field(default_factory=list)
    ood_score: float | None = Field(None, description="out-of-distribution score: over 1 means unlike the "
                                    "training fields (reason `out_of_distribution`); null if the model has no check")
    scale: float | None = Field(None, description="the field's red-cell diameter in pixels at the field size, as "
                                "it arrived (the magnification check compares it with the training fields'); null "
                                "when no red cells were measured or the caller gave the pixel size")
    pixel_size_um: float | None = Field(None, description="um per pixel of the image as sent: the caller's, or "
                                        "estimated from its red cells (7.5 um across); null when not known")
    rescaled_by: float | None = Field(None, description="how much the field was enlarged (>1) or shrunk (<1) to "
                                      "the training scale on top of the usual fit; null when it was not")
    qc: FieldQCResult = Field(default_factory=FieldQCResult)
    model_version: str
    timings_ms: dict[str, float] = Field(default_factory=dict)
    filename: str | None = Field(None, description="the uploaded file's name, or the path given to the CLI")
    images: FieldImages | None = None

    def stored(self) -> FieldResult:
        """The result as the ledger keeps it: no images, no per-request timings."""
        return self.model_copy(update={"images": None, "timings_ms": {}})


class SlideSummary(BaseModel):
    """One slide of a batch queue, computed from the ledger (slides.csv/json, the jobs API, HTML reports)."""

    slide_id: str
    fields: int = Field(description="fields to classify (background tiles not counted)")
    done: int
    failed: int
    pending: int
    background_skipped: int
    class_counts: dict[str, int]
    verdict: str | None = Field(None, description="class with the highest confidence-weighted score (the leading "
                                "class; a verdict to act on only when `verdict_status` is conclusive)")
    verdict_status: Literal["conclusive", "inconclusive", "failed", "pending", "empty"] = Field(
        description="conclusive: the leading class stands; inconclusive: needs review (see verdict_reasons); "
                    "failed: every field failed; pending: nothing classified yet; empty: background only")
    verdict_reasons: list[str] = Field(default_factory=list, description="why the verdict is not conclusive")
    verdict_scores: dict[str, float] = Field(description="sum(conf*p)/sum(conf) over the slide's fields")
    verdict_confidence: float | None = None
    malignant_score: float | None = Field(None, description="sum of the malignant classes' scores")
    review_fields: int
    review_share: float | None = None
    estimated_blast_cells: int = Field(
        description="cell counts of the fields confidently predicted malignant (not flagged for review)")
    cells_total: int
    report: str | None = Field(None, description="the slide's HTML report (a path in files, a URL in the API)")
