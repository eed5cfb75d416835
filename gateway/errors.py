"""One place that maps typed errors to HTTP responses with a code and a plain sentence."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from engine.client import TritonUnavailableError
from preprocessing import InvalidImageError

#: HTTP status per InvalidImageError code.
IMAGE_ERROR_STATUS = {
    "empty": 400,
    "truncated": 400,
    "not_an_image": 415,
    "unsupported_format": 415,
    "unsupported_mode": 415,
    "too_many_pixels": 413,
    "too_small": 422,
    "bad_aspect_ratio": 422,
}


class ApiError(Exception):
    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.code, self.detail = status, code, detail


def install_error_handlers(app: FastAPI) -> None:
    def problem(request: Request, status: int, code: str, detail: str) -> JSONResponse:
        state = getattr(request.app.state, "gateway", None)
        if state is not None:
            state.metrics.requests.labels(code).inc()
        return JSONResponse({"code": code, "detail": detail}, status_code=status)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> JSONResponse:
        return problem(request, error.status, error.code, error.detail)

    @app.exception_handler(InvalidImageError)
    async def invalid_image(request: Request, error: InvalidImageError) -> JSONResponse:
        return problem(request, IMAGE_ERROR_STATUS.get(error.code, 400), error.code, error.message)

    @app.exception_handler(TritonUnavailableError)
    async def triton_down(request: Request, error: TritonUnavailableError) -> JSONResponse:
        return problem(request, 503, "inference_unavailable", f"the inference server is not available: {error}")
