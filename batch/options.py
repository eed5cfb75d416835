"""What a batch run is asked to do, validated once (the CLI, the jobs API and tests build it)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from batch.inputs import TILE_MODES, default_max_slide_pixels
from batch.ledger import DEFAULT_LEASE_S
from batch.summary import GALLERY_SIZE
from hybridcn.config import default_repository


@dataclass(frozen=True)
class BatchOptions:
    out_dir: Path
    repository: Path = field(default_factory=default_repository)
    triton_urls: tuple[str, ...] = ()
    batch_size: int = 8
    inflight: int = 4
    workers: int = 0  # 0 = one per core
    # ONNX Runtime threads per stage of the embedded server a run starts itself: one thread each lets
    # segmentation and features run side by side on the cores, which beats ORT's per-stage thread pools
    # under a full queue (see bench/bench_batch.py). 0 = ORT's default.
    ort_threads: int = 1
    retry_failed: bool = False
    attempts: int = 3
    backoff_s: float = 0.5
    tile: str = "auto"
    tile_size: int = 0  # 0 = the model's field size
    # Slides over this many pixels are refused at discovery (default: HYBRIDCN_MAX_SLIDE_PIXELS, else 4 Gpx).
    max_slide_pixels: int = field(default_factory=default_max_slide_pixels)
    pixel_size_um: float | None = None  # of inputs whose manifest row gives none (None: measured per field)
    gallery_size: int = GALLERY_SIZE
    triton_ready_timeout_s: float = 30.0
    request_timeout_s: float = 120.0
    #: After a failed request, how long to wait for the endpoint to be ready again before the next attempt
    #: (a supervised Triton restarts within this), so a restart costs time, not failed fields.
    restart_grace_s: float = 30.0
    #: The queue: ``None`` is ``OUT/ledger.sqlite`` (one worker); a ``postgresql://`` URL is a queue shared by
    #: every worker given it, on any machine.
    ledger: str | None = None
    #: A worker that stops renewing (killed, cut off) loses its claimed fields this long after its last heartbeat.
    lease_s: float = DEFAULT_LEASE_S
    #: Fields claimed per ledger transaction (0: enough to keep the pipeline fed, 2 x inflight x batch_size).
    claim_block: int = 0
    #: This worker's name in the ledger (default: host, pid and a random suffix).
    worker_id: str | None = None

    def __post_init__(self) -> None:
        for name in ("batch_size", "inflight", "attempts"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("workers", "ort_threads", "claim_block"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.tile_size and self.tile_size < 16:
            raise ValueError(f"tile_size must be 0 (the model's size) or >= 16, got {self.tile_size}")
        if self.tile not in TILE_MODES:
            raise ValueError(f"tile must be one of {', '.join(TILE_MODES)}, got {self.tile!r}")
        if self.lease_s < 3:
            raise ValueError(f"lease_s must be at least 3 s (heartbeats come every third of it), got {self.lease_s}")
        if self.max_slide_pixels <= 0:
            raise ValueError(f"max_slide_pixels must be positive, got {self.max_slide_pixels}")


def default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
