"""Typed errors for bad input, mapped to a 4xx response in one place by the gateway."""

from __future__ import annotations


class InvalidImageError(ValueError):
    """An upload that cannot be turned into a field image.

    ``code`` is a short machine-readable reason (``empty``, ``not_an_image``, ``truncated``,
    ``too_many_pixels``, ``too_large_decoded``, ``too_small``, ``unsupported_mode``) that clients and batch
    ledgers record.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"
