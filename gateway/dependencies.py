"""Request-scoped access to the app's long-lived objects, as ``Annotated`` dependency aliases."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import anyio
from fastapi import Depends, Request

from engine.client import AsyncTritonClient
from engine.model import ServedModel
from gateway.jobs_executor import JobQueue
from gateway.metrics import GatewayMetrics
from gateway.settings import GatewaySettings
from gateway.supervisor import TritonSupervisor


@dataclass
class GatewayState:
    settings: GatewaySettings
    model: ServedModel
    client: AsyncTritonClient
    metrics: GatewayMetrics
    cpu_limiter: anyio.CapacityLimiter
    jobs: JobQueue
    supervisor: TritonSupervisor
    explain_limiter: anyio.CapacityLimiter  # ``settings.max_explaining`` occlusion maps at once


def get_state(request: Request) -> GatewayState:
    return request.app.state.gateway


State = Annotated[GatewayState, Depends(get_state)]
