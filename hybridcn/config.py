"""Where the served model lives by default: the one definition every command and server reads.

``HYBRIDCN_REPOSITORY`` wins; otherwise the ``model_repository/`` of a source checkout (the shipped model),
otherwise ``./model_repository``. An installed wheel carries no model, so a deployment sets the variable
(the gateway and Triton images do).
"""

from __future__ import annotations

import os
from pathlib import Path

REPOSITORY_ENV = "HYBRIDCN_REPOSITORY"
#: Where ``hybridcn export`` writes by default; replacing the shipped ``model_repository/`` is explicit.
EXPORT_BUILD_DIR = Path("build") / "model_repository"
_CHECKOUT_REPOSITORY = Path(__file__).resolve().parent.parent / "model_repository"


def default_repository() -> Path:
    """The model repository to serve when none is named."""
    configured = os.environ.get(REPOSITORY_ENV)
    if configured:
        return Path(configured)
    if (_CHECKOUT_REPOSITORY / "hybridcn_nas").is_dir():
        return _CHECKOUT_REPOSITORY
    return Path.cwd() / "model_repository"


def shipped_repository() -> Path:
    """The checkout's ``model_repository/`` (what ``hybridcn export --ship`` replaces)."""
    return _CHECKOUT_REPOSITORY
