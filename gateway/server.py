"""``hybridcn serve``: embedded Triton plus the gateway under uvicorn, on 127.0.0.1 by default."""

from __future__ import annotations

import logging
from pathlib import Path

import uvicorn

from gateway.app import create_app
from gateway.settings import GatewaySettings

LOOPBACK = ("127.0.0.1", "localhost", "::1")
logger = logging.getLogger("hybridcn.serve")


def serve(*, host: str = "127.0.0.1", port: int = 8000, repository: Path | None = None, grpc_port: int = 0,
          triton_http_port: int = 0) -> int:
    """Run the gateway (and the embedded Triton on the same address) until interrupted."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = GatewaySettings(**({"repository": repository} if repository else {}), triton_host=host,
                               triton_grpc_port=grpc_port, triton_http_port=triton_http_port)
    if host not in LOOPBACK and not settings.api_keys:
        raise ValueError(f"binding to {host} needs API keys: set HYBRIDCN_API_KEYS (a JSON list) first")
    if host not in LOOPBACK:
        logger.warning("binding to %s: the gateway needs API keys; Triton's own gRPC/HTTP ports (for "
                       "integrators) have no authentication - firewall them to trusted hosts", host)
    logger.info("gateway on http://%s:%d (web page at /, readiness at /readyz)", host, port)
    uvicorn.run(create_app(settings), host=host, port=port, log_level="info")
    return 0
