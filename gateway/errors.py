"""One place that maps typed errors to HTTP responses with a code and a plain sentence."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

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
    "too_large_decoded": 413,
    "too_small": 422,
    "bad_aspect_ratio": 422,
}


#: ``code`` of the errors the framework raises (routing, methods, malformed bodies).
HTTP_CODES = {400: "bad_request", 404: "not_found", 405: "method_not_allowed", 413: "too_large",
              415: "unsupported_media_type"}


class ApiError(Exception):
    def __init__(self, status: int, code: str, detail: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status, self.code, self.detail, self.headers = status, code, detail, headers


def install_error_handlers(app: FastAPI) -> None:
    def problem(request: Request, status: int, code: str, detail: str,
                headers: dict[str, str] | None = None) -> JSONResponse:
        state = getattr(request.app.state, "gateway", None)
        if state is not None:
            state.metrics.requests.labels(code).inc()
        return JSONResponse({"code": code, "detail": detail}, status_code=status, headers=headers)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> JSONResponse:
        return problem(request, error.status, error.code, error.detail, error.headers)

    @app.exception_handler(InvalidImageError)
    async def invalid_image(request: Request, error: InvalidImageError) -> JSONResponse:
        return problem(request, IMAGE_ERROR_STATUS.get(error.code, 400), error.code, error.message)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        response = problem(request, error.status_code, HTTP_CODES.get(error.status_code, f"http_{error.status_code}"),
                           str(error.detail))
        response.headers.update(error.headers or {})
        return response

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
        where = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', '')}" for e in error.errors())
        return problem(request, 422, "invalid_request", where or "the request does not match the API")

    @app.exception_handler(TritonUnavailableError)
    async def triton_down(request: Request, error: TritonUnavailableError) -> JSONResponse:
        return problem(request, 503, "inference_unavailable", f"the inference server is not available: {error}")
