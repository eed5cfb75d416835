"""Response schemas of the gateway's own resources; field and slide results are the shared contracts."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from hybridcn.contracts import FieldResult, SlideSummary

__all__ = ["FieldResult", "Health", "JobDetail", "JobList", "JobSummary", "ModelInfo", "Problem", "SlideSummary"]


class Problem(BaseModel):
    """Error body: a machine-readable code and a sentence for people."""

    code: str
    detail: str


#: What the request guard or validation can answer on any API route (keys, origin, body deadline and
#: size, validation, rate limit, admission control), declared so clients and schema checks know them.
GUARD_RESPONSES: dict[int | str, dict] = {code: {"model": Problem} for code in (401, 403, 408, 413, 422, 429, 503)}


class Health(BaseModel):
    status: str
    model_version: str | None = None
    triton: str | None = None
    max_upload_bytes: int | None = Field(None, description="uploads larger than this are refused (413)")
    triton_state: str | None = Field(None, description="ready, unavailable, restarting, or failed (no recovery)")
    models: dict[str, bool] | None = Field(None, description="readiness of each model in the repository")
    endpoints: dict[str, str] | None = Field(None, description="where each endpoint listens (gateway, Triton gRPC, "
                                             "Triton HTTP, Triton metrics)")


class ModelInfo(BaseModel):
    """What the served model's manifest says about it: the page reads its class names from here."""

    model_config = ConfigDict(protected_namespaces=())

    model_version: str
    classes: list[str] = Field(description="class order of every probability vector")
    class_descriptions: dict[str, str]
    image_size: int = Field(description="side of the square field the networks see")
    field_size: int = Field(description="side of a field in scanner pixels (slides are tiled at this size)")
    review_threshold: float
    review_target_precision: float | None = None
    preprocessing: list[str]
    pixel_size_um: float | None = Field(None, description="um per field pixel of the training fields (from their "
                                        "red cells); fields are fitted to it (null: the model has no scale check)")


class JobSummary(BaseModel):
    """A batch job: its state and field counts (``total`` leaves out background tiles)."""

    id: str
    created: str | None = Field(None, description="ISO 8601 UTC time the job's ledger was created")
    status: Literal["running", "done", "failed"]
    detail: str | None = Field(None, description="'queued', or why a job failed or stopped")
    model_version: str | None = None
    total: int
    done: int
    failed: int
    pending: int
    background_skipped: int
    report: str | None = Field(None, description="URL of the job's index.html once written")


class JobDetail(JobSummary):
    slides: list[SlideSummary] = Field(description="computed live from the ledger (so they move while a job runs)")


class JobList(BaseModel):
    jobs: list[JobSummary]
