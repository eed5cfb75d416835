"""Request-scoped access to the app's long-lived objects, as ``Annotated`` dependency aliases."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import anyio
from fastapi import Depends, Request

from gateway.client import AsyncTritonClient
from gateway.metrics import GatewayMetrics
from gateway.service import ServedModel
from gateway.settings import GatewaySettings


@dataclass
class GatewayState:
    settings: GatewaySettings
    model: ServedModel
    client: AsyncTritonClient
    metrics: GatewayMetrics
    cpu_limiter: anyio.CapacityLimiter


def get_state(request: Request) -> GatewayState:
    return request.app.state.gateway


State = Annotated[GatewayState, Depends(get_state)]
