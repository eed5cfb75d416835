"""Response schemas of the gateway's API (one family per resource)."""

from __future__ import annotations

from pydantic import BaseModel, Field


class CellBox(BaseModel):
    bbox: list[int] = Field(description="x, y, width, height in field pixels")
    area: int
    centroid: list[float]


class FieldImages(BaseModel):
    """PNG data URLs for display: the field as sent, preprocessed, and the model's maps."""

    original: str
    preprocessed: str
    mask: str
    attention: str
    cells: list[str]
    preprocessing: list[str] = Field(default_factory=list, description="the phase-1 steps behind `preprocessed`")


class Classification(BaseModel):
    label: str = Field(description="predicted class, one of Benign, Early, Pre, Pro")
    probabilities: dict[str, float]
    confidence: float
    needs_review: bool
    review_reasons: list[str]
    review_threshold: float
    cell_count: int = Field(description="cells split by watershed on the predicted mask")
    cells: list[CellBox]
    qc: dict
    model_version: str
    timings_ms: dict[str, float]
    filename: str | None = None
    images: FieldImages | None = None


class Problem(BaseModel):
    """Error body: a machine-readable code and a sentence for people."""

    code: str
    detail: str


class Health(BaseModel):
    status: str
    model_version: str | None = None
    triton: str | None = None
    max_upload_bytes: int | None = Field(None, description="uploads larger than this are refused (413)")
