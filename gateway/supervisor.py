"""The gateway keeps its Triton working: it probes it, restarts the embedded server, and tells the truth.

Every ``interval_s`` one synthetic field goes through the raw-bytes ensemble, which touches every model and
every Python stub. A dead embedded server, or two failed probes in a row (a killed stub, a hung model), get
the server stopped (its whole process group and shared memory) and started again on the same ports;
requests in flight meanwhile fail with 503 and the client's channel reconnects. An external Triton
(``HYBRIDCN_TRITON_URL``) is only watched: readiness follows it and comes back with it. After
``max_restarts`` failed restarts in a row the gateway reports itself dead (``/healthz`` 503), so an
orchestrator replaces it.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from pathlib import Path

import anyio

from engine.client import AsyncTritonClient
from engine.triton_server import EmbeddedTriton

logger = logging.getLogger("hybridcn.supervisor")


@dataclass
class TritonSupervisor:
    client: AsyncTritonClient
    server: EmbeddedTriton | None
    models: list[str]
    probe_field: bytes
    interval_s: float = 2.0
    max_restarts: int = 3
    state: str = "starting"  # starting, ready, unavailable, restarting, failed
    model_ready: dict[str, bool] = field(default_factory=dict)
    failed_probes: int = 0
    failed_restarts: int = 0

    @staticmethod
    def models_of(repository: Path) -> list[str]:
        return sorted(path.parent.name for path in Path(repository).glob("*/config.pbtxt"))

    @property
    def alive(self) -> bool:
        """False only when recovery has been tried and is impossible (the liveness answer)."""
        return self.state != "failed"

    async def check(self) -> bool:
        """Probe once and update the state; ``True`` when every model answers."""
        server_dead = self.server is not None and not self.server.alive()
        self.model_ready = {name: False for name in self.models} if server_dead else \
            await self.client.models_ready(self.models)
        healthy = not server_dead and all(self.model_ready.values()) and await self.client.probe(self.probe_field)
        self.failed_probes = 0 if healthy else self.failed_probes + 1
        if healthy:
            self.state, self.failed_restarts = "ready", 0
        elif self.state != "failed":
            self.state = "unavailable"
        return healthy

    async def recover(self) -> None:
        """Restart the embedded server if it is dead or failed two probes in a row."""
        if self.server is None or self.state == "failed":
            return
        if self.server.alive() and self.failed_probes < 2:
            return
        self.state = "restarting"
        logger.warning("Triton is %s; restarting it (restart %d)", "dead" if not self.server.alive()
                       else "not answering", self.server.restarts + 1)
        try:
            await anyio.to_thread.run_sync(self.server.restart)
        except Exception as error:
            self.failed_restarts += 1
            logger.error("restarting Triton failed (%d in a row): %s", self.failed_restarts, error)
            self.state = "failed" if self.failed_restarts >= self.max_restarts else "unavailable"
            return
        await self.client.reconnect()
        self.failed_probes = 0
        await self.check()
        self.failed_probes = 0  # a first probe on a fresh server may still be warming up
        logger.info("Triton restarted: %s", self.state)

    async def run(self) -> None:
        while True:
            try:
                if not await self.check():
                    await self.recover()
            except Exception:  # the supervisor must outlive whatever it watches
                logger.exception("Triton supervision step failed")
            await asyncio.sleep(self.interval_s)
