"""Triton gRPC clients that send uint8 fields: one channel reused, several requests in flight."""

from __future__ import annotations

import asyncio
from concurrent.futures import Future

import numpy as np

from export.repository import ENSEMBLE, RAW_ENSEMBLE
from export.runtime import ALL_OUTPUTS, EnsembleOutput


class TritonUnavailableError(RuntimeError):
    """Triton did not answer (down, not ready, timed out); the caller may retry."""


def _inputs(module, images: np.ndarray):
    """The request; no outputs named, so Triton returns every output of the served ensemble."""
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"expected (N, H, W, 3) uint8 fields, got {images.dtype} {images.shape}")
    tensor = module.InferInput("image", list(images.shape), "UINT8")
    tensor.set_data_from_numpy(np.ascontiguousarray(images))
    return [tensor], None


def _unpack(result) -> EnsembleOutput:
    """``ood_score`` is ``None`` when the repository has no ``ood`` step (``as_numpy`` of a missing output)."""
    return EnsembleOutput(*(result.as_numpy(name) for name in ALL_OUTPUTS))


class AsyncTritonClient:
    """For the FastAPI gateway: ``await client.infer(fields)``; concurrency bounded by ``inflight``."""

    def __init__(self, url: str, *, inflight: int = 16, timeout_s: float = 30.0, model: str = ENSEMBLE) -> None:
        import tritonclient.grpc.aio as grpc_aio

        self._module = grpc_aio
        self._client = grpc_aio.InferenceServerClient(url)
        self._semaphore = asyncio.Semaphore(inflight)
        self._timeout = timeout_s
        self.url = url
        self.model = model

    async def ready(self) -> bool:
        try:
            return bool(await self._client.is_server_ready() and await self._client.is_model_ready(self.model))
        except Exception:
            return False

    async def reconnect(self) -> None:
        """A fresh channel: after a server restart, the old one may sit in gRPC's reconnect backoff for seconds."""
        old, self._client = self._client, self._module.InferenceServerClient(self.url)
        await old.close()

    async def models_ready(self, names: list[str]) -> dict[str, bool]:
        """Readiness of each named model (``False`` for any that cannot be asked)."""
        ready = {}
        for name in names:
            try:
                ready[name] = bool(await self._client.is_model_ready(name, client_timeout=2))
            except Exception:
                ready[name] = False
        return ready

    async def probe(self, encoded: bytes, *, timeout_s: float = 10.0) -> bool:
        """One field through the raw-bytes ensemble: every step (and every Python stub) answers, or not."""
        tensor = self._module.InferInput("image_bytes", [1, 1], "BYTES")
        tensor.set_data_from_numpy(np.array([[encoded]], dtype=object))
        try:
            await self._client.infer(RAW_ENSEMBLE, [tensor], client_timeout=timeout_s)
            return True
        except Exception:
            return False

    async def infer(self, images: np.ndarray) -> EnsembleOutput:
        inputs, outputs = _inputs(self._module, images)
        async with self._semaphore:
            try:
                result = await self._client.infer(self.model, inputs, outputs=outputs,
                                                  client_timeout=self._timeout)
            except Exception as error:
                raise TritonUnavailableError(f"Triton at {self.url} failed: {error}") from error
        return _unpack(result)

    async def close(self) -> None:
        await self._client.close()


class TritonClient:
    """For batch jobs and scripts: ``submit`` returns a future; the gRPC channel is shared."""

    def __init__(self, url: str, *, timeout_s: float = 60.0, model: str = ENSEMBLE) -> None:
        import tritonclient.grpc as grpc

        self._module = grpc
        self._client = grpc.InferenceServerClient(url)
        self._timeout = timeout_s
        self.url = url
        self.model = model

    def ready(self) -> bool:
        try:
            return bool(self._client.is_server_ready() and self._client.is_model_ready(self.model))
        except Exception:
            return False

    def submit(self, images: np.ndarray) -> Future:
        future: Future = Future()
        inputs, outputs = _inputs(self._module, images)

        def done(result, error) -> None:
            if error is not None:
                future.set_exception(TritonUnavailableError(f"Triton at {self.url} failed: {error}"))
            else:
                future.set_result(_unpack(result))

        self._client.async_infer(self.model, inputs, done, outputs=outputs, client_timeout=self._timeout)
        return future

    def infer(self, images: np.ndarray) -> EnsembleOutput:
        return self.submit(images).result()

    def close(self) -> None:
        self._client.close()
