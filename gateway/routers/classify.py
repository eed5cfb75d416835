"""``POST /v1/classify``: one field in (multipart ``file`` or raw body), its diagnosis out."""

from __future__ import annotations

import asyncio
import time

import anyio
import numpy as np
from fastapi import APIRouter, Query, Request

from engine.field import interpret, prepare_bytes
from engine.occlusion import plan_occlusion
from engine.overlays import field_images
from export.repository import MAX_BATCH
from gateway.dependencies import State
from gateway.errors import ApiError
from gateway.schemas import FieldResult, ModelInfo, Problem
from preprocessing.scale import PIXEL_SIZE_RANGE_UM

router = APIRouter(prefix="/v1", tags=["classify"])


async def _read_upload(request: Request, limit: int) -> tuple[bytes, str | None]:
    """One field's bytes and file name; the body's size and read time are bounded by ``gateway.guard``."""
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        form = await request.form(max_files=16, max_part_size=limit)
        uploads = [value for _, value in form.multi_items() if not isinstance(value, str)]
        if not uploads:
            raise ApiError(400, "no_file", "multipart body has no 'file' part")
        if len(uploads) > 1:
            raise ApiError(422, "too_many_files", f"send one field image per request ({len(uploads)} files sent); "
                           "use POST /v1/jobs for several")
        upload = uploads[0]
        data = await upload.read()
        filename = upload.filename
    else:
        data = await request.body()
        filename = request.headers.get("x-filename")
    if len(data) > limit:
        raise ApiError(413, "too_large", f"upload of {len(data)} bytes is over the {limit}-byte limit")
    return data, filename


@router.post(
    "/classify",
    response_model=FieldResult,
    response_model_exclude_none=True,
    responses={code: {"model": Problem} for code in (400, 413, 415, 422, 503)},
)
async def classify_field(
    request: Request,
    state: State,
    images: bool = Query(False, description="include PNG data URLs of the field, mask and attention"),
    explain: bool = Query(False, description="also compute the occlusion evidence map (implies `images`): 49 more "
                          "runs of the model, about 50 times the cost of the call"),
    pixel_size_um: float | None = Query(
        None, ge=PIXEL_SIZE_RANGE_UM[0], le=PIXEL_SIZE_RANGE_UM[1],
        description="um per pixel of the image; fits it at the training scale (default: measured from its red "
                    "cells, and flagged when off)"),
) -> FieldResult:
    """Classify one smear field: class, four probabilities, confidence, review flag and cell count."""
    started = time.perf_counter()
    data, filename = await _read_upload(request, state.settings.max_upload_bytes)
    prepared = await anyio.to_thread.run_sync(lambda: prepare_bytes(data, state.model, pixel_size_um=pixel_size_um),
                                              limiter=state.cpu_limiter)
    infer_start = time.perf_counter()
    output = await state.client.infer(prepared.preprocessed[None])
    infer_ms = round((time.perf_counter() - infer_start) * 1000, 2)
    result = await anyio.to_thread.run_sync(
        lambda: interpret(prepared, output, state.model, {"triton": infer_ms}), limiter=state.cpu_limiter
    )
    result.filename = filename
    evidence = None
    if explain:
        explain_start = time.perf_counter()
        limiter = state.explain_limiter
        if limiter.available_tokens < 1:  # each map is ~50 classifications: refuse at once rather than queue
            raise ApiError(503, "explain_busy", f"{int(limiter.total_tokens)} evidence maps are being computed; retry "
                           "shortly, or classify without explain=true", headers={"Retry-After": "2"})
        async with limiter:
            plan = await anyio.to_thread.run_sync(lambda: plan_occlusion(prepared.preprocessed),
                                                  limiter=state.cpu_limiter)
            parts = await asyncio.gather(*(state.client.infer(part) for part in plan.batches(MAX_BATCH)))
        evidence = plan.evidence(output.probabilities[0], np.concatenate([part.probabilities for part in parts]))
        result.timings_ms["explain"] = round((time.perf_counter() - explain_start) * 1000, 2)
    if images or explain:
        result.images = await anyio.to_thread.run_sync(
            lambda: field_images(prepared.display, prepared.preprocessed, output.mask[0], output.attention[0],
                                 result.cells, steps=state.model.preprocess.steps(), evidence=evidence),
            limiter=state.cpu_limiter,
        )
    result.timings_ms["total"] = round((time.perf_counter() - started) * 1000, 2)
    metrics = state.metrics
    metrics.requests.labels("ok").inc()
    metrics.fields.labels(result.label).inc()
    if result.needs_review:
        metrics.reviews.inc()
    for stage, ms in result.timings_ms.items():
        metrics.stage_seconds.labels(stage).observe(ms / 1000.0)
    return result


@router.get("/model", response_model=ModelInfo)
async def get_model(state: State) -> ModelInfo:
    """The served model's facts from its manifest: version, class order and names, sizes, review threshold."""
    model = state.model
    manifest = model.manifest
    return ModelInfo(model_version=model.model_version, classes=list(model.classes),
                     class_descriptions={c: manifest.class_descriptions.get(c, c) for c in model.classes},
                     image_size=model.image_size, field_size=model.field_size,
                     review_threshold=model.review_threshold,
                     review_target_precision=manifest.review_target_precision,
                     preprocessing=model.preprocess.steps(),
                     pixel_size_um=None if manifest.ood is None else manifest.ood.pixel_size_um)
