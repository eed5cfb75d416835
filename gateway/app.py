"""The FastAPI gateway: CPU preprocessing in front of Triton, the web page at ``/``."""

from __future__ import annotations

import asyncio
import logging
import os
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path

import anyio
from fastapi import FastAPI, Response
from fastapi.staticfiles import StaticFiles
from starlette.routing import Match, Mount

from engine.client import AsyncTritonClient
from engine.model import ServedModel
from engine.overlays import encode_png
from engine.triton_server import EmbeddedTriton
from gateway.dependencies import GatewayState
from gateway.errors import install_error_handlers
from gateway.guard import GuardLimits, RequestGuard
from gateway.jobs_executor import JobQueue
from gateway.metrics import GatewayMetrics
from gateway.routers import classify, health, jobs
from gateway.schemas import GUARD_RESPONSES
from gateway.settings import GatewaySettings, get_settings
from gateway.supervisor import TritonSupervisor
from hybridcn.synth import synth_field

STATIC_DIR = Path(__file__).resolve().parent / "static"
logger = logging.getLogger("hybridcn.gateway")


def create_app(settings: GatewaySettings | None = None) -> FastAPI:
    """Build the app; on startup it connects to ``settings.triton_url`` or starts the embedded Triton."""
    settings = settings or get_settings()
    if settings.require_api_keys and not settings.api_keys:
        raise ValueError("HYBRIDCN_REQUIRE_API_KEYS is set but HYBRIDCN_API_KEYS is empty: set it to a JSON list of "
                         "keys (in Kubernetes from the gateway Secret, in compose from the environment)")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        model = ServedModel.from_repository(settings.repository, review_threshold=settings.review_threshold)
        # the gateway's own pixel limit (HYBRIDCN_MAX_PIXELS) is checked from the header before decoding
        model = replace(model, preprocess=replace(model.preprocess, max_pixels=settings.max_pixels))
        server = None
        url = settings.triton_url
        if url is None:
            server = EmbeddedTriton(settings.repository, host=settings.triton_host,
                                    grpc_port=settings.triton_grpc_port, http_port=settings.triton_http_port,
                                    ready_timeout=settings.triton_ready_timeout_s)
            await anyio.to_thread.run_sync(server.start)
            url = server.grpc_url
            logger.info("embedded Triton ready: gRPC %s, HTTP %s, metrics %s", server.grpc_url, server.http_url,
                        f"{server.host}:{server.metrics_port}")
        client = AsyncTritonClient(url, inflight=settings.inflight, timeout_s=settings.triton_timeout_s)
        threads = settings.preprocess_threads or (os.cpu_count() or 1)
        queue = JobQueue(settings.batch_jobs_dir, run=lambda job_dir: jobs.run_job(app.state.gateway, job_dir),
                         give_up=jobs.give_up_job)
        supervisor = TritonSupervisor(client, server, TritonSupervisor.models_of(settings.repository),
                                      encode_png(synth_field(0, seed=0, size=model.image_size).image),
                                      interval_s=settings.supervise_interval_s)
        await supervisor.check()
        app.state.gateway = GatewayState(settings, model, client, GatewayMetrics(), anyio.CapacityLimiter(threads),
                                         queue, supervisor, anyio.CapacityLimiter(settings.max_explaining))
        app.state.triton_server = server
        app.state.endpoints = {"triton_grpc": url, **({"triton_http": server.http_url,
                                                       "triton_metrics": f"{server.host}:{server.metrics_port}"}
                                                      if server else {})}
        watching = asyncio.create_task(supervisor.run())
        queue.start()  # after the state it runs jobs with
        try:
            yield
        finally:
            watching.cancel()
            queue.shutdown()
            await client.close()
            if server is not None:
                await anyio.to_thread.run_sync(server.stop)

    app = FastAPI(
        title="HybridCN-NAS gateway",
        version="0.1.0",
        description="Acute lymphoblastic leukemia classification of peripheral blood smear fields "
        "(the classes are the served model's: `GET /v1/model`). Research use only; not a medical device.",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    limits = GuardLimits(classify_bytes=settings.max_upload_bytes, jobs_bytes=settings.max_job_bytes,
                         body_timeout_s=settings.body_timeout_s, max_inflight=settings.max_queue,
                         allowed_origins=tuple(settings.allowed_origins), api_keys=tuple(settings.api_keys),
                         rate_per_minute=settings.rate_per_minute)

    def rejected(code: str) -> None:
        state = getattr(app.state, "gateway", None)
        if state is not None:
            state.metrics.requests.labels(code).inc()

    app.add_middleware(RequestGuard, limits=limits, on_reject=rejected)
    app.include_router(health.router)
    app.include_router(classify.router, responses=GUARD_RESPONSES)
    app.include_router(jobs.router, responses=GUARD_RESPONSES)

    @app.options("/{path:path}", include_in_schema=False)
    async def options(path: str) -> Response:
        """The methods a path takes, in ``Allow`` (CORS preflights are not answered: no origin is allowed)."""
        api = [route for route in app.router.routes
               if not isinstance(route, Mount) and getattr(route, "name", None) != "options"]
        methods = {method for method in ("GET", "POST", "PUT", "PATCH", "DELETE") for route in api
                   if route.matches({"type": "http", "path": f"/{path}", "method": method})[0] == Match.FULL}
        if methods & {"GET"}:
            methods.add("HEAD")
        return Response(status_code=204, headers={"Allow": ", ".join(sorted((methods or {"GET", "HEAD"})
                                                                            | {"OPTIONS"}))})

    if (STATIC_DIR / "index.html").is_file():
        app.mount("/", StaticFiles(directory=STATIC_DIR, html=True), name="web")
    return app
