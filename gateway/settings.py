"""Gateway settings from the environment (prefix ``HYBRIDCN_``), validated once and built lazily."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from hybridcn.config import default_repository


class GatewaySettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="HYBRIDCN_", extra="ignore")

    repository: Path = Field(default_factory=default_repository,
                             description="Triton model repository written by `hybridcn export`")
    triton_url: str | None = Field(None, description="HOST:PORT of Triton gRPC; unset = start the embedded server")
    triton_host: str = Field("127.0.0.1", description="address the embedded Triton binds to")
    triton_grpc_port: int = Field(0, ge=0, le=65535, description="embedded Triton's gRPC port (0 = a free one)")
    triton_http_port: int = Field(0, ge=0, le=65535, description="embedded Triton's HTTP port (0 = a free one)")
    max_upload_bytes: int = Field(40 * 1024 * 1024, gt=0)
    max_pixels: int = Field(40_000_000, gt=0, description="pixels of one field, checked from the header")
    inflight: int = Field(16, gt=0, description="concurrent Triton requests per gateway process")
    max_queue: int = Field(32, gt=0, description="classification requests in progress at once; more get 503 "
                           "`overloaded` with Retry-After (admission control)")
    max_explaining: int = Field(2, gt=0, description="`explain=true` requests computing their evidence at once (each "
                                "is about 50 classifications); more get 503 `explain_busy` with Retry-After")
    body_timeout_s: float = Field(30.0, gt=0, description="time a client has to send its whole request body")
    max_job_bytes: int = Field(1024 * 1024 * 1024, gt=0, description="largest POST /v1/jobs body (all files)")
    max_job_files: int = Field(1000, gt=0, description="most files in one POST /v1/jobs")
    api_keys: list[str] = Field(default_factory=list, description="accepted API keys (JSON list); none: open, "
                                "which `hybridcn serve` allows only on loopback")
    require_api_keys: bool = Field(False, description="refuse to start without API keys (the gateway image sets it: "
                                   "a container is reached from beyond its loopback)")
    rate_per_minute: int = Field(600, gt=0, description="requests a minute per API key")
    allowed_origins: list[str] = Field(default_factory=list, description="other sites' origins allowed to POST "
                                       "(JSON list); none by default: cross-site posts are refused")
    preprocess_threads: int = Field(0, ge=0, description="0 = one per CPU core")
    triton_timeout_s: float = Field(30.0, gt=0)
    triton_ready_timeout_s: float = Field(120.0, gt=0)
    supervise_interval_s: float = Field(2.0, gt=0, description="seconds between the supervisor's Triton probes")
    review_threshold: float | None = Field(None, ge=0, le=1, description="override the calibrated threshold")
    batch_jobs_dir: Path = Field(Path("batch-jobs"), description="where jobs submitted from the web page write")


@lru_cache(maxsize=1)
def get_settings() -> GatewaySettings:
    return GatewaySettings()
