"""Batch processing of whole-slide queues: ``hybridcn batch INPUT... --out DIR`` and the jobs API.

Layers (TIAToolbox-style): :mod:`batch.inputs` reads slides and finds fields, :mod:`batch.worker`
prepares them in a process pool, :mod:`batch.runner` orchestrates Triton and the :mod:`batch.ledger`,
:mod:`batch.reports` writes results.csv, slides.csv/json and the HTML reports from the ledger.
The names below are imported on first use, so ``import batch.cli`` stays light for the command line.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "BatchError": "batch.runner", "BatchOptions": "batch.runner", "BatchSummary": "batch.runner",
    "run_batch": "batch.runner", "run_in_progress": "batch.runner",
    "DiscoveryOptions": "batch.inputs", "InputError": "batch.inputs", "discover": "batch.inputs",
    "tile_grid": "batch.inputs",
    "FieldOutcome": "batch.ledger", "FieldRow": "batch.ledger", "FieldSpec": "batch.ledger", "Ledger": "batch.ledger",
    "LedgerError": "batch.ledger", "ModelVersionMismatchError": "batch.ledger", "SQLiteLedger": "batch.ledger",
    "ReportWriteError": "batch.reports", "SlideSummary": "batch.reports", "summarize_slide": "batch.reports",
    "write_reports": "batch.reports",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'batch' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
