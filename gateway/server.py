"""``hybridcn serve``: embedded Triton plus the gateway under uvicorn, on 127.0.0.1 by default."""

from __future__ import annotations

import logging
from pathlib import Path

import uvicorn

from gateway.app import create_app
from gateway.settings import GatewaySettings


def serve(*, host: str = "127.0.0.1", port: int = 8000, repository: Path | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = GatewaySettings(**({"repository": repository} if repository else {}))
    uvicorn.run(create_app(settings), host=host, port=port, log_level="info")
    return 0
