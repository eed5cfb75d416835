"""ASGI guards in front of the app: bounded request bodies, admission control, cross-site posts.

They work on the raw ASGI messages, so a limit holds while the body streams in (chunked uploads
included) and an overloaded gateway answers in microseconds instead of queueing without bound:
- bodies: a per-path byte limit counted as the body arrives (413 ``too_large`` as soon as it is
  passed) and a deadline for the whole body (408 ``body_timeout`` for a client that stalls);
- admission: at most ``max_inflight`` classification requests at once; the next gets 503
  ``overloaded`` with ``Retry-After``, so admitted requests keep their latency;
- cross-site posts: a POST whose ``Origin`` is neither this host nor a configured origin is refused
  (403 ``cross_origin``), so a page elsewhere cannot make a browser submit jobs or fields;
- API keys: when keys are configured, every ``/v1/`` request needs one (``X-API-Key`` or ``Authorization:
  Bearer``; 401 ``unauthorized``), compared in constant time, and each key has a token-bucket rate limit
  (429 ``rate_limited`` with ``Retry-After``). Health, metrics and the page's static files stay open.
"""

from __future__ import annotations

import hmac
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

import anyio

from gateway.report_links import SHARED_PATH

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
    api_keys: tuple[str, ...] = ()
    rate_per_minute: int = 600

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


class _Buckets:
    """A token bucket per API key: ``rate_per_minute`` requests, bursts up to the same number."""

    def __init__(self, rate_per_minute: int) -> None:
        self.rate = rate_per_minute / 60.0
        self.capacity = float(rate_per_minute)
        self._state: dict[str, tuple[float, float]] = {}

    def take(self, key: str) -> float:
        """0 when a request may go now, else the seconds until one may."""
        now = time.monotonic()
        tokens, last = self._state.get(key, (self.capacity, now))
        tokens = min(self.capacity, tokens + (now - last) * self.rate)
        if tokens >= 1:
            self._state[key] = (tokens - 1, now)
            return 0.0
        self._state[key] = (tokens, now)
        return (1 - tokens) / self.rate


class RequestGuard:
    """The three guards as one ASGI middleware (see the module docstring)."""

    def __init__(self, app: ASGIApp, limits: GuardLimits, *, on_reject: Callable[[str], None] | None = None) -> None:
        self.app = app
        self.limits = limits
        self.inflight = 0
        self._on_reject = on_reject or (lambda code: None)
        self._buckets = _Buckets(limits.rate_per_minute)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method, path = scope["method"], scope["path"]
        # signed report links carry their own credential, checked by their route (gateway.report_links)
        shared = method in ("GET", "HEAD") and SHARED_PATH.match(path) is not None
        if self.limits.api_keys and path.startswith("/v1/") and method != "OPTIONS" and not shared:
            key = self._key(scope)
            if key is None:
                self._on_reject("unauthorized")
                await _problem(send, 401, "unauthorized", "an API key is required (X-API-Key header or Authorization: "
                               "Bearer)", {"WWW-Authenticate": "Bearer"})
                return
            wait = self._buckets.take(key)
            if wait:
                self._on_reject("rate_limited")
                await _problem(send, 429, "rate_limited", f"this key's limit is {self.limits.rate_per_minute} requests "
                               "a minute", {"Retry-After": str(math.ceil(wait))})
                return
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

    def _key(self, scope) -> str | None:
        """The configured key this request presents, or ``None``."""
        given = _header(scope, b"x-api-key")
        authorization = _header(scope, b"authorization") or ""
        if given is None and authorization.lower().startswith("bearer "):
            given = authorization[7:].strip()
        if not given:
            return None
        matches = [key for key in self.limits.api_keys if hmac.compare_digest(key.encode(), given.encode())]
        return matches[0] if matches else None

    def _same_site(self, scope) -> bool:
        origin = _header(scope, b"origin")
        if origin is None:  # not a browser's cross-site request (curl, SDKs, same-origin forms in some browsers)
            return True
        if origin in self.limits.allowed_origins:
            return True
        return urlsplit(origin).netloc == (_header(scope, b"host") or "")
