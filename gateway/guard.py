"""ASGI guards in front of the app: bounded request bodies, admission control, cross-site posts.

They work on the raw ASGI messages, so a limit holds while the body streams in (chunked uploads
included) and an overloaded gateway answers in microseconds instead of queueing without bound:
- bodies: a per-path byte limit counted as the body arrives (413 ``too_large`` as soon as it is
  passed) and a deadline for the whole body (408 ``body_timeout`` for a client that stalls);
- admission: at most ``max_inflight`` classification requests at once; the next gets 503
  ``overloaded`` with ``Retry-After``, so admitted requests keep their latency;
- cross-site posts: a POST whose ``Origin`` is neither this host nor a configured origin is refused
  (403 ``cross_origin``), so a page elsewhere cannot make a browser submit jobs or fields.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

import anyio

ASGIApp = Callable


class _BodyRejectedError(Exception):
    """Raised into the app when its body read must stop (too large, too slow); the guard answers instead."""


@dataclass(frozen=True)
class GuardLimits:
    """Limits by request; ``body_limit(method, path)`` is the byte limit of a body (``None``: no body read)."""

    classify_bytes: int
    jobs_bytes: int
    body_timeout_s: float
    max_inflight: int
    retry_after_s: int = 1
    allowed_origins: tuple[str, ...] = ()

    def body_limit(self, method: str, path: str) -> int | None:
        if method != "POST":
            return None
        if path.startswith("/v1/jobs"):
            return self.jobs_bytes
        return self.classify_bytes + 64 * 1024  # multipart headers and boundaries around one field


async def _problem(send, status: int, code: str, detail: str, headers: dict[str, str] | None = None) -> None:
    body = json.dumps({"code": code, "detail": detail}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


def _header(scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1")
    return None


class RequestGuard:
    """The three guards as one ASGI middleware (see the module docstring)."""

    def __init__(self, app: ASGIApp, limits: GuardLimits, *, on_reject: Callable[[str], None] | None = None) -> None:
        self.app = app
        self.limits = limits
        self.inflight = 0
        self._on_reject = on_reject or (lambda code: None)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method, path = scope["method"], scope["path"]
        if method == "POST" and not self._same_site(scope):
            self._on_reject("cross_origin")
            await _problem(send, 403, "cross_origin", "cross-site POST refused: send the request from the gateway's "
                           "own page, or configure HYBRIDCN_ALLOWED_ORIGINS")
            return
        admitted = method == "POST" and path == "/v1/classify"
        if admitted and self.inflight >= self.limits.max_inflight:
            self._on_reject("overloaded")
            await _problem(send, 503, "overloaded", f"{self.inflight} requests are in progress, the most this gateway "
                           "takes at once; retry shortly", {"Retry-After": str(self.limits.retry_after_s)})
            return
        limit = self.limits.body_limit(method, path)
        if limit is None:
            await self.app(scope, receive, send)
            return
        declared = _header(scope, b"content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            self._on_reject("too_large")
            await _problem(send, 413, "too_large", f"request body of {declared} bytes is over the {limit}-byte limit")
            return
        received, deadline = 0, time.monotonic() + self.limits.body_timeout_s
        failure: tuple[int, str, str] | None = None
        answered = False

        async def limited_receive():
            nonlocal received, failure
            try:
                with anyio.fail_after(max(deadline - time.monotonic(), 0.001)):
                    message = await receive()
            except TimeoutError:
                failure = (408, "body_timeout", f"the request body did not arrive within "
                           f"{self.limits.body_timeout_s:.0f}s")
                raise _BodyRejectedError from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    failure = (413, "too_large", f"request body is over the {limit}-byte limit")
                    raise _BodyRejectedError
            return message

        async def guarded_send(message) -> None:
            # a framework that turns the aborted read into its own error (FastAPI: 400) is overruled
            nonlocal answered
            if failure is not None:
                if not answered:
                    answered = True
                    self._on_reject(failure[1])
                    await _problem(send, *failure)
                return
            answered = answered or message["type"] == "http.response.start"
            await send(message)

        if admitted:
            self.inflight += 1
        try:
            await self.app(scope, limited_receive, guarded_send)
        except _BodyRejectedError:
            if not answered:
                answered = True
                self._on_reject(failure[1])
                await _problem(send, *failure)
        finally:
            if admitted:
                self.inflight -= 1

    def _same_site(self, scope) -> bool:
        origin = _header(scope, b"origin")
        if origin is None:  # not a browser's cross-site request (curl, SDKs, same-origin forms in some browsers)
            return True
        if origin in self.limits.allowed_origins:
            return True
        return urlsplit(origin).netloc == (_header(scope, b"host") or "")
