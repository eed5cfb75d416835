"""Report links that work without an API key: ``/v1/jobs/{id}/shared/{token}/...``, signed and short-lived.

A browser opens a job's HTML report in a new tab, which sends no ``X-API-Key``. With keys configured,
the jobs API therefore hands out report URLs carrying a token in the path: an HMAC-SHA256 of the job id
and an expiry, keyed by a secret derived from the configured API keys (so every gateway process and
replica agrees without another setting, and rotating the keys revokes every link). Being in the path,
the token survives the report's relative links (``index.html`` -> ``slides/S1.html``). It grants reading
that one job's report files until it expires, nothing else.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import math
import re
import time
from collections.abc import Sequence

#: How long a handed-out link works.
LINK_TTL_S = 12 * 3600
SHARED_PATH = re.compile(r"^/v1/jobs/[^/]+/shared/[^/]+/")


def _secret(api_keys: Sequence[str]) -> bytes:
    return hashlib.sha256(("hybridcn-report-links\0" + "\0".join(sorted(api_keys))).encode()).digest()


def _mac(api_keys: Sequence[str], job_id: str, expires: int) -> str:
    digest = hmac.new(_secret(api_keys), f"{job_id}\0{expires}".encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest[:18]).decode().rstrip("=")


def make_token(api_keys: Sequence[str], job_id: str, *, ttl_s: int = LINK_TTL_S, now: float | None = None) -> str:
    """A token for ``job_id``'s report files, valid at least ``ttl_s`` seconds (at most an hour more)."""
    # the expiry rounded up to the hour: the same link for a whole hour, so a page polling the job keeps it
    expires = math.ceil(((time.time() if now is None else now) + ttl_s) / 3600) * 3600
    return f"{expires}.{_mac(api_keys, job_id, expires)}"


def token_valid(api_keys: Sequence[str], job_id: str, token: str, *, now: float | None = None) -> bool:
    """Whether ``token`` was made for ``job_id`` with these keys and has not expired (constant-time compare)."""
    expires, _, mac = token.partition(".")
    if not api_keys or not expires.isdigit() or not mac:
        return False
    if int(expires) < (time.time() if now is None else now):
        return False
    return hmac.compare_digest(mac, _mac(api_keys, job_id, int(expires)))
