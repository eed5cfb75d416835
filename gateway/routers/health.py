"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gateway.dependencies import State
from gateway.schemas import Health

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health, responses={503: {"model": Health}})
async def get_health(state: State):
    """Liveness: the gateway answers, and its Triton is working or being recovered (503 once recovery failed)."""
    alive = state.supervisor.alive
    body = Health(status="ok" if alive else "failed", model_version=state.model.model_version,
                  triton=state.supervisor.state)
    return JSONResponse(body.model_dump(), status_code=200 if alive else 503)


@router.get("/readyz", response_model=Health, responses={503: {"model": Health}})
async def get_readiness(state: State, request: Request):
    """Readiness: every model answers (the supervisor's last probe), per model in ``models``."""
    supervisor = state.supervisor
    ready = supervisor.state == "ready" and await state.client.ready()
    state.metrics.triton_ready.set(1 if ready else 0)
    endpoints = {"gateway": f"{request.url.scheme}://{request.url.netloc}",
                 **getattr(request.app.state, "endpoints", {})}
    body = Health(status="ready" if ready else "not ready", model_version=state.model.model_version,
                  triton=state.client.url, max_upload_bytes=state.settings.max_upload_bytes, endpoints=endpoints,
                  triton_state=supervisor.state, models=supervisor.model_ready)
    return JSONResponse(body.model_dump(), status_code=200 if ready else 503)


@router.get("/metrics", response_class=Response)
async def get_metrics(state: State) -> Response:
    """Prometheus text exposition of the gateway's counters and latency histograms."""
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
