"""``/v1/jobs``: batch jobs for the web page; upload fields, follow the queue, read the reports.

A job is a folder under ``settings.batch_jobs_dir`` with a batch ledger in it, so runs started from the
command line into that folder (``hybridcn batch ... --out $HYBRIDCN_BATCH_JOBS_DIR/NAME``) are listed
too: the ledger is the source of truth. Jobs submitted here run one at a time in a background thread
of the gateway, through the same runner as ``hybridcn batch``, against the gateway's Triton.
"""

from __future__ import annotations

import logging
import mimetypes
import queue
import re
import secrets
import shutil
import sqlite3
import threading
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import BinaryIO, Literal

import anyio
from fastapi import APIRouter, File, Form, Request, Response, UploadFile
from fastapi.responses import FileResponse
from pydantic import BaseModel, Field

from batch.inputs import FIELD_SUFFIXES, OPENSLIDE_SUFFIXES
from batch.ledger import DONE, FAILED, LEDGER_FILE, PENDING, SKIPPED, LedgerError, SQLiteLedger
from batch.progress import LogProgress
from batch.reports import INDEX_HTML, summarize_slides
from batch.runner import BatchOptions, run_batch, run_in_progress
from gateway.dependencies import State
from gateway.errors import ApiError
from gateway.schemas import Problem

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])
logger = logging.getLogger("hybridcn.jobs")

_JOB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_SLIDE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._-]{0,99}$")
_HIDDEN = (LEDGER_FILE, ".")
DEFAULT_SLIDE_ID = "upload"
_REPORT_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


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


class SlideResult(BaseModel):
    """One slide of a job, computed live from the ledger (so it moves while the job runs)."""

    slide_id: str
    fields: int
    done: int
    failed: int
    pending: int
    background_skipped: int
    class_counts: dict[str, int]
    verdict: str | None = Field(None, description="class with the highest confidence-weighted score")
    verdict_scores: dict[str, float] = Field(description="sum(conf*p)/sum(conf) over the slide's fields")
    verdict_confidence: float | None = None
    malignant_score: float | None = Field(None, description="Early + Pre + Pro scores")
    review_fields: int
    review_share: float | None = None
    estimated_blast_cells: int = Field(description="cell counts of the fields predicted Early, Pre or Pro")
    cells_total: int
    report: str | None = Field(None, description="URL of the slide's HTML report once written")


class JobDetail(JobSummary):
    slides: list[SlideResult]


class JobList(BaseModel):
    jobs: list[JobSummary]


class _JobQueue:
    """One background thread runs submitted jobs in order (a batch run already uses every core)."""

    def __init__(self) -> None:
        self._queue: queue.Queue[tuple[str, Callable[[], None]]] = queue.Queue()
        self._active: set[str] = set()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def submit(self, job_id: str, work: Callable[[], None]) -> None:
        with self._lock:
            self._active.add(job_id)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="batch-jobs", daemon=True)
                self._thread.start()
        self._queue.put((job_id, work))

    def active(self, job_id: str) -> bool:
        with self._lock:
            return job_id in self._active

    def _loop(self) -> None:
        while True:
            job_id, work = self._queue.get()
            try:
                work()
            except Exception:
                logger.exception("batch job %s failed", job_id)
            finally:
                with self._lock:
                    self._active.discard(job_id)


_JOBS = _JobQueue()


def _jobs_dir(state) -> Path:
    return Path(state.settings.batch_jobs_dir)


def _job_dir(state, job_id: str) -> Path:
    path = _jobs_dir(state) / job_id
    if not _JOB_ID.match(job_id) or not (path / LEDGER_FILE).is_file():
        raise ApiError(404, "no_such_job", f"no batch job {job_id!r}")
    return path


def _file_url(job_id: str, relative: str) -> str:
    return f"/v1/jobs/{job_id}/files/{relative}"


def _status(job_id: str, job_dir: Path, meta: dict[str, str]) -> tuple[str, str | None]:
    state = meta.get("run_state", "")
    if run_in_progress(job_dir) or _JOBS.active(job_id):
        return "running", "queued" if state == "queued" else None
    if state == "done":
        return "done", None
    if state == "failed":
        return "failed", meta.get("run_error") or "the run failed"
    return "failed", ("interrupted: the run stopped before finishing; run `hybridcn batch` with the same inputs "
                      f"and --out {job_dir} to finish it")


def _read_job(state, job_id: str, job_dir: Path, *, slides: bool) -> JobSummary | JobDetail:
    try:
        with SQLiteLedger(job_dir / LEDGER_FILE, readonly=True) as ledger:
            meta, counts = ledger.get_meta(), ledger.counts()
            rows = ledger.rows() if slides else []
    except (LedgerError, sqlite3.Error) as error:  # e.g. a ledger that a starting run is creating right now
        raise ApiError(503, "unreadable_job", f"batch job {job_id!r} cannot be read now: {error}") from error
    status, detail = _status(job_id, job_dir, meta)
    summary = dict(
        id=job_id, created=meta.get("created"), status=status, detail=detail, model_version=meta.get("model_version"),
        total=counts[DONE] + counts[FAILED] + counts[PENDING], done=counts[DONE], failed=counts[FAILED],
        pending=counts[PENDING], background_skipped=counts[SKIPPED],
        report=_file_url(job_id, INDEX_HTML) if (job_dir / INDEX_HTML).is_file() else None,
    )
    if not slides:
        return JobSummary(**summary)
    results = []
    for s in summarize_slides(rows, state.model.classes):
        values = s.to_dict()
        values["report"] = _file_url(job_id, s.report) if (job_dir / s.report).is_file() else None
        results.append(SlideResult(**values))
    return JobDetail(**summary, slides=results)


def _safe_filename(name: str | None, index: int) -> str:
    base = Path((name or "").replace("\\", "/")).name
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", base).lstrip(".")
    return base or f"field-{index}"


def _save_upload(source: BinaryIO, target: Path, limit: int) -> None:
    written = 0
    with open(target, "wb") as handle:
        while chunk := source.read(1 << 20):
            written += len(chunk)
            if written > limit:
                raise ApiError(413, "too_large", f"{target.name} is over the {limit}-byte upload limit")
            handle.write(chunk)
    if written == 0:
        raise ApiError(400, "empty", f"{target.name} is empty (0 bytes)")


def _create_job(state, job_id: str, uploads: list[tuple[str, BinaryIO]], slide_id: str) -> Path:
    job_dir = _jobs_dir(state) / job_id
    inputs = job_dir / "inputs" / slide_id
    try:
        inputs.mkdir(parents=True)
        for name, source in uploads:
            _save_upload(source, inputs / name, state.settings.max_upload_bytes)
        with SQLiteLedger(job_dir / LEDGER_FILE) as ledger:
            ledger.bind_model(state.model.model_version)
            ledger.set_meta(run_state="queued", origin="api", slide_id=slide_id)
    except BaseException:
        shutil.rmtree(job_dir, ignore_errors=True)
        raise
    return job_dir


def _run_job(job_dir: Path, options: BatchOptions) -> None:
    progress = LogProgress(lambda text: logger.info("job %s: %s", job_dir.name, text), every_s=10.0)
    try:
        summary = run_batch([job_dir / "inputs"], options, progress=progress)
        logger.info("job %s: finished: %s", job_dir.name, summary.counts)
    except Exception as error:
        try:  # errors before the run took the folder (bad inputs) leave the ledger at "queued"
            with SQLiteLedger(job_dir / LEDGER_FILE) as ledger:
                if ledger.get_meta().get("run_state") != "failed":
                    ledger.set_meta(run_state="failed", run_error=str(error))
        except Exception:
            logger.exception("job %s: cannot record its failure", job_dir.name)
        raise


@router.post("", status_code=202, response_model=JobSummary,
             responses={code: {"model": Problem} for code in (400, 413, 415)})
async def create_job(
    request: Request,
    response: Response,
    state: State,
    files: list[UploadFile] = File(description="field images (or slide images with tile=true)"),
    slide_id: str | None = Form(None, description="slide the files belong to (default 'upload')"),
    tile: bool = Form(False, description="cut every file into model-size tiles (whole-slide images)"),
):
    """Start a batch job on uploaded fields of one slide; poll ``GET /v1/jobs/{id}`` for its progress."""
    slide = (slide_id or DEFAULT_SLIDE_ID).strip()
    if not _SLIDE_ID.match(slide):
        raise ApiError(400, "bad_slide_id", f"slide_id {slide_id!r} must be 1-100 letters, digits, spaces, '.', "
                       "'_' or '-', starting with a letter or digit")
    accepted = FIELD_SUFFIXES + OPENSLIDE_SUFFIXES
    names: list[str] = []
    for index, upload in enumerate(files, start=1):
        name = _safe_filename(upload.filename, index)
        if Path(name).suffix.lower() not in accepted:
            raise ApiError(415, "unsupported_format", f"{upload.filename!r}: send image files ({', '.join(accepted)})")
        while name in names:
            name = f"{index}-{name}"
        names.append(name)
    job_id = f"{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"
    job_dir = await anyio.to_thread.run_sync(
        _create_job, state, job_id, [(name, upload.file) for name, upload in zip(names, files, strict=True)], slide)
    options = BatchOptions(out_dir=job_dir, repository=Path(state.settings.repository),
                           triton_urls=(request.app.state.gateway.client.url,), tile="always" if tile else "auto",
                           request_timeout_s=max(60.0, state.settings.triton_timeout_s))
    _JOBS.submit(job_id, lambda: _run_job(job_dir, options))
    logger.info("job %s: %d files of slide %r queued", job_id, len(names), slide)
    response.headers["Location"] = f"/v1/jobs/{job_id}"
    return _read_job(state, job_id, job_dir, slides=False)


@router.get("", response_model=JobList)
def list_jobs(state: State) -> JobList:
    """Every job under the jobs folder (API and command-line runs), newest first."""
    root = _jobs_dir(state)
    jobs = []
    if root.is_dir():
        for path in root.iterdir():
            if _JOB_ID.match(path.name) and (path / LEDGER_FILE).is_file():
                try:
                    jobs.append(_read_job(state, path.name, path, slides=False))
                except ApiError:
                    logger.warning("skipping unreadable job folder %s", path)
    jobs.sort(key=lambda job: (job.created or "", job.id), reverse=True)
    return JobList(jobs=jobs)


@router.get("/{job_id}", response_model=JobDetail, responses={code: {"model": Problem} for code in (404, 503)})
def get_job(job_id: str, state: State) -> JobDetail:
    """One job: status, counts and a live summary per slide (verdict, classes, review share, blasts)."""
    return _read_job(state, job_id, _job_dir(state, job_id), slides=True)


@router.get("/{job_id}/files/{path:path}", response_class=FileResponse, responses={404: {"model": Problem}})
def get_job_file(job_id: str, path: str, state: State) -> FileResponse:
    """A file of the job's folder: ``index.html``, ``slides/<slide>.html``, ``results.csv``, ``slides.json``."""
    base = _job_dir(state, job_id).resolve()
    target = (base / path).resolve()
    if (not target.is_relative_to(base) or not target.is_file()
            or any(part.startswith(_HIDDEN) for part in target.relative_to(base).parts)):
        raise ApiError(404, "no_such_file", f"job {job_id!r} has no file {path!r}")
    media_type = mimetypes.guess_type(target.name)[0] or "application/octet-stream"
    headers = {"Content-Security-Policy": _REPORT_CSP} if media_type == "text/html" else {}
    return FileResponse(target, media_type=media_type, headers=headers)
