"""``/v1/jobs``: batch jobs for the web page; upload fields, follow the queue, read the reports.

A job is a folder under ``settings.batch_jobs_dir`` with a batch ledger in it, so runs started from the
command line into that folder (``hybridcn batch ... --out $HYBRIDCN_BATCH_JOBS_DIR/NAME``) are listed
too: the ledger is the source of truth. Jobs submitted here wait in the folder's
:class:`~gateway.jobs_executor.JobQueue` (shared by every gateway process on the folder) and run one at
a time, through the same runner as ``hybridcn batch``, against the gateway's Triton.
"""

from __future__ import annotations

import logging
import mimetypes
import re
import secrets
import shutil
import sqlite3
from datetime import datetime, timezone
from pathlib import Path
from typing import BinaryIO

import anyio
from fastapi import APIRouter, File, Form, Request, Response, UploadFile
from fastapi.responses import FileResponse

from batch.html import INDEX_HTML
from batch.inputs import FIELD_SUFFIXES, OPENSLIDE_SUFFIXES
from batch.ledger import DONE, FAILED, LEDGER_FILE, PENDING, SKIPPED, LedgerError, SQLiteLedger
from batch.progress import LogProgress
from batch.runner import BatchOptions, run_batch, run_in_progress
from batch.summary import summarize_slides
from gateway.dependencies import State
from gateway.errors import ApiError
from gateway.jobs_executor import JobQueue
from gateway.report_links import make_token, token_valid
from gateway.schemas import JobDetail, JobList, JobSummary, Problem
from preprocessing.scale import PIXEL_SIZE_RANGE_UM

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])
logger = logging.getLogger("hybridcn.jobs")

_JOB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_SLIDE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._-]{0,99}$")
_HIDDEN = (LEDGER_FILE, ".")
DEFAULT_SLIDE_ID = "upload"
_REPORT_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


def _jobs_dir(state) -> Path:
    return Path(state.settings.batch_jobs_dir)


def _job_dir(state, job_id: str) -> Path:
    path = _jobs_dir(state) / job_id
    if not _JOB_ID.match(job_id) or not (path / LEDGER_FILE).is_file():
        raise ApiError(404, "no_such_job", f"no batch job {job_id!r}")
    return path


def _file_url(state, job_id: str, relative: str) -> str:
    """A report file's URL: with API keys on, a signed link a browser tab can open without one."""
    keys = state.settings.api_keys
    if keys:
        return f"/v1/jobs/{job_id}/shared/{make_token(keys, job_id)}/{relative}"
    return f"/v1/jobs/{job_id}/files/{relative}"


def _status(job_dir: Path, meta: dict[str, str], counts: dict[str, int]) -> tuple[str, str | None]:
    state = meta.get("run_state", "")
    if run_in_progress(job_dir):
        return "running", None
    if JobQueue.queued(job_dir):  # waiting its turn, or between a dead gateway's run and the next one's
        return "running", "queued"
    if state == "done" and counts[FAILED] and not counts[DONE]:
        return "failed", f"every field failed ({counts[FAILED]}); the reasons are in results.csv"
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
            summaries = summarize_slides(ledger.iter_rows(), state.model.classes) if slides else []
    except (LedgerError, sqlite3.Error) as error:  # e.g. a ledger that a starting run is creating right now
        raise ApiError(503, "unreadable_job", f"batch job {job_id!r} cannot be read now: {error}") from error
    status, detail = _status(job_dir, meta, counts)
    summary = dict(
        id=job_id, created=meta.get("created"), status=status, detail=detail, model_version=meta.get("model_version"),
        total=counts[DONE] + counts[FAILED] + counts[PENDING], done=counts[DONE], failed=counts[FAILED],
        pending=counts[PENDING], background_skipped=counts[SKIPPED],
        report=_file_url(state, job_id, INDEX_HTML) if (job_dir / INDEX_HTML).is_file() else None,
    )
    if not slides:
        return JobSummary(**summary)
    slides_now = [s.model_copy(update={"report": _file_url(state, job_id, s.report) if (job_dir / s.report).is_file()
                                       else None}) for s in summaries]
    return JobDetail(**summary, slides=slides_now)


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


def _create_job(state, job_id: str, uploads: list[tuple[str, BinaryIO]], slide_id: str, tile: bool,
                pixel_size_um: float | None = None) -> Path:
    job_dir = _jobs_dir(state) / job_id
    inputs = job_dir / "inputs" / slide_id
    try:
        inputs.mkdir(parents=True)
        for name, source in uploads:
            _save_upload(source, inputs / name, state.settings.max_upload_bytes)
        with SQLiteLedger(job_dir / LEDGER_FILE) as ledger:
            ledger.bind_model(state.model.model_version)
            ledger.set_meta(run_state="queued", origin="api", slide_id=slide_id, tile="always" if tile else "auto",
                            **({} if pixel_size_um is None else {"pixel_size_um": repr(pixel_size_um)}))
    except BaseException:
        shutil.rmtree(job_dir, ignore_errors=True)
        raise
    return job_dir


def run_job(state, job_dir: Path) -> None:
    """Run a queued job through ``hybridcn batch``'s runner on the gateway's Triton (the job queue's thread)."""
    with SQLiteLedger(job_dir / LEDGER_FILE, readonly=True) as ledger:
        meta = ledger.get_meta()
    pixel_size = meta.get("pixel_size_um")
    options = BatchOptions(out_dir=job_dir, repository=Path(state.settings.repository),
                           triton_urls=(state.client.url,), tile=meta.get("tile", "auto"),
                           pixel_size_um=None if pixel_size is None else float(pixel_size),
                           request_timeout_s=max(60.0, state.settings.triton_timeout_s))
    progress = LogProgress(lambda text: logger.info("job %s: %s", job_dir.name, text), every_s=10.0)
    try:
        summary = run_batch([job_dir / "inputs"], options, progress=progress)
        logger.info("job %s: finished: %s", job_dir.name, summary.counts)
    except Exception as error:
        give_up_job(job_dir, str(error))
        raise


def give_up_job(job_dir: Path, reason: str) -> None:
    """Record a job's failure in its ledger (errors before the run took the folder leave it 'queued')."""
    try:
        with SQLiteLedger(job_dir / LEDGER_FILE) as ledger:
            if ledger.get_meta().get("run_state") != "failed":
                ledger.set_meta(run_state="failed", run_error=reason)
    except Exception:
        logger.exception("job %s: cannot record its failure", job_dir.name)


@router.post("", status_code=202, response_model=JobSummary,
             responses={code: {"model": Problem} for code in (400, 403, 408, 413, 415)})
async def create_job(
    request: Request,
    response: Response,
    state: State,
    files: list[UploadFile] = File(description="field images (or slide images with tile=true)"),
    slide_id: str | None = Form(None, description="slide the files belong to (default 'upload')"),
    tile: bool = Form(False, description="cut every file into model-size tiles (whole-slide images)"),
    pixel_size_um: float | None = Form(
        None, ge=PIXEL_SIZE_RANGE_UM[0], le=PIXEL_SIZE_RANGE_UM[1],
        description="um per pixel of the files: fields are fitted, and slides tiled, at the training scale "
                    "(default: measured from each field's red cells)"),
):
    """Start a batch job on uploaded fields of one slide; poll ``GET /v1/jobs/{id}`` for its progress."""
    slide = (slide_id or DEFAULT_SLIDE_ID).strip()
    if not _SLIDE_ID.match(slide):
        raise ApiError(400, "bad_slide_id", f"slide_id {slide_id!r} must be 1-100 letters, digits, spaces, '.', "
                       "'_' or '-', starting with a letter or digit")
    if len(files) > state.settings.max_job_files:
        raise ApiError(413, "too_many_files", f"{len(files)} files in one job; at most {state.settings.max_job_files}")
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
        _create_job, state, job_id, [(name, upload.file) for name, upload in zip(names, files, strict=True)], slide,
        tile, pixel_size_um)
    state.jobs.enqueue(job_dir)
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
    return _job_file(state, job_id, path)


@router.get("/{job_id}/shared/{token}/{path:path}", response_class=FileResponse,
            responses={code: {"model": Problem} for code in (403, 404)})
def get_shared_job_file(job_id: str, token: str, path: str, state: State) -> FileResponse:
    """A report file through a signed, expiring link (what the jobs API hands out when API keys are on)."""
    if not token_valid(state.settings.api_keys, job_id, token):
        raise ApiError(403, "bad_link", "this report link is not valid (expired, or the API keys changed); "
                       "open the report again from the jobs list")
    return _job_file(state, job_id, path)


def _job_file(state, job_id: str, path: str) -> FileResponse:
    base = _job_dir(state, job_id).resolve()
    try:
        target = (base / path).resolve()
        found = target.is_relative_to(base) and target.is_file()
    except OSError:  # a name the file system refuses (too long, invalid): no such file either
        found = False
    if not found or any(part.startswith(_HIDDEN) for part in target.relative_to(base).parts):
        raise ApiError(404, "no_such_file", f"job {job_id!r} has no file {path[:200]!r}")
    media_type = mimetypes.guess_type(target.name)[0] or "application/octet-stream"
    headers = {"Content-Security-Policy": _REPORT_CSP} if media_type == "text/html" else {}
    return FileResponse(target, media_type=media_type, headers=headers)
