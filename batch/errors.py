"""Errors that stop a batch run; ``hybridcn batch`` turns each into one line and exit status 1."""

from __future__ import annotations


class BatchError(RuntimeError):
    """A run cannot start or go on (output folder busy, Triton unreachable, a worker died)."""


class OutputBusyError(BatchError):
    """Another batch run holds the output folder."""


class TritonNotReadyError(BatchError):
    """No usable Triton endpoint."""
